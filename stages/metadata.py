"""Stage 2: one row per clip (file-name fields + audio facts + actor-disjoint split) -> Parquet.

Files that are not RAVDESS names or not readable audio are listed in the rejects file and
printed; they are never dropped silently.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from stages.audio import AudioError, audio_info, find_audio_files
from stages.labels import parse_name
from stages.util import OUTPUT_MARKER, UserError, atomic_path, load_params, run_main

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


def assign_split(actor: int, val_actors: list[int], test_actors: list[int]) -> str:
    if actor in test_actors:
        return "test"
    if actor in val_actors:
        return "val"
    return "train"


def check_split(val_actors: list[int], test_actors: list[int]) -> None:
    overlap = sorted(set(val_actors) & set(test_actors))
    if overlap:
        raise UserError(f"metadata: actors {overlap} are in both val_actors and test_actors")


def collect(audio_dir: Path, val_actors: list[int], test_actors: list[int]
            ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Scan audio_dir; return (clips, rejects). Paths are relative to the project root."""
    check_split(val_actors, test_actors)
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
        split = assign_split(fields["actor"], val_actors, test_actors)
        rows.append({"path": str(path), **fields, **facts, "split": split})
    clips = pd.DataFrame(rows, columns=SCHEMA.names)
    return clips, pd.DataFrame(rejects, columns=["path", "reason"])


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    table = pa.Table.from_pandas(df, schema=SCHEMA, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def main() -> None:
    p: dict[str, Any] = load_params("metadata")
    clips, rejects = collect(Path(p["audio_dir"]), p["val_actors"], p["test_actors"])
    if clips.empty:
        raise UserError(f"metadata: no usable RAVDESS clips under {p['audio_dir']}")
    write_parquet(clips, Path(p["out"]))
    with atomic_path(p["rejects"]) as tmp:
        rejects.to_csv(tmp, index=False)
    counts = clips.groupby("split")["actor"].agg(["count", "nunique"])
    print(f"metadata: {len(clips)} clips -> {p['out']}")
    for split, row in counts.iterrows():
        print(f"  {split}: {row['count']} clips from {row['nunique']} actors")
    if len(rejects):
        print(f"metadata: left out {len(rejects)} file(s), listed in {p['rejects']}:", file=sys.stderr)
        for r in rejects.itertuples():
            print(f"  {r.path}: {r.reason}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
