"""Benchmark the features stage on the 1,200 mirror clips: steady-state clips/s for
n_jobs=1 and 2 (after a warm-up that loads files into the page cache and starts the
workers), and the wall time of the whole stage (`python stages/features.py`, process and
worker start included)."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
from ser.audio import FeatureParams
from ser.features import build
from ser.corpora import collect, write_parquet

MIRROR = ROOT.parent / "shared/data/ravdess/Audio_Speech_Actors_01-20_16k.zip"


def main() -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    fp = FeatureParams.from_dict(params["features"])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        zipfile.ZipFile(MIRROR).extractall(tmp / "data/raw")
        clips, _ = collect(tmp / "data/raw", [])
        paths = clips["path"].tolist()
        rates = {}
        for n in (1, 2):
            build(paths[:128], fp, tmp / "warm", n_jobs=n)  # page cache, imports, worker start
            rates[n] = build(paths, fp, tmp / f"f{n}", n_jobs=n)[0]
        # whole stage, as DVC runs it, in a scratch project with the same params
        (tmp / "params.yaml").write_text(yaml.safe_dump(params))
        write_parquet(clips.assign(path=[str(Path(p).relative_to(tmp)) for p in paths]),
                      tmp / "data/metadata.parquet")
        start = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "stages/features.py"), "--metadata", "data/metadata.parquet",
                        "--out", "data/features"], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stage_s = time.perf_counter() - start
    result = {
        "clips": len(paths),
        "clips_per_s_n_jobs_1": round(rates[1], 1),
        "clips_per_s_n_jobs_2": round(rates[2], 1),
        "speedup_2_vs_1": round(rates[2] / rates[1], 2),
        "stage_seconds_n_jobs_all": round(stage_s, 1),
    }
    print(json.dumps(result, indent=2))
    print(f"target: speedup >= 1.7 ({'met' if result['speedup_2_vs_1'] >= 1.7 else 'NOT met'}), "
          f"stage < 30 s ({'met' if stage_s < 30 else 'NOT met'})")


if __name__ == "__main__":
    main()
