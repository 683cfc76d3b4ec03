"""Scoring a trained model on the test speakers: the figures of metrics/eval.json.

Everything here takes what the evaluate stage loaded (the model, the test clips' features,
classes and metadata) and returns plain numbers, so it can be checked on a tiny case."""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ser.adaptation import adapted_probs
from ser.calibration import UNCERTAIN_BELOW, expected_calibration_error, soften
from ser.metrics import balanced_share, confusion_matrix, group_accuracy, scores_from_confusion
from ser.trained import TrainedModel, scored_probs
from ser.training import apply_statistics, grouped_functionals, grouped_statistics, grouping_keys, input_statistics


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


def confidence_figures(probs: np.ndarray, y: np.ndarray, temperature: float | None,
                       unseen_temperature: float = 1.0) -> dict[str, Any]:
    """How far the (calibrated) probabilities are to be trusted on the test speakers: ECE,
    and the share and accuracy of the clips flagged uncertain (confidence < UNCERTAIN_BELOW);
    and the ECE of the labeller's default, softened for corpora never heard (too unsure here,
    on speakers of the corpora it trained on)."""
    uncertain = probs.max(axis=1) < UNCERTAIN_BELOW
    correct = probs.argmax(axis=1) == y
    return {"temperature": temperature, "test_ece": expected_calibration_error(probs, y),
            "unseen_temperature": unseen_temperature,
            "test_ece_softened": expected_calibration_error(soften(probs, unseen_temperature), y),
            "uncertain_share": float(uncertain.mean()),
            "accuracy_when_certain": float(correct[~uncertain].mean()) if (~uncertain).any() else None,
            "accuracy_when_uncertain": float(correct[uncertain].mean()) if uncertain.any() else None}


ADAPTED = ("adapted_speaker", "adapted_corpus")  # the model adapted to each speaker / to each corpus's test clips


def by_grouping(trained: TrainedModel, raw: tuple, functionals: np.ndarray, batch_size: int) -> dict[str, Any]:
    """A speaker-normalised model's test figures when the labeller knows less than who is who:
    each corpus's test clips as one group (a flat folder), each clip alone, the average training
    speaker (population, when the model file has it): accuracy, UAR and the most predicted class
    on a balanced set; and by speaker and as one folder with the model adapted to each group
    (ser.adaptation). `raw`: the test clips' (features as written, class indices, clips)."""
    classes, extra, head, device = trained.classes, trained.extra, trained.head, trained.device
    if not trained.by_speaker:
        return {}
    x, y, clips = raw
    population = tuple(map(torch.tensor, extra["population"])) if "population" in extra else None
    result = {}
    groupings = ("corpus", "clip") + (("population",) if population is not None else ()) + ADAPTED
    for grouping in groupings:
        keys = grouping.removeprefix("adapted_")
        stats = grouped_statistics(x, clips, keys, population)
        z = grouped_functionals(functionals, clips, keys, head)
        if grouping in ADAPTED:
            probs = adapted_probs(trained.network, head, trained.temperature or 1.0, apply_statistics(x, stats), z,
                                  grouping_keys(clips, keys), batch_size, device)
        else:
            probs = scored_probs(trained.inference, head, apply_statistics(x, stats), z, batch_size, device)
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


def score_test_speakers(trained: TrainedModel, raw: torch.Tensor, y: torch.Tensor, clips: pd.DataFrame,
                        functionals: np.ndarray | None, batch_size: int
                        ) -> tuple[dict[str, Any], pd.DataFrame, np.ndarray, np.ndarray]:
    """(metrics, one row per test clip with its calibrated probabilities, confusion matrix,
    probabilities) of the model on the test clips: `raw` their features as written, `y` their
    class indices, `clips` their metadata, `functionals` theirs (a fused model's) or None."""
    classes, head = trained.classes, trained.head
    # a speaker-normalised model hears each test speaker relative to that speaker's own clips
    x = apply_statistics(raw, input_statistics(raw, clips, trained.normalisation))
    logits = scored_probs(trained.inference, head, x, grouped_functionals(functionals, clips, "speaker", head),
                          batch_size, trained.device)
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
        **confidence_figures(probs, y.numpy(), trained.temperature, trained.unseen_temperature),
        "by_grouping": by_grouping(trained, (raw, y, clips), functionals, batch_size),
    }
    return metrics, frame, cm, probs
