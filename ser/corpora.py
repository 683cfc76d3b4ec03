"""Corpora: the emotion class list, the RAVDESS file-name schema, and the scan of an extracted
corpus into one row per clip (file-name fields, audio facts, a speaker-independent split)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ser.audio import AudioError, audio_info, find_audio_files
from ser.util import OUTPUT_MARKER, atomic_path

# Order is the class index order of every model this project trains.
EMOTIONS: list[str] = [
    "neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised",
]
MODALITIES = {1: "full-AV", 2: "video-only", 3: "audio-only"}
VOCAL_CHANNELS = {1: "speech", 2: "song"}
INTENSITIES = {1: "normal", 2: "strong"}
STATEMENTS = {1: "Kids are talking by the door", 2: "Dogs are sitting by the door"}

_NAME = re.compile(r"^(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})$")


def parse_name(path: str | Path) -> dict[str, Any]:
    """Decode a RAVDESS file name like 03-01-05-02-01-02-12.wav.

    Raises ValueError saying what is wrong when the name is not a valid RAVDESS name.
    """
    stem = Path(path).stem
    match = _NAME.match(stem)
    if not match:
        raise ValueError(f"not a RAVDESS name (want MM-VV-EE-II-SS-RR-AA): {Path(path).name}")
    modality, channel, emotion, intensity, statement, repetition, actor = map(int, match.groups())
    checks = [
        (modality in MODALITIES, "modality"),
        (channel in VOCAL_CHANNELS, "vocal channel"),
        (1 <= emotion <= len(EMOTIONS), "emotion"),
        (intensity in INTENSITIES, "intensity"),
        (statement in STATEMENTS, "statement"),
        (repetition in (1, 2), "repetition"),
        (1 <= actor <= 24, "actor"),
    ]
    for ok, field in checks:
        if not ok:
            raise ValueError(f"invalid {field} code in RAVDESS name: {Path(path).name}")
    if emotion == 1 and intensity == 2:
        raise ValueError(f"neutral has no strong intensity in RAVDESS: {Path(path).name}")
    return {
        "modality": MODALITIES[modality],
        "vocal_channel": VOCAL_CHANNELS[channel],
        "emotion": EMOTIONS[emotion - 1],
        "intensity": INTENSITIES[intensity],
        "statement": statement,
        "repetition": repetition,
        "actor": actor,
        "sex": "male" if actor % 2 == 1 else "female",
    }


# Named class sets for train.classes. "six": without calm and surprised, the set often
# reported when RAVDESS is compared with corpora that lack those two.
CLASS_SETS: dict[str, list[str]] = {
    "all": list(EMOTIONS),
    "six": [e for e in EMOTIONS if e not in ("calm", "surprised")],
}


def resolve_classes(selected: str | list[str] | None) -> list[str]:
    """The class set a model is trained on: a named set (all, six), or a list of
    emotions, returned in schema order. Empty or None means all eight."""
    if not selected:
        return list(EMOTIONS)
    if isinstance(selected, str):
        if selected not in CLASS_SETS:
            raise ValueError(f"unknown class set {selected!r}; use one of {sorted(CLASS_SETS)} or a list")
        return list(CLASS_SETS[selected])
    unknown = sorted(set(selected) - set(EMOTIONS))
    if unknown:
        raise ValueError(f"unknown emotion(s) {unknown}; choose from {EMOTIONS}")
    return [e for e in EMOTIONS if e in selected]


SCHEMA = pa.schema([
    ("path", pa.string()),
    ("modality", pa.string()),
    ("vocal_channel", pa.string()),
    ("emotion", pa.string()),
    ("intensity", pa.string()),
    ("statement", pa.int8()),
    ("repetition", pa.int8()),
    ("actor", pa.int8()),
    ("sex", pa.string()),
    ("sample_rate", pa.int32()),
    ("channels", pa.int16()),
    ("frames", pa.int64()),
    ("duration_s", pa.float64()),
    ("split", pa.string()),
])


def collect(audio_dir: Path, test_actors: list[int]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Scan audio_dir; return (clips, rejects). Every actor is in one split: `test` for
    test_actors, else `train`. Paths are as found under audio_dir."""
    rows, rejects, seen = [], [], {}
    candidates = sorted(p for p in audio_dir.rglob("*") if p.is_file() and p.name != OUTPUT_MARKER)
    audio = set(find_audio_files(audio_dir))
    for path in candidates:
        if path not in audio:
            rejects.append({"path": str(path), "reason": "not an audio file extension"})
            continue
        if path.name in seen:  # a RAVDESS name is one clip: a second copy would count twice
            rejects.append({"path": str(path), "reason": f"duplicate of {seen[path.name]} (same clip name)"})
            continue
        try:
            fields = parse_name(path)
            facts = audio_info(path)
        except (ValueError, AudioError) as e:
            rejects.append({"path": str(path), "reason": str(e)})
            continue
        if facts["frames"] == 0:
            rejects.append({"path": str(path), "reason": "contains no audio samples"})
            continue
        seen[path.name] = path
        split = "test" if fields["actor"] in test_actors else "train"
        rows.append({"path": str(path), **fields, **facts, "split": split})
    clips = pd.DataFrame(rows, columns=SCHEMA.names)
    return clips, pd.DataFrame(rejects, columns=["path", "reason"])


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    """The clips table with SCHEMA's column types, written atomically."""
    table = pa.Table.from_pandas(df, schema=SCHEMA, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
