"""Corpora: the emotion class list, the RAVDESS file-name schema, and the scan of an extracted
corpus into one row per clip (file-name fields, audio facts, a speaker-independent split)."""
from __future__ import annotations

import re
from pathlib import Path, PurePath
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ser.audio import AudioError, audio_info, find_audio_files
from ser.util import OUTPUT_MARKER, UserError, atomic_path, read_text_table

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


# One row per clip, whatever the corpus. `label` is the corpus's own word for the emotion,
# `emotion` the project's class it maps to; the RAVDESS file-name fields are empty elsewhere.
SCHEMA = pa.schema([
    ("path", pa.string()),
    ("corpus", pa.string()),
    ("speaker", pa.string()),  # "<corpus>:<its speaker id>": unique across corpora
    ("label", pa.string()),
    ("emotion", pa.string()),
    ("sex", pa.string()),
    ("language", pa.string()),
    ("modality", pa.string()),
    ("vocal_channel", pa.string()),
    ("intensity", pa.string()),
    ("statement", pa.int8()),
    ("repetition", pa.int8()),
    ("actor", pa.int8()),
    ("sample_rate", pa.int32()),
    ("channels", pa.int16()),
    ("frames", pa.int64()),
    ("duration_s", pa.float64()),
    ("split", pa.string()),
])

TESS_EMOTIONS = ("angry", "disgust", "fear", "happy", "neutral", "ps", "sad")  # file-name suffixes
TESS_FOLDER_EMOTIONS = {"pleasant_surprise": "ps"}  # folder names that differ from the suffix
EMODB_LETTERS = {"W": "anger", "L": "boredom", "E": "disgust", "A": "fear", "F": "happiness", "T": "sadness",
                 "N": "neutral"}
EMODB_MALE = {"03", "10", "11", "12", "15"}
EMODB_FEMALE = {"08", "09", "13", "14", "16"}
CREMA_D_EMOTIONS = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")
CREMA_D_SENTENCES = ("IEO", "TIE", "IOM", "IWW", "TAI", "MTI", "IWL", "ITH", "DFA", "ITS", "TSI", "WSI")
CREMA_D_LEVELS = ("LO", "MD", "HI", "XX")
ASED_FOLDERS = {"01Neutral": "n", "02Fearful": "f", "03Happy": "h", "04Sad": "s", "05Angry": "a"}
ASED_SEXES = {"01": "female", "02": "male"}

# Each kind's labels mapped onto the project's classes; None leaves the label out (listed in
# the rejects with the reason). A corpus's `labels` param overrides single entries, e.g.
# {calm: neutral} merges RAVDESS's calm into neutral.
DEFAULT_LABELS: dict[str, dict[str, str | None]] = {
    "ravdess": {e: e for e in EMOTIONS},
    "tess": {"angry": "angry", "disgust": "disgust", "fear": "fearful", "happy": "happy", "neutral": "neutral",
             "ps": "surprised", "sad": "sad"},
    "emodb": {"anger": "angry", "boredom": None, "disgust": "disgust", "fear": "fearful", "happiness": "happy",
              "sadness": "sad", "neutral": "neutral"},
    "crema_d": {"ANG": "angry", "DIS": "disgust", "FEA": "fearful", "HAP": "happy", "NEU": "neutral", "SAD": "sad"},
    "ased": {"n": "neutral", "f": "fearful", "h": "happy", "s": "sad", "a": "angry"},
    "manifest": {e: e for e in EMOTIONS},
    "folders": {e: e for e in EMOTIONS},
}
KINDS = tuple(DEFAULT_LABELS)
NAMED_BY_FILE = ("ravdess", "tess", "emodb", "crema_d", "ased")  # kinds whose file name is the clip's identity


def parse_ravdess(relative: PurePath) -> dict[str, Any]:
    """A RAVDESS clip's speaker, label and fields, from its file name."""
    fields = parse_name(relative)
    return {"speaker": f"{fields['actor']:02d}", "label": fields["emotion"], "language": "en", **fields}


def parse_tess(relative: PurePath) -> dict[str, Any]:
    """TESS: <SPEAKER>_<emotion>/<SPEAKER>_<word>_<emotion>.flac. The speaker comes from the
    folder (one file name misspells it), and the folder's emotion must be the file's."""
    folder, name = relative.parent.name, relative.stem
    speaker, _, folder_emotion = folder.partition("_")
    label = name.rsplit("_", 1)[-1]
    if speaker not in ("OAF", "YAF") or label not in TESS_EMOTIONS:
        raise ValueError(f"not a TESS name (want OAF_|YAF_<emotion>/<speaker>_<word>_<emotion>): {relative}")
    if TESS_FOLDER_EMOTIONS.get(folder_emotion, folder_emotion) != label:
        raise ValueError(f"TESS folder {folder} and file name disagree on the emotion: {relative}")
    return {"speaker": speaker, "label": label, "sex": "female", "language": "en"}


def parse_emodb(relative: PurePath) -> dict[str, Any]:
    """EmoDB: SSTTTEV (speaker, text, emotion letter, version), e.g. 03a01Fa.wav."""
    name = relative.stem
    match = re.fullmatch(r"(\d{2})([ab]\d{2})([WLEAFTN])([a-z])", name)
    if not match or match.group(1) not in EMODB_MALE | EMODB_FEMALE:
        raise ValueError(f"not an EmoDB name (want SSTTTEV, e.g. 03a01Fa): {relative.name}")
    speaker = match.group(1)
    return {"speaker": speaker, "label": EMODB_LETTERS[match.group(3)],
            "sex": "male" if speaker in EMODB_MALE else "female", "language": "de"}


def parse_crema_d(relative: PurePath) -> dict[str, Any]:
    """CREMA-D: <actor 1001-1091>_<sentence>_<emotion>_<level>, e.g. 1001_DFA_ANG_XX.wav."""
    parts = relative.stem.split("_")
    if (len(parts) != 4 or not parts[0].isdigit() or not 1001 <= int(parts[0]) <= 1091
            or parts[1] not in CREMA_D_SENTENCES or parts[2] not in CREMA_D_EMOTIONS or parts[3] not in CREMA_D_LEVELS):
        raise ValueError(f"not a CREMA-D name (want 1001-1091_SENTENCE_EMOTION_LEVEL): {relative.name}")
    return {"speaker": parts[0], "label": parts[2], "language": "en"}


def parse_ased(relative: PurePath) -> dict[str, Any]:
    """ASED v1 (the authors' layout): <NN><Emotion>/<e><N>-<sentence>-<repetition>-<sex>-<speaker>,
    e.g. 02Fearful/f2-06-02-02-63.wav; the emotion letter (either case) and number must be the
    folder's. Speaker: the last field (01-65); sex 01 female, 02 male, as each file says."""
    folder, stem = relative.parent.name, relative.stem
    match = re.fullmatch(r"([nfhsaNFHSA])([1-5])-(\d{2})-(0[12])-(0[12])-(\d{2})", stem)
    letter = ASED_FOLDERS.get(folder)
    if not match or letter is None or not 1 <= int(match.group(6)) <= 65:
        raise ValueError(f"not an ASED name (want 01Neutral..05Angry/<e><n>-SS-RR-GG-PP, e.g. "
                         f"02Fearful/f2-06-02-02-63): {relative}")
    if (match.group(1).lower(), match.group(2)) != (letter, folder[1]):
        raise ValueError(f"ASED folder {folder} and file name disagree on the emotion: {relative}")
    return {"speaker": match.group(6), "label": letter, "sex": ASED_SEXES[match.group(5)], "language": "am"}


def parse_folders(relative: PurePath) -> dict[str, Any]:
    """<speaker>/<emotion>/<file> (or <emotion>/<file>: one speaker for the whole corpus)."""
    if len(relative.parts) == 3:
        return {"speaker": relative.parts[0], "label": relative.parts[1]}
    if len(relative.parts) == 2:
        return {"speaker": "all", "label": relative.parts[0]}
    raise ValueError(f"not in a <speaker>/<emotion>/ or <emotion>/ folder: {relative}")


PARSERS = {"ravdess": parse_ravdess, "tess": parse_tess, "emodb": parse_emodb, "crema_d": parse_crema_d,
           "ased": parse_ased, "folders": parse_folders}


def label_map(kind: str, overrides: dict[str, str | None] | None = None) -> dict[str, str | None]:
    """The kind's label mapping with a corpus's overrides; every target must be a class."""
    if kind not in KINDS:
        raise UserError(f"unknown corpus kind {kind!r}; one of {', '.join(KINDS)}")
    mapping = {**DEFAULT_LABELS[kind], **(overrides or {})}
    bad = sorted(str(v) for v in mapping.values() if v is not None and v not in EMOTIONS)
    if bad:
        raise UserError(f"corpus labels map onto {bad}, which are not among the classes {EMOTIONS}")
    return mapping


def is_test_speaker(speaker: str, test_speakers: list[Any]) -> bool:
    """A corpus's own speaker id against its test_speakers param (RAVDESS actor 7 is "07")."""
    return any(speaker == str(t) or (speaker.isdigit() and isinstance(t, int) and int(speaker) == t)
               for t in test_speakers)


SPLITS = ("train", "calibration", "test")


def split_of(speaker: str, test_speakers: list[Any], calibration_speakers: list[Any]) -> str:
    """test for test_speakers, calibration for calibration_speakers (held out from training
    to calibrate the model's probabilities), else train."""
    if is_test_speaker(speaker, test_speakers):
        return "test"
    return "calibration" if is_test_speaker(speaker, calibration_speakers) else "train"


def collect_corpus(name: str, kind: str, root: Path, test_speakers: list[Any],
                   labels: dict[str, str | None] | None = None, calibration_speakers: list[Any] | None = None,
                   corpus_root: Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Scan one corpus: (clips, rejects). `kind` names how its files are labelled (KINDS);
    a manifest kind reads `root` as the manifest file, whose clips must lie in `corpus_root`
    (default: the manifest's folder). Every speaker is in one split (split_of).
    Files left out (no audio extension, a name the kind
    does not parse, a second copy of a clip, a label that maps to no class, unreadable
    audio) are rejects with the reason, never dropped silently."""
    both = [c for c in calibration_speakers or [] if is_test_speaker(str(c), test_speakers)]
    if both:
        raise UserError(f"metadata.corpora.{name}: speaker(s) {both} are in test_speakers and "
                        "calibration_speakers; a speaker is in one split only")
    calibration = calibration_speakers or []
    if kind == "manifest":
        return collect_manifest(name, root, test_speakers, labels, calibration, corpus_root)
    mapping, parse = label_map(kind, labels), PARSERS.get(kind)
    rows, rejects, seen = [], [], {}
    candidates = sorted(p for p in root.rglob("*") if p.is_file() and p.name != OUTPUT_MARKER)
    audio = set(find_audio_files(root))
    for path in candidates:
        if path not in audio:
            rejects.append({"path": str(path), "reason": "not an audio file extension"})
            continue
        identity = path.name if kind in NAMED_BY_FILE else path  # a second copy would count twice
        if identity in seen:
            rejects.append({"path": str(path), "reason": f"duplicate of {seen[identity]} (same clip name)"})
            continue
        try:
            fields = parse(path.relative_to(root))
            facts = audio_info(path)
        except (ValueError, AudioError) as e:
            rejects.append({"path": str(path), "reason": str(e)})
            continue
        reason = _label_problem(fields["label"], mapping, name) or (
            "contains no audio samples" if facts["frames"] == 0 else None)
        if reason:
            rejects.append({"path": str(path), "reason": reason})
            continue
        seen[identity] = path
        split = split_of(fields["speaker"], test_speakers, calibration)
        rows.append({**fields, "path": str(path), "corpus": name, "speaker": f"{name}:{fields['speaker']}",
                     "emotion": mapping[fields["label"]], **facts, "split": split})
    return _table(rows), pd.DataFrame(rejects, columns=["path", "reason"])


def _label_problem(label: str, mapping: dict[str, str | None], corpus: str) -> str | None:
    if label not in mapping:
        return f"label {label!r} is not one of corpus {corpus}'s labels ({', '.join(mapping)})"
    if mapping[label] is None:
        return f"label {label!r} maps to no class (left out by corpus {corpus}'s labels)"
    return None


def _table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=SCHEMA.names).astype({"actor": "Int8", "statement": "Int8", "repetition": "Int8"})


MANIFEST_COLUMNS = ("path", "emotion", "speaker")  # required; sex, language, split optional


def read_manifest(manifest: Path) -> pd.DataFrame:
    """A manifest (CSV, or Parquet by extension) with at least MANIFEST_COLUMNS, as text (an
    empty cell, or a Parquet null, is the empty string)."""
    if not manifest.is_file():
        raise UserError(f"{manifest}: no such manifest")
    table = read_text_table(manifest, str(manifest))
    missing = [c for c in MANIFEST_COLUMNS if c not in table.columns]
    if missing:
        raise UserError(f"{manifest}: missing column(s) {', '.join(missing)} (a manifest has "
                        f"{', '.join(MANIFEST_COLUMNS)}, optionally sex, language, split)")
    return table


def collect_manifest(name: str, manifest: Path, test_speakers: list[Any],
                     labels: dict[str, str | None] | None = None, calibration_speakers: list[Any] | None = None,
                     root: Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Clips listed in a manifest (paths relative to its folder), each inside `root` (the
    corpus's extracted folder; default the manifest's): a clip elsewhere is a file that DVC
    does not track, so a path that leaves it ('..', absolute, a link out) is refused. A problem
    of the manifest itself (unknown emotion, missing file, a path twice, a speaker in two
    splits, a bad split) stops with one message naming the row; unreadable audio and labels
    mapped to no class are rejects."""
    mapping, table = label_map("manifest", labels), read_manifest(manifest)
    inside = (root or manifest.parent).resolve()
    rows, rejects, first_row, speaker_split = [], [], {}, {}
    for i, item in enumerate(table.to_dict("records")):
        where = f"{manifest} row {i + 1} (path {item['path']!r})"
        path = manifest.parent / item["path"]
        if Path(item["path"]).is_absolute() or not path.resolve().is_relative_to(inside):
            raise UserError(f"{where}: the path leads out of the corpus's folder {inside}; a manifest lists files "
                            "inside its archive, relative to the manifest")
        label, speaker = item["emotion"].strip(), item["speaker"].strip()
        if label not in mapping:
            raise UserError(f"{where}: unknown emotion {label!r}; use one of {', '.join(mapping)} or map it "
                            "in the corpus's labels")
        if not speaker:
            raise UserError(f"{where}: no speaker")
        if not path.is_file():
            raise UserError(f"{where}: no such file {path}")
        if path.resolve() in first_row:
            raise UserError(f"{where}: the same file as row {first_row[path.resolve()]}")
        first_row[path.resolve()] = i + 1
        split = item.get("split", "").strip() or split_of(speaker, test_speakers, calibration_speakers or [])
        if split not in SPLITS:
            raise UserError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
        if speaker_split.setdefault(speaker, (split, i + 1))[0] != split:
            other_split, other_row = speaker_split[speaker]
            raise UserError(f"{where}: speaker {speaker!r} is in split {split} here and in {other_split} "
                            f"in row {other_row}: a speaker is in one split only")
        try:
            facts = audio_info(path)
        except AudioError as e:
            rejects.append({"path": str(path), "reason": str(e)})
            continue
        if mapping[label] is None:
            rejects.append({"path": str(path), "reason": _label_problem(label, mapping, name)})
            continue
        rows.append({"path": str(path), "corpus": name, "speaker": f"{name}:{speaker}", "label": label,
                     "emotion": mapping[label], "sex": item.get("sex") or None,
                     "language": item.get("language") or None, **facts, "split": split})
    return _table(rows), pd.DataFrame(rejects, columns=["path", "reason"])


def collect(audio_dir: Path, test_actors: list[int]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """RAVDESS under audio_dir (corpus name ravdess), test_actors in the test split."""
    return collect_corpus("ravdess", "ravdess", audio_dir, test_actors)


def collect_corpora(raw_dir: Path, corpora: dict[str, dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every corpus named in `corpora` (name -> kind, test_speakers, optional labels and, for
    a manifest, the manifest's path inside its folder), each extracted under raw_dir/<name>:
    one table of clips, one of rejects."""
    clips, rejects = [], []
    for name, c in corpora.items():
        unknown = sorted(set(c) - {"kind", "test_speakers", "calibration_speakers", "labels", "manifest"})
        if unknown or "kind" not in c:
            raise UserError(f"metadata.corpora.{name}: give kind (one of {', '.join(KINDS)}) and test_speakers; "
                            f"unknown keys {unknown}")
        root = raw_dir / name
        if not root.is_dir():
            raise UserError(f"metadata.corpora.{name}: no folder {root}; name its archive in download.archives")
        source = root / c["manifest"] if c["kind"] == "manifest" else root
        found, left_out = collect_corpus(name, c["kind"], source, c.get("test_speakers") or [], c.get("labels"),
                                         c.get("calibration_speakers") or [], corpus_root=root)
        clips.append(found)
        rejects.append(left_out)
    return pd.concat(clips, ignore_index=True), pd.concat(rejects, ignore_index=True)


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    """The clips table with SCHEMA's column types, written atomically."""
    table = pa.Table.from_pandas(df, schema=SCHEMA, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
