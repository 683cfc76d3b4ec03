"""Stage download: fetch the corpus archive (URL or local path), verify its md5, extract it.

    python stages/download.py --archive data/archive.zip --out data/raw    (params: download)
"""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from ser.archive import fetch, normalise_md5, safe_extract
from ser.util import run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", required=True, help="where the verified archive is kept")
    parser.add_argument("--out", required=True, help="folder the archive is extracted into")
    args = parser.parse_args()
    p = yaml.safe_load(Path("params.yaml").read_text())["download"]
    archive, out_dir = Path(args.archive), Path(args.out)
    fetch(p["url"], archive, normalise_md5(p["md5"]), p["retries"], p["backoff_s"], p["timeout_s"], p["chunk_bytes"])
    count = safe_extract(archive, out_dir, int(p["max_extract_gb"] * 10**9), p["max_ratio"])
    print(f"extracted {count} files from {archive} into {out_dir}")


if __name__ == "__main__":
    run_stage(main)
