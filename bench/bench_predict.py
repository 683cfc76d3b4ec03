"""Benchmark batch labelling against the naive loop, in one run, on the mirror clips.

naive: per file, load the model, compute the features (log-Mel and functionals), run the model
       (and the linear model fused with it) on that one clip (what single-file predict scripts do);
ours:  `ser label` on the whole folder, process start included (default params,
       then --precision float32 and int8: their labels are compared, and scored on the test actors;
       then --speakers none, one pass instead of the default grouping's two (a first over a sample
       of each group's files, grouping.MAX_GROUP_FILES, then every file): what grouping costs;
       then --no-adapt: what adapting the model to the group costs, ser.adaptation).
The targets printed are issue 51's on 2 cores, for the default model or the fast one (no encoder).
Needs a trained model (make repro) at data/model/model.pt; `--model data/model/fast.pt`: make fast's."""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pandas as pd
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
from ser.audio import LogMel, find_audio_files
from ser.corpora import parse_name
from ser.fusion import LinearHead, fused_log_probs, standardise
from ser.models import load_checkpoint

MIRROR = ROOT.parent / "shared/data/ravdess/Audio_Speech_Actors_01-20_16k.zip"
NAIVE_FILES = 200  # the naive loop is timed on a sample: it is the slow one
COPIES = 8  # the scale run labels every clip this many times over (symlinks)
RUNS = 3  # timings on a shared 2-core VM vary by +/-0.5 s; the median of three counts


def naive(paths: list[Path], model_path: Path) -> float:
    start = time.perf_counter()
    for path in paths:
        model, meta = load_checkpoint(model_path)
        logmel, functionals = LogMel(meta["feature_params"]).clip_features(path)  # the labeller's work per clip
        head = LinearHead.from_record(meta["extra"].get("fusion"))
        z = None if head is None else standardise(functionals[None], *head.population)
        with torch.no_grad():
            fused_log_probs(model(torch.from_numpy(logmel)[None]), z, head).exp()
    return len(paths) / (time.perf_counter() - start)


def label(clips: Path, out: Path, model_path: Path, *extra: str) -> float:
    """Seconds for the whole `ser label` command, process start included."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ser", "label", str(clips), "-o", str(out), "--model", str(model_path),
                    *extra], cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def peak_child_rss_mb() -> float:
    """Largest resident memory of any finished child process so far (Linux: kB)."""
    return round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)


def test_actor_accuracy(frame: pd.DataFrame, test_actors: list[int]) -> float:
    """Accuracy on the test actors' clips (labels from the RAVDESS names, for scoring only)."""
    names = frame["path"].map(lambda p: parse_name(Path(p).name))
    rows = names.map(lambda f: f["actor"] in test_actors)
    truth = names[rows].map(lambda f: f["emotion"])
    return float((frame.loc[rows, "emotion"] == truth).mean())


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "data/model/model.pt", help="default: the train stage's")
    model_path = parser.parse_args().model
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    if not model_path.is_file():
        sys.exit(f"bench_predict: no model at {model_path}; run `make repro` (or `make fast`) first")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        zipfile.ZipFile(MIRROR).extractall(tmp / "clips")
        paths = find_audio_files(tmp / "clips")
        naive_rate = naive(paths[:NAIVE_FILES], model_path)
        # the default (precision auto) three times, the median counts; then float32 once
        seconds = sorted(label(tmp / "clips", tmp / "auto.csv", model_path) for _ in range(RUNS))
        float32_seconds = label(tmp / "clips", tmp / "float32.csv", model_path, "--precision", "float32")
        int8_seconds = label(tmp / "clips", tmp / "int8.csv", model_path, "--precision", "int8")
        ungrouped = sorted(label(tmp / "clips", tmp / "none.csv", model_path, "--speakers", "none") for _ in range(RUNS))
        unadapted = sorted(label(tmp / "clips", tmp / "plain.csv", model_path, "--no-adapt") for _ in range(RUNS))
        auto, full, plain, int8 = (pd.read_csv(tmp / f"{name}.csv") for name in ("auto", "float32", "plain", "int8"))
        small_rss = peak_child_rss_mb()
        # Scale and memory: the clips linked COPIES times (9,600 files); memory must not grow
        for copy in range(COPIES):
            (tmp / "many" / str(copy)).mkdir(parents=True)
            for path in paths:
                (tmp / "many" / str(copy) / path.name).symlink_to(path)
        many_seconds = label(tmp / "many", tmp / "many.csv", model_path)
        many_rows = len(pd.read_csv(tmp / "many.csv"))
        many_rss = peak_child_rss_mb()
    median = seconds[len(seconds) // 2]
    test_actors = params["metadata"]["corpora"]["ravdess"]["test_speakers"]
    result = {"files": len(paths), "batch_seconds_runs": [round(s, 2) for s in seconds],
              "batch_files_per_s": round(len(paths) / median, 1),
              "naive_files_per_s": round(naive_rate, 1),
              "speedup": round(len(paths) / median / naive_rate, 1),
              "float32_files_per_s": round(len(paths) / float32_seconds, 1),
              # the default groups all files (statistics in a first pass over a sample, for a speaker model)
              "ungrouped_files_per_s": round(len(paths) / ungrouped[len(ungrouped) // 2], 1),
              "unadapted_files_per_s": round(len(paths) / unadapted[len(unadapted) // 2], 1),
              "test_actor_accuracy_unadapted": round(test_actor_accuracy(plain, test_actors), 4),
              "labels_same_as_float32": round(float((auto["emotion"] == full["emotion"]).mean()), 4),
              "int8_files_per_s": round(len(paths) / int8_seconds, 1),
              "int8_labels_same_as_float32": round(float((int8["emotion"] == full["emotion"]).mean()), 4),
              "test_actor_accuracy_default": round(test_actor_accuracy(auto, test_actors), 4),
              "test_actor_accuracy_float32": round(test_actor_accuracy(full, test_actors), 4),
              "many_files": many_rows, "many_files_per_s": round(many_rows / many_seconds, 1),
              "peak_rss_mb_1200_files": small_rss, "peak_rss_mb_many_files": many_rss}
    print(json.dumps(result, indent=2))
    # issue 51's targets on 2 cores: the default (encoder) model 60 files/s on an AVX2-only CPU, 100 with
    # bfloat16 or AMX units; the fast model (no encoder) 500; peak memory under 1.5 GB
    from ser.device import _native_bfloat16

    fast = load_checkpoint(model_path)[1]["feature_params"].encoder is None
    wanted = 500 if fast else 100 if _native_bfloat16() else 60
    print(f"targets: >= {wanted} files/s ({'met' if result['batch_files_per_s'] >= wanted else 'NOT met'}), "
          f"peak memory < 1,500 MB ({'met' if max(small_rss, many_rss) < 1500 else 'NOT met'})")


if __name__ == "__main__":
    main()
