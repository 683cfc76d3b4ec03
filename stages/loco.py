"""Stage loco (its own pipeline, loco/dvc.yaml; `make loco`): leave-one-corpus-out evaluation of
the train recipe (params `train`): each corpus scored by a model trained on the others only.

    python stages/loco.py --features data/features --metadata data/metadata.parquet \
        --metrics metrics/loco.json --table reports/loco.csv --predictions reports/loco_predictions.csv
"""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from ser.crosscorpus import leave_one_corpus_out
from ser.util import atomic_path, run_stage, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("features", "metadata", "metrics", "table", "predictions"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--overlay", help="a params section whose settings replace the recipe's (fast)")
    args = parser.parse_args()
    params = yaml.safe_load(Path("params.yaml").read_text())
    recipe = {**params["train"], **(params[args.overlay]["recipe"] if args.overlay else {})}  # the recipe under test
    table, summary, predictions = leave_one_corpus_out((args.features, args.metadata), recipe)
    with atomic_path(args.table) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(args.predictions) as tmp:
        predictions.to_csv(tmp, index=False)
    write_json(args.metrics, summary)
    print(f"loco: UAR {summary['uar_mean']:.3f} mean, {summary['uar_min']:.3f} on the hardest corpus left out")


if __name__ == "__main__":
    run_stage(main)
