"""Stage evaluate: score the trained model on the test speakers only (never seen in training):
metrics JSON (per corpus, and how well calibrated), confusion-matrix and reliability data for
`dvc plots`, and a PNG (the figures: ser.evaluation).

    python stages/evaluate.py --model data/model/model.pt --features data/features \
        --metadata data/metadata.parquet --metrics metrics/eval.json \
        --predictions reports/test_predictions.csv --confusion reports/confusion_matrix.png \
        --reliability reports/reliability.csv
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import yaml

from ser.calibration import reliability
from ser.evaluation import score_test_speakers
from ser.features import load_functionals
from ser.metrics import plot_confusion, round_floats
from ser.trained import TrainedModel
from ser.training import load_raw
from ser.device import pick_device
from ser.util import UserError, atomic_path, run_stage, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("model", "features", "metadata", "metrics", "predictions", "confusion", "reliability"):
        parser.add_argument(f"--{name}", required=True)
    args = parser.parse_args()
    p = yaml.safe_load(Path("params.yaml").read_text())["evaluate"]
    device = pick_device(p["device"])
    trained = TrainedModel.load(args.model, device)
    classes = trained.classes
    raw, y, clips = load_raw(args.features, args.metadata, classes, split="test")
    if len(raw) == 0:
        raise UserError("evaluate: no test clips; set metadata.test_actors")
    # a linear model's input: the speakers' standardised functionals (ser.fusion)
    functionals = (load_functionals(args.features, clips["path"], encoder=trained.feature_params.encoder is not None)
                   if trained.head else None)
    metrics, frame, cm, probs = score_test_speakers(trained, raw, y, clips, functionals, p["batch_size"])
    write_json(args.metrics, round_floats(metrics))
    with atomic_path(args.reliability) as tmp:
        pd.DataFrame(reliability(probs, y.numpy())).to_csv(tmp, index=False)
    with atomic_path(args.predictions) as tmp:  # calibrated probabilities too: e.g. to score a fusion
        frame[["path", "corpus", "actual", "predicted"] + [f"prob_{c}" for c in classes]].to_csv(tmp, index=False)
    title = (f"Test speakers of {', '.join(metrics['per_corpus'])}: accuracy {metrics['test_accuracy']:.1%}, "
             f"UAR {metrics['test_uar']:.1%}")
    plot_confusion(cm, classes, title, args.confusion)
    print(f"evaluate: {title} ({len(y)} clips)")


if __name__ == "__main__":
    run_stage(main)
