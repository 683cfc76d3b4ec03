"""Stage download: fetch every corpus archive (URL or local path), verify its md5, extract
each into its own folder.

    python stages/download.py --archives data/archives --out data/raw    (params: download)

`download.archives` names each corpus's archive: data/archives/<name>.zip, extracted to
data/raw/<name>/. An archive with no published checksum (md5: null) is accepted as
downloaded; its md5 is printed, and DVC records the archive's hash in dvc.lock.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from ser.archive import fetch, md5sum, normalise_md5, safe_extract
from ser.util import UserError, atomic_path, run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archives", required=True, help="folder where the verified archives are kept")
    parser.add_argument("--out", required=True, help="folder the archives are extracted into, one folder each")
    args = parser.parse_args()
    p = yaml.safe_load(Path("params.yaml").read_text())["download"]
    if not p.get("archives"):
        raise UserError("download.archives: no corpus archive named")
    archives = Path(args.archives)
    for name, source in p["archives"].items():
        archive = archives / f"{name}.zip"
        md5 = None if source.get("md5") is None else normalise_md5(source["md5"])
        fetch(source["url"], archive, md5, p["retries"], p["backoff_s"], p["timeout_s"], p["chunk_bytes"],
              int(p["max_extract_gb"] * 10**9))
        if md5 is None:
            print(f"{name}: no published md5; this archive's is {md5sum(archive)} (dvc.lock records it)")
    with atomic_path(args.out) as tmp:
        tmp.mkdir()
        for name in p["archives"]:
            count = safe_extract(archives / f"{name}.zip", tmp / name, int(p["max_extract_gb"] * 10**9), p["max_ratio"])
            print(f"{name}: extracted {count} files into {Path(args.out) / name}")


if __name__ == "__main__":
    run_stage(main)
