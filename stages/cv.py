"""Stage cv (its own pipeline, cv/dvc.yaml; `make cv`): speaker-fold cross-validation of the
train recipe (params `train`), every fold tested on speakers it never trained on: RAVDESS actor
folds (cv.folds: actors) or folds of every corpus's non-test speakers (speakers; ser.crossval).

    python stages/cv.py --features data/features --metadata data/metadata.parquet \
        --train-model data/model/model.pt --metrics metrics/cv.json --table reports/cv_folds.csv \
        --predictions reports/cv_predictions.csv
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import yaml

from ser.crossval import cross_validate, cv_folds
from ser.util import atomic_path, run_stage, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("features", "metadata", "train-model", "metrics", "table", "predictions"):
        parser.add_argument(f"--{name}", required=True)
    args = parser.parse_args()
    params = yaml.safe_load(Path("params.yaml").read_text())
    cv, recipe = params["cv"], params["train"]  # the recipe under test: cv depends on all of train
    folds = cv_folds(pd.read_parquet(args.metadata), cv["folds"], cv["fold_size"], cv["n_folds"])
    table, summary, predictions = cross_validate((args.features, args.metadata), recipe, folds, cv["n_jobs"],
                                                 train_model=args.train_model)
    summary = {"scheme": cv["folds"], **summary}
    with atomic_path(args.table) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(args.predictions) as tmp:
        predictions.to_csv(tmp, index=False)
    write_json(args.metrics, summary)
    print(f"cv: accuracy {summary['test_accuracy_mean']:.3f} +/- {summary['test_accuracy_std']:.3f}, "
          f"UAR {summary['test_uar_mean']:.3f} +/- {summary['test_uar_std']:.3f} over {summary['folds']} folds; "
          + ", ".join(f"{c} {s['accuracy']:.3f}" for c, s in summary["by_corpus"].items()))


if __name__ == "__main__":
    run_stage(main)
