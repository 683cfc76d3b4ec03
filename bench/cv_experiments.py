"""Ablations scored on the actor folds (the cv stage's protocol), not on one split.

    python bench/cv_experiments.py run NAME [FOLD ...]   # one ablation of experiments.py
    python bench/cv_experiments.py table                 # -> reports/cv_ablations.csv

One test split of 4 actors moves by about 5 points between runs of the same recipe, so
recipe choices are made on the mean over all folds. Each fold's result is saved as it
finishes (data/experiments/cv/<name>/fold<k>.json), so two shells can run different folds
of one ablation at once (THREADS=1 each). `table` lists every ablation whose folds are all
done, with the committed cv stage run (metrics/cv.json) as the default's row.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pandas as pd
import torch
import yaml

from experiments import ABLATIONS, ROOT, RESULTS, apply

from stages.cv import fold_setup, run_fold, summarise  # noqa: E402
from stages.util import atomic_path  # noqa: E402

CV_RESULTS = RESULTS / "cv"
TABLE = ROOT / "reports" / "cv_ablations.csv"


def slug(name: str) -> str:
    return name.replace(" ", "_").replace("/", "_")


def run(name: str, folds_wanted: list[int]) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    recipe = apply(params["train"], ABLATIONS[name])
    folds, classes, n_mels, device = fold_setup(params["cv"], recipe)
    for k in folds_wanted or range(1, len(folds) + 1):
        row = run_fold(params["cv"], recipe, folds, k - 1, classes, n_mels, device)
        row.update(name=name, threads=torch.get_num_threads(), epochs=recipe["epochs"])
        out = CV_RESULTS / slug(name) / f"fold{k}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def table() -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    n_folds = len(fold_setup(params["cv"], params["train"])[0])
    committed = pd.read_csv(ROOT / params["cv"]["table"]).assign(name="default (committed cv stage)")
    rows = [committed]
    for folder in sorted(CV_RESULTS.glob("*")):
        runs = pd.DataFrame([json.loads(f.read_text()) for f in sorted(folder.glob("fold*.json"))])
        if len(runs) == n_folds:
            rows.append(runs.sort_values("fold"))
        else:
            print(f"{folder.name}: {len(runs)} of {n_folds} folds done; not in the table")
    out = []
    for runs in rows:
        s = summarise(runs, params["cv"]["fold_size"], [])
        out.append({"name": runs["name"].iloc[0],
                    **{f"{m}_{stat}": s[f"test_{m}_{stat}"] for m in ("accuracy", "uar", "macro_f1")
                       for stat in ("mean", "std")},
                    "fold_accuracies": " ".join(f"{a:.3f}" for a in runs["test_accuracy"]),
                    "train_minutes": s["train_minutes_total"]})
    frame = pd.DataFrame(out)
    with atomic_path(TABLE) as tmp:
        frame.to_csv(tmp, index=False)
    print(f"{TABLE.relative_to(ROOT)}:\n{frame.to_string(index=False)}")


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "run" and sys.argv[2] in ABLATIONS:
        torch.set_num_threads(int(os.environ.get("THREADS", torch.get_num_threads())))
        return run(sys.argv[2], [int(k) for k in sys.argv[3:]])
    if sys.argv[1:] == ["table"]:
        return table()
    sys.exit(__doc__ + f"\nablations: {', '.join(ABLATIONS)}")


if __name__ == "__main__":
    main()
