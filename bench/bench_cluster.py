"""Benchmark cluster labelling (Dask) against the local labeller on the same cores.

    python bench/bench_cluster.py [--model data/model/model.pt] [--runs 3] [--copies 4]

On the RAVDESS mirror's 1,200 clips (about 3.7 s each) and on 4,800 (them linked 4 times):
the local `ser label` (2 worker processes) against `ser label --cluster` on a LocalCluster
of 1 and of 2 worker processes (one thread each) on 127.0.0.1, every command timed whole
(process start included), and the marginal rate that a big run tends to; the cluster's
workers are warm (started, model loaded by a first run), as a team's long-lived cluster
would be. Labels are compared; the per-file overhead of the cluster path is the 1-worker
time per file less the same shards labelled in one process; and the figures give an
estimate for a million 4-second clips. Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
MIRROR = ROOT.parent / "shared/data/ravdess/Audio_Speech_Actors_01-20_16k.zip"
RUNS = 3  # the median of three: a shared 2-core VM varies by ~25% within an hour
COPIES = 4  # the big set: 4,800 files


def timings(sets: dict[str, tuple[Path, int]], tmp: Path, model: Path, extra: list[str], runs: int = RUNS
            ) -> dict[str, float]:
    """Whole-command files/s on the small and big sets (median of RUNS each), and the
    marginal rate: the extra files over the extra seconds, which the fixed start-up
    (interpreter, imports, connecting, the workers' first model load) does not count in."""
    seconds = {name: median([label(folder, tmp / f"{name}.csv", model, *extra) for _ in range(runs)])
               for name, (folder, _) in sets.items()}
    (_, small), (_, big) = sets["small"], sets["big"]
    return {"small_files_per_s": round(small / seconds["small"], 1), "big_files_per_s": round(big / seconds["big"], 1),
            "startup_s": round(seconds["small"] - small * (seconds["big"] - seconds["small"]) / (big - small), 2),
            "marginal_files_per_s": round((big - small) / (seconds["big"] - seconds["small"]), 1)}


def label(clips: Path, out: Path, model: Path, *extra: str) -> float:
    """Seconds for one whole `ser label` command."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ser", "label", str(clips), "-o", str(out), "--model", str(model), *extra],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def in_one_process(clips: Path, model: Path) -> float:
    """Seconds to label the clips shard by shard in this process, warm (the work a cluster
    worker does, without the cluster)."""
    import dataclasses

    import torch

    from ser.labeller.cluster import FILES_PER_SHARD
    from ser.labeller.loop import label_rows
    from ser.labeller.reading import collect_inputs
    from ser.labeller.settings import DEFAULTS
    from ser.trained import TrainedModel

    torch.set_num_threads(1)
    paths = collect_inputs([str(clips)])
    trained = TrainedModel.load(model)
    settings = dataclasses.replace(DEFAULTS, n_jobs=1)
    label_rows(paths[:FILES_PER_SHARD], trained, settings)  # warm
    start = time.perf_counter()
    for i in range(0, len(paths), FILES_PER_SHARD):
        label_rows(paths[i : i + FILES_PER_SHARD], trained, settings)
    return time.perf_counter() - start


def main() -> None:
    from distributed import LocalCluster

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "data/model/model.pt"))
    parser.add_argument("--runs", type=int, default=RUNS, help="timings per set, the median counts")
    parser.add_argument("--copies", type=int, default=COPIES, help="the big set: the clips linked this many times")
    args = parser.parse_args()
    model = Path(args.model)
    if not model.is_file():
        sys.exit(f"bench_cluster: no model at {model}; run `make repro` first")
    result: dict[str, object] = {"cpu_cores": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        zipfile.ZipFile(MIRROR).extractall(tmp / "clips")
        clips = sorted((tmp / "clips").rglob("*.wav"))
        for copy in range(args.copies):  # the big set: the clips linked this many times
            (tmp / "many" / str(copy)).mkdir(parents=True)
            for path in clips:
                (tmp / "many" / str(copy) / f"{path.parent.name}-{path.name}").symlink_to(path)
        sets = {"small": (tmp / "clips", len(clips)), "big": (tmp / "many", args.copies * len(clips))}
        result["files"] = {name: n for name, (_, n) in sets.items()}
        result["local"] = timings(sets, tmp, model, [], args.runs)
        reference = pd.read_csv(tmp / "small.csv")
        for workers in (1, 2):
            with LocalCluster(n_workers=workers, threads_per_worker=1, host="127.0.0.1",
                              dashboard_address="127.0.0.1:0", silence_logs=40) as cluster:
                address = ["--cluster", cluster.scheduler_address]
                label(tmp / "clips", tmp / "cold.csv", model, *address)  # workers import torch, load the model
                result[f"cluster_{workers}_workers"] = timings(sets, tmp, model, address, args.runs)
            labels = pd.read_csv(tmp / "small.csv")
            result[f"cluster_{workers}_workers"]["labels_same_as_local"] = round(
                float((labels["emotion"] == reference["emotion"]).mean()), 4)
        serial = in_one_process(tmp / "clips", model)
    one, two, local = (result[k]["marginal_files_per_s"] for k in ("cluster_1_workers", "cluster_2_workers", "local"))
    result["one_process_files_per_s"] = round(len(clips) / serial, 1)
    result["cluster_overhead_ms_per_file"] = round(1000 * (1 / one - serial / len(clips)), 2)
    result["two_workers_vs_local_marginal"] = round(two / local, 3)
    result["two_workers_vs_local_whole_command_big"] = round(
        result["cluster_2_workers"]["big_files_per_s"] / result["local"]["big_files_per_s"], 3)
    result["estimate_1m_clips"] = {"core_hours": round(1e6 / (two / 2) / 3600, 1),
                                   "hours_on_10_machines_of_2_cores": round(1e6 / (two * 10) / 3600, 2)}
    print(json.dumps(result, indent=2))
    print(f"target: 2 cluster workers within 15% of the local labeller "
          f"({'met' if result['two_workers_vs_local_marginal'] >= 0.85 else 'NOT met'}, files per second "
          f"beyond the fixed start-up)")


if __name__ == "__main__":
    main()
