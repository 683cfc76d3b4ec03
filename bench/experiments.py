"""Arch comparison and ablations on the pipeline's speaker-independent split.

    python bench/experiments.py archs [NAME ...]      # train each train.archs entry
    python bench/experiments.py ablations [NAME ...]  # the default recipe with one change each
    python bench/experiments.py table                 # collect results -> reports/*.csv

Each run trains with params.yaml's `train` section plus one change, chooses its checkpoint
on the val actors and is scored once on the test actors (metadata.val/test_actors). Results
go to data/experiments/<kind>/<name>.json as they finish (two shells can run different
names at once; THREADS=1 each), and `table` writes reports/arch_comparison.csv and
reports/ablations.csv from them. Needs `make repro` first (features and metadata).
"""
from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from stages.evaluate import confusion_matrix, scores_from_confusion  # noqa: E402
from stages.models import infer, load_checkpoint  # noqa: E402
from stages.train import load_split, train  # noqa: E402
from stages.util import atomic_path  # noqa: E402

RESULTS = ROOT / "data" / "experiments"
TABLES = {"archs": ROOT / "reports" / "arch_comparison.csv", "ablations": ROOT / "reports" / "ablations.csv"}

# Single-split runs choose their checkpoint on the val actors and are scored on the test
# actors, as every row of the committed tables was (the default until train.selection
# refit won on the actor folds), so the rows stay comparable; an ablation may override it.
# Each row is one model (the default's 3-seed ensemble came later), at one training's cost.
SPLIT_BASE = {"selection": "best_val", "ensemble_seeds": 1}
# One change each to the default train params (nested keys; "arch.*" = the default arch's settings).
ABLATIONS: dict[str, dict[str, Any]] = {
    "default": {},
    "no SpecAugment": {"augment.n_freq_masks": 0, "augment.n_time_masks": 0},
    "no time shift": {"augment.time_shift_frames": 0},
    "mixup 0.2": {"mixup_alpha": 0.2},
    "speed perturbation 0.1": {"augment.speed": 0.1},
    "no label smoothing": {"label_smoothing": 0.0},
    "no per-utterance normalisation": {"arch.utterance_norm": False},
    "delta features": {"arch.deltas": True},
    "attention pooling": {"arch.pooling": "attention"},
    "mel bands averaged (freq_pool mean)": {"arch.freq_pool": "mean"},
    "no BatchNorm recalibration": {"bn_calibration_clips": 0},
    "ensemble of 4 folds": {"ensemble_folds": 4},
    "float32 training": {"precision": "float32"},
    "bfloat16 training": {"precision": "bfloat16"},
    "100 epochs": {"epochs": 100},
    "150 epochs": {"epochs": 150},
    "seed 43": {"seed": 43},
    "seed 44": {"seed": 44},
    "refit on train+val actors": {"selection": "refit"},
}


def apply(p: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    p = copy.deepcopy(p)
    for dotted, value in change.items():
        keys = dotted.split(".")
        in_arch = keys[0] == "arch" and len(keys) > 1  # "arch.x": the chosen arch's setting x
        node = p["archs"][p["arch"]] if in_arch else p
        keys = keys[1:] if in_arch else keys
        for key in keys[:-1]:
            node = node[key]
        if keys[-1] not in node:
            raise KeyError(f"unknown train param {dotted}")
        node[keys[-1]] = value
    return p


def run(kind: str, name: str, p: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        p = {**p, "model_out": f"{tmp}/model.pt", "history": f"{tmp}/history.csv", "metrics": f"{tmp}/train.json"}
        start = time.perf_counter()
        summary = train(p)
        minutes = (time.perf_counter() - start) / 60
        model, meta = load_checkpoint(p["model_out"])
        x, y, _ = load_split(p["features_dir"], p["metadata"], meta["classes"], "test")
        predicted = infer(model, x, 64, "cpu").argmax(1).numpy()
    scores = scores_from_confusion(confusion_matrix(y.numpy(), predicted, len(meta["classes"])), meta["classes"])
    return {"name": name, "arch": p["arch"], "parameters": summary["parameters"],
            "val_accuracy": summary["val_accuracy"], "test_accuracy": round(scores["accuracy"], 4),
            "test_uar": round(scores["uar"], 4), "test_macro_f1": round(scores["macro_f1"], 4),
            "best_epochs": " ".join(str(m["best_epoch"]) for m in summary["per_member"]),
            "train_minutes": round(minutes, 1), "threads": torch.get_num_threads(), "precision": p["precision"], "epochs": p["epochs"],
            "source": "bench/experiments.py"}


def write_table(fresh: pd.DataFrame, path: Path, order: list[str] | None = None) -> pd.DataFrame:
    """Write `path` with the fresh rows, keeping the committed rows of every name not rerun
    here: results live under data/ (not in git), so a fresh clone that reruns one ablation
    must not drop the measured rows of the others."""
    frame = fresh
    if path.exists():
        kept = pd.read_csv(path)
        frame = pd.concat([kept[~kept["name"].isin(fresh["name"])], fresh], ignore_index=True)
    if order:
        frame = frame.sort_values("name", key=lambda s: s.map({n: i for i, n in enumerate(order)}), kind="stable")
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return frame


def table() -> None:
    for kind, path in TABLES.items():
        rows = [json.loads(f.read_text()) for f in sorted((RESULTS / kind).glob("*.json"))]
        if rows:
            frame = write_table(pd.DataFrame(rows), path, list(ABLATIONS) if kind == "ablations" else None)
            print(f"{path.relative_to(ROOT)}:\n{frame.to_string(index=False)}\n")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("archs", "ablations", "table"):
        sys.exit(__doc__)
    if sys.argv[1] == "table":
        return table()
    torch.set_num_threads(int(os.environ.get("THREADS", torch.get_num_threads())))
    kind = sys.argv[1]
    base = apply(yaml.safe_load((ROOT / "params.yaml").read_text())["train"], SPLIT_BASE)
    configs = ({name: {"arch": name} for name in base["archs"]} if kind == "archs" else ABLATIONS)
    names = sys.argv[2:] or list(configs)
    for name in names:
        change = configs[name]
        p = {**base, **change} if kind == "archs" else apply(base, change)
        result = run(kind, name, p)
        out = RESULTS / kind / f"{name.replace(' ', '_').replace('/', '_')}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result) + "\n")
        print(json.dumps(result), flush=True)
    table()


if __name__ == "__main__":
    main()
