"""Benchmark the labeller on hostile inputs: peak memory and how fast Ctrl-C stops it.

1. Peak RSS of `ser label` (main process and workers) on the hostile files of
   bench/hostile.py (a FLAC header claiming 2^36 frames, a WAV at 1 Hz, 3 hours of silence),
   against the same run on one ordinary clip: a header must not decide the memory bill.
2. Ctrl-C (SIGINT to the process group, as a terminal sends it) at 7 moments of labelling
   400 clips of 30 s: seconds until the labeller has exited, workers left, exit code.
Uses an untrained model of the default feature params (speed and memory only).
Run from the project root: python -m bench.bench_hostile"""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import yaml

from bench.hostile import as_in_a_terminal, descendants, gone, make_hostile_folder, peak_rss_mb

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(path: Path) -> Path:
    from ser.audio import FeatureParams
    from ser.corpora import EMOTIONS
    from ser.models import build_model, save_checkpoint

    fp = FeatureParams.from_dict(yaml.safe_load((ROOT / "params.yaml").read_text())["features"])
    arch = {"channels": [4, 8], "batch_norm": True, "block_dropout": 0.0, "head_dropout": 0.1, "head_hidden": 8}
    save_checkpoint(path, build_model(arch, fp.n_mels, len(EMOTIONS)), arch, EMOTIONS, fp, extra={})
    return path


def interrupt_once(folder: Path, model: Path, out: Path, delay_s: float) -> tuple[float, int, int]:
    proc = subprocess.Popen([sys.executable, "-m", "ser", "label", str(folder), "-o", str(out), "--model",
                             str(model), "--jobs", "2"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, preexec_fn=as_in_a_terminal)
    time.sleep(delay_s)
    workers = descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)
    sent = time.perf_counter()
    proc.wait(timeout=60)
    stopped = time.perf_counter() - sent
    time.sleep(0.5)
    return stopped, sum(not gone(pid) for pid in workers), proc.returncode


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tiny_model(tmp / "model.pt")
        hostile = make_hostile_folder(tmp / "hostile")
        print("hostile files:", ", ".join(f"{p.name} {p.stat().st_size / 1e3:.0f} kB "
                                         f"({sf.info(str(p)).frames} frames at {sf.info(str(p)).samplerate} Hz)"
                                         for p in hostile))
        ordinary = tmp / "ordinary" / "clip.wav"
        ordinary.parent.mkdir()
        sf.write(str(ordinary), (0.1 * np.random.default_rng(0).standard_normal(48000)).astype(np.float32), 16000)
        for name, folder in (("one ordinary 3 s clip", ordinary.parent), ("the hostile files", tmp / "hostile")):
            rss, rc, seconds = peak_rss_mb(["label", str(folder), "-o", str(tmp / "o.csv"), "--model", str(model)])
            print(f"peak RSS labelling {name}: {rss:.0f} MB (exit {rc}, {seconds:.1f} s)")

        many = tmp / "many"
        many.mkdir()
        for i in range(400):
            sf.write(str(many / f"{i:04d}.wav"), (0.1 * np.random.default_rng(i).standard_normal(240000)
                                                  ).astype(np.float32), 8000)
        out = tmp / "labels.csv"
        previous = "previous\n"
        out.write_text(previous)
        trials = [interrupt_once(many, model, out, delay) for delay in (1.0, 1.7, 2.4, 3.1, 3.8, 4.5, 5.2)]
        stops = [t[0] for t in trials]
        print(f"Ctrl-C: stopped in {min(stops):.2f}-{max(stops):.2f} s (median {np.median(stops):.2f}) over "
              f"{len(trials)} tries; exit codes {sorted({t[2] for t in trials})}; workers left "
              f"{sum(t[1] for t in trials)}; previous output intact: {out.read_text() == previous}")
    print(f"cpu: {os.cpu_count()} cores; peak RSS of this bench process "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
