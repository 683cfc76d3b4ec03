"""Stage evaluate: score the trained model on the test speakers only (never seen in training):
metrics JSON (per corpus, and how well calibrated), confusion-matrix and reliability data for
`dvc plots`, and a PNG.

    python stages/evaluate.py --model data/model/model.pt --features data/features \
        --metadata data/metadata.parquet --metrics metrics/eval.json \
        --predictions reports/test_predictions.csv --confusion reports/confusion_matrix.png \
        --reliability reports/reliability.csv
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import yaml

from ser.adaptation import adapted_probs, unscaled
from ser.calibration import UNCERTAIN_BELOW, expected_calibration_error, reliability
from ser.metrics import confusion_matrix, group_accuracy, plot_confusion, round_floats, scores_from_confusion
from ser.crosscorpus import balanced_share
from ser.features import load_functionals
from ser.fusion import LinearHead
from ser.models import load_checkpoint
from ser.training import (apply_statistics, grouped_functionals, grouped_statistics, grouping_keys, input_statistics,
                          load_raw, scored_probs)
from ser.util import UserError, atomic_path, pick_device, run_stage, write_json


def per_corpus(frame: pd.DataFrame, classes: list[str]) -> dict[str, dict[str, float]]:
    """Accuracy, UAR and macro F1 on each corpus's test speakers (over the classes it has)."""
    result = {}
    for corpus, rows in frame.groupby("corpus"):
        cm = confusion_matrix(rows["actual"].map(classes.index).to_numpy(),
                              rows["predicted"].map(classes.index).to_numpy(), len(classes))
        scores = scores_from_confusion(cm, classes)
        result[corpus] = {"accuracy": scores["accuracy"], "uar": scores["uar"], "macro_f1": scores["macro_f1"],
                          "clips": int(len(rows))}
    return result


def confidence_figures(probs: np.ndarray, y: np.ndarray, temperature: float | None) -> dict[str, Any]:
    """How far the (calibrated) probabilities are to be trusted on the test speakers: ECE,
    and the share and accuracy of the clips flagged uncertain (confidence < UNCERTAIN_BELOW)."""
    uncertain = probs.max(axis=1) < UNCERTAIN_BELOW
    correct = probs.argmax(axis=1) == y
    return {"temperature": temperature, "test_ece": expected_calibration_error(probs, y),
            "uncertain_share": float(uncertain.mean()),
            "accuracy_when_certain": float(correct[~uncertain].mean()) if (~uncertain).any() else None,
            "accuracy_when_uncertain": float(correct[uncertain].mean()) if uncertain.any() else None}


ADAPTED = ("adapted_speaker", "adapted_corpus")  # the model adapted to each speaker / to each corpus's test clips


def by_grouping(model, trainable, meta: dict[str, Any], raw: tuple, functionals: np.ndarray, batch_size: int,
                device) -> dict[str, Any]:
    """A speaker-normalised model's test figures when the labeller knows less than who is who:
    each corpus's test clips as one group (a flat folder), each clip alone, the average training
    speaker (population, when the model file has it): accuracy, UAR and the most predicted class
    on a balanced set; and by speaker and as one folder with the model adapted to each group
    (ser.adaptation; `trainable`: the model loaded unfused). `raw`: the test clips' (features as
    written, class indices, clips)."""
    classes, extra = meta["classes"], meta["extra"]
    if extra.get("normalisation") != "speaker":
        return {}
    x, y, clips = raw
    head = LinearHead.from_record(extra.get("fusion"))
    population = tuple(map(torch.tensor, extra["population"])) if "population" in extra else None
    result = {}
    groupings = ("corpus", "clip") + (("population",) if population is not None else ()) + ADAPTED
    for grouping in groupings:
        keys = grouping.removeprefix("adapted_")
        stats = grouped_statistics(x, clips, keys, population)
        z = grouped_functionals(functionals, clips, keys, head)
        if grouping in ADAPTED:
            inner, temperature = unscaled(trainable)
            probs = adapted_probs(inner, head, temperature, apply_statistics(x, stats), z,
                                  grouping_keys(clips, keys), batch_size, device)
        else:
            probs = scored_probs(model, head, apply_statistics(x, stats), z, batch_size, device)
        predicted = probs.argmax(1).numpy()
        cm = confusion_matrix(y.numpy(), predicted, len(classes))
        scores, share = scores_from_confusion(cm, classes), balanced_share(cm)
        correct = predicted == y.numpy()
        result[grouping] = {"accuracy": scores["accuracy"], "uar": scores["uar"],
                            "ece": expected_calibration_error(probs.exp().numpy(), y.numpy()),
                            "most_predicted_balanced": f"{classes[int(share.argmax())]} {share.max():.0%}",
                            "accuracy_per_corpus": {c: float(correct[(clips["corpus"] == c).to_numpy()].mean())
                                                    for c in sorted(clips["corpus"].unique())}}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("model", "features", "metadata", "metrics", "predictions", "confusion", "reliability"):
        parser.add_argument(f"--{name}", required=True)
    args = parser.parse_args()
    p = yaml.safe_load(Path("params.yaml").read_text())["evaluate"]
    device = pick_device(p["device"])
    model, meta = load_checkpoint(args.model, device)
    trainable, _ = load_checkpoint(args.model, "cpu", fuse=False)  # to adapt (ser.adaptation)
    classes = meta["classes"]
    raw, y, clips = load_raw(args.features, args.metadata, classes, split="test")
    if len(raw) == 0:
        raise UserError("evaluate: no test clips; set metadata.test_actors")
    # a speaker-normalised model hears each test speaker relative to that speaker's own clips
    x = apply_statistics(raw, input_statistics(raw, clips, meta["extra"].get("normalisation", "clip")))
    head, functionals = LinearHead.from_record(meta["extra"].get("fusion")), None
    if head is not None:  # the linear model on the speakers' standardised functionals, fused (ser.fusion)
        functionals = load_functionals(args.features, clips["path"])
    logits = scored_probs(model, head, x, grouped_functionals(functionals, clips, "speaker", head),
                          p["batch_size"], device)
    probs, predicted = logits.softmax(dim=1).numpy(), logits.argmax(1).numpy()
    cm = confusion_matrix(y.numpy(), predicted, len(classes))
    frame = clips[["path", "corpus", "speaker", "sex", "intensity"]].assign(
        actual=[classes[i] for i in y.numpy()], predicted=[classes[i] for i in predicted],
        **{f"prob_{c}": probs[:, i].round(5) for i, c in enumerate(classes)})
    scores = scores_from_confusion(cm, classes)
    metrics = {
        "test_accuracy": scores["accuracy"], "test_uar": scores["uar"], "test_macro_f1": scores["macro_f1"],
        "test_loss": float(F.cross_entropy(logits, y).item()),
        "test_clips": int(len(y)),
        "test_actors": sorted(int(a) for a in clips["actor"].dropna().unique()),
        "test_speakers": sorted(clips["speaker"].unique()),
        "accuracy_by_sex": group_accuracy(frame, "sex"),
        "accuracy_by_intensity": group_accuracy(frame, "intensity"),
        "per_class": scores["per_class"],
        "per_corpus": per_corpus(frame, classes),
        **confidence_figures(probs, y.numpy(), meta["extra"].get("temperature")),
        "by_grouping": by_grouping(model, trainable, meta, (raw, y, clips), functionals, p["batch_size"], device),
    }
    write_json(args.metrics, round_floats(metrics))
    with atomic_path(args.reliability) as tmp:
        pd.DataFrame(reliability(probs, y.numpy())).to_csv(tmp, index=False)
    with atomic_path(args.predictions) as tmp:  # calibrated probabilities too: e.g. to score a fusion
        frame[["path", "corpus", "actual", "predicted"] + [f"prob_{c}" for c in classes]].to_csv(tmp, index=False)
    title = (f"Test speakers of {', '.join(metrics['per_corpus'])}: accuracy {scores['accuracy']:.1%}, "
             f"UAR {scores['uar']:.1%}")
    plot_confusion(cm, classes, title, args.confusion)
    print(f"evaluate: {title} ({len(y)} clips)")


if __name__ == "__main__":
    run_stage(main)
