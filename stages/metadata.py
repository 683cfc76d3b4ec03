"""Stage metadata: one row per clip (file-name fields, audio facts, actor-disjoint split) -> Parquet.

    python stages/metadata.py --audio data/raw --out data/metadata.parquet --rejects data/metadata_rejects.csv

Files that are not RAVDESS names or not readable audio are listed in the rejects file and
printed; they are never dropped silently.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from ser.corpora import collect, write_parquet
from ser.util import UserError, atomic_path, run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--audio", required=True, help="extracted corpus folder")
    parser.add_argument("--out", required=True, help="clips table (Parquet)")
    parser.add_argument("--rejects", required=True, help="files left out, with the reason (CSV)")
    args = parser.parse_args()
    p = yaml.safe_load(Path("params.yaml").read_text())["metadata"]
    clips, rejects = collect(Path(args.audio), p["test_actors"])
    if clips.empty:
        raise UserError(f"metadata: no usable RAVDESS clips under {args.audio}")
    write_parquet(clips, Path(args.out))
    with atomic_path(args.rejects) as tmp:
        rejects.to_csv(tmp, index=False)
    counts = clips.groupby("split")["actor"].agg(["count", "nunique"])
    print(f"metadata: {len(clips)} clips -> {args.out}")
    for split, row in counts.iterrows():
        print(f"  {split}: {row['count']} clips from {row['nunique']} actors")
    if len(rejects):
        print(f"metadata: left out {len(rejects)} file(s), listed in {args.rejects}:", file=sys.stderr)
        for r in rejects.itertuples():
            print(f"  {r.path}: {r.reason}", file=sys.stderr)


if __name__ == "__main__":
    run_stage(main)
