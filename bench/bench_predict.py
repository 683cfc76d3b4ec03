"""Benchmark batch labelling against the naive loop, in one run, on the mirror clips.

naive: per file, load the model, compute the features, run the model on that one clip
       (what single-file predict scripts do);
ours:  `python -m stages.predict` on the whole folder, process start included.
Needs a trained model (make repro) at predict.model."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from stages.audio import LogMel, find_audio_files  # noqa: E402
from stages.models import load_checkpoint  # noqa: E402

MIRROR = ROOT.parent / "shared/data/ravdess/Audio_Speech_Actors_01-20_16k.zip"
NAIVE_FILES = 100  # the naive loop is timed on a sample: it is the slow one


def naive(paths: list[Path], model_path: Path) -> float:
    start = time.perf_counter()
    for path in paths:
        model, meta = load_checkpoint(model_path)
        x = torch.from_numpy(LogMel(meta["feature_params"]).from_file(path))[None]
        with torch.no_grad():
            torch.softmax(model(x), dim=1)
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    model_path = ROOT / yaml.safe_load((ROOT / "params.yaml").read_text())["predict"]["model"]
    if not model_path.is_file():
        sys.exit(f"bench_predict: no model at {model_path}; run `make repro` first")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        zipfile.ZipFile(MIRROR).extractall(tmp / "clips")
        paths = find_audio_files(tmp / "clips")
        naive_rate = naive(paths[:NAIVE_FILES], model_path)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "stages.predict", str(tmp / "clips"), "-o", str(tmp / "out.csv"),
                        "--model", str(model_path)], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
    result = {"files": len(paths), "batch_seconds": round(seconds, 1),
              "batch_files_per_s": round(len(paths) / seconds, 1),
              "naive_files_per_s": round(naive_rate, 1),
              "speedup": round(len(paths) / seconds / naive_rate, 1)}
    print(json.dumps(result, indent=2))
    print(f"targets: >= 10x naive ({'met' if result['speedup'] >= 10 else 'NOT met'}), "
          f">= 150 files/s ({'met' if result['batch_files_per_s'] >= 150 else 'NOT met'})")


if __name__ == "__main__":
    main()
