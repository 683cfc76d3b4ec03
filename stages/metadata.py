"""Stage metadata: one row per clip of every corpus (speaker, emotion on the project's classes,
audio facts, a speaker-disjoint split) -> Parquet.

    python stages/metadata.py --audio data/raw --out data/metadata.parquet --rejects data/metadata_rejects.csv

Files left out (names a corpus kind does not parse, labels mapped to no class, unreadable
audio) are listed in the rejects file with the reason and printed; never dropped silently.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from ser.corpora import collect_corpora, write_parquet
from ser.util import UserError, atomic_path, run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--audio", required=True, help="folder of the extracted corpora, one folder each")
    parser.add_argument("--out", required=True, help="clips table (Parquet)")
    parser.add_argument("--rejects", required=True, help="files left out, with the reason (CSV)")
    args = parser.parse_args()
    p = yaml.safe_load(Path("params.yaml").read_text())["metadata"]
    clips, rejects = collect_corpora(Path(args.audio), p["corpora"])
    if clips.empty:
        raise UserError(f"metadata: no usable clips under {args.audio}")
    write_parquet(clips, Path(args.out))
    with atomic_path(args.rejects) as tmp:
        rejects.to_csv(tmp, index=False)
    counts = clips.groupby(["corpus", "split"])["speaker"].agg(["count", "nunique"])
    print(f"metadata: {len(clips)} clips -> {args.out}")
    for (corpus, split), row in counts.iterrows():
        print(f"  {corpus} {split}: {row['count']} clips from {row['nunique']} speakers")
    if len(rejects):
        print(f"metadata: left out {len(rejects)} file(s), listed in {args.rejects}:", file=sys.stderr)
        for r in rejects.itertuples():
            print(f"  {r.path}: {r.reason}", file=sys.stderr)


if __name__ == "__main__":
    run_stage(main)
