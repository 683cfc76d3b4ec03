"""Leave-one-corpus-out evaluation: for each corpus, train the recipe on all the others and
score it on the one left out, which it has never heard (other speakers, studio, microphones,
sometimes language). The honest figure for recordings from elsewhere.

Scores are on the classes both sides share: those of the left-out corpus that the training
corpora have too (TESS has no calm; without RAVDESS nothing trains calm), the model's choice
made among those alone; clips of other classes are counted, not scored.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
import torch

from ser import features as feature_store
from ser.adaptation import adapted_probs
from ser.calibration import (UNCERTAIN_BELOW, expected_calibration_error, fit_softening, fit_temperature, soften,
                             wrong_flagged)
from ser.fusion import average_speaker
from ser.metrics import balanced_share, confusion_matrix, scores_from_confusion
from ser.models import infer
from ser.trained import TrainedModel, scored_probs
from ser.training import (SCORED_GROUPINGS, apply_statistics, fit_ensemble, fit_head, grouped_functionals,
                          grouped_statistics, grouping_keys, input_statistics, load_clips, load_raw,
                          model_feature_params, recipe_functionals, sampling_weights, train_classes)
from ser.device import pick_device
from ser.util import UserError


def score_shared(probs: np.ndarray, y: np.ndarray, classes: list[str], trained: set[int]
                 ) -> tuple[dict[str, Any], np.ndarray, list[str], np.ndarray]:
    """Scores over the classes the test clips have and training had (`trained`), the argmax
    taken among those only: (scores, confusion, class names, which clips were scored)."""
    shared = sorted(set(y.tolist()) & trained)
    scored = np.isin(y, shared)
    local = np.array([shared.index(c) for c in y[scored]], dtype=int)
    predicted = probs[scored][:, shared].argmax(1)
    names = [classes[c] for c in shared]
    cm = confusion_matrix(local, predicted, len(shared))
    return scores_from_confusion(cm, names), cm, names, scored


ADAPTED_GROUPINGS = ("speaker", "corpus")  # also scored adapted to each group: by speaker, one flat folder
NOT_METRICS = ("left_out", "trained_on", "classes", "temperature", "fusion_temperature", "train_minutes",
               "unseen_temperature")  # in the table only


def left_out_scores(probs: np.ndarray, y: np.ndarray, classes: list[str], trained: set[int]
                    ) -> tuple[dict[str, Any], list[str], np.ndarray]:
    """Scores of calibrated probabilities on the shared classes (score_shared): accuracy, UAR,
    macro F1, the most predicted class (as predicted, and on a balanced set), ECE, the share
    flagged uncertain; with the predicted labels and which clips were scored."""
    scores, cm, names, scored = score_shared(probs, y, classes, trained)
    shared = probs[scored][:, [classes.index(n) for n in names]]
    shared /= shared.sum(axis=1, keepdims=True)  # the model's probabilities among the shared classes
    predicted = [names[i] for i in shared.argmax(1)]
    local_y = np.array([names.index(classes[c]) for c in y[scored]])
    share, balanced = pd.Series(predicted).value_counts(normalize=True), balanced_share(cm)
    return ({"classes": " ".join(names), "accuracy": round(scores["accuracy"], 5), "uar": round(scores["uar"], 5),
             "macro_f1": round(scores["macro_f1"], 5), "most_predicted": f"{share.index[0]} {share.iloc[0]:.0%}",
             "most_predicted_balanced": f"{names[int(balanced.argmax())]} {balanced.max():.0%}",
             "ece": round(expected_calibration_error(shared, local_y), 5),
             "uncertain_share": round(float((shared.max(axis=1) < UNCERTAIN_BELOW).mean()), 5)},
            predicted, scored)


def leave_one_out(data: tuple[str, str], recipe: dict[str, Any], left_out: str, corpora: list[str],
                  device: torch.device) -> tuple[dict[str, Any], pd.DataFrame]:
    """Train on every corpus but `left_out` (all their speakers but the calibration split's,
    which calibrate its probabilities), score on all of `left_out`. A speaker-normalised model
    is scored with its clips grouped by speaker, and as the labeller would hear them with less
    to go on (ser.training.SCORED_GROUPINGS): `<grouping>_uar` and `<grouping>_most_predicted_balanced`;
    and with the model adapted to each group (ser.adaptation; ADAPTED_GROUPINGS): `adapted_<grouping>_...`."""
    classes = train_classes(recipe["classes"])
    norm, others = recipe.get("normalisation", "clip"), [c for c in corpora if c != left_out]
    x, y, train_clips = load_raw(*data, classes, corpora=others, split=["train", "test"])
    x_test, y_test, test_clips = load_raw(*data, classes, corpora=[left_out])
    start, stats = time.perf_counter(), input_statistics(x, train_clips, norm)
    weights = sampling_weights(train_clips, recipe)
    fp = feature_store.load(data[0])[2]
    model, _ = fit_ensemble(recipe, x, y, fp, len(classes), device, label=f"without {left_out} ", stats=stats,
                            weights=weights)
    x_cal, y_cal, cal_clips = load_clips(*data, classes, corpora=others, split="calibration", normalisation=norm)
    temperature = fit_temperature(infer(model, x_cal, recipe["batch_size"], device), y_cal) if len(x_cal) else 1.0
    head = fit_head(recipe, data[0], train_clips, y, len(classes), weights, (y_cal, cal_clips))
    # the model as a model file would carry it (its network kept unfused, as trained)
    trained = TrainedModel(model, classes, model_feature_params(recipe, fp), {"temperature": temperature, "normalisation": norm,
                                                "fusion": None if head is None else head.to_record()}, device=device)
    functionals = recipe_functionals(recipe, data[0], test_clips["path"]) if head is not None else None
    minutes = round((time.perf_counter() - start) / 60, 2)
    groupings = SCORED_GROUPINGS if norm == "speaker" else ("speaker",)  # a clip model normalises itself
    population = average_speaker(*stats, train_clips["speaker"]) if norm == "speaker" else None
    row = {"left_out": left_out, "trained_on": " ".join(others), "temperature": round(temperature, 5),
           "fusion_temperature": None if head is None else head.temperature}
    for grouping in groupings:
        inputs = x_test if norm == "clip" else apply_statistics(
            x_test, grouped_statistics(x_test, test_clips, grouping, population))
        z = grouped_functionals(functionals, test_clips, grouping, head)
        probs = scored_probs(trained.scaled(), trained.head, inputs, z, recipe["batch_size"], device).exp().numpy()
        scores, predicted, scored = left_out_scores(probs, y_test.numpy(), classes, set(y.tolist()))
        if grouping == "speaker":  # the headline figures: each speaker relative to their own clips
            row.update(test_clips=int(scored.sum()), not_scored=int((~scored).sum()), **scores)
            kept, kept_probs = predicted, probs[scored]
        else:
            row.update({f"{grouping}_uar": scores["uar"],
                        f"{grouping}_most_predicted_balanced": scores["most_predicted_balanced"]})
        if norm == "speaker" and grouping in ADAPTED_GROUPINGS:
            probs = adapted_probs(trained.network, trained.head, temperature, inputs, z,
                                  grouping_keys(test_clips, grouping), recipe["batch_size"], device).exp().numpy()
            adapted, _, _ = left_out_scores(probs, y_test.numpy(), classes, set(y.tolist()))
            row.update({f"adapted_{grouping}_{name}": adapted[name]
                        for name in ("uar", "accuracy", "ece", "uncertain_share", "most_predicted_balanced")})
    row["train_minutes"] = minutes
    predictions = pd.DataFrame({"path": test_clips["path"][scored], "corpus": left_out,
                                "split": test_clips["split"][scored],
                                "actual": test_clips["emotion"][scored], "predicted": kept,
                                **{f"prob_{c}": kept_probs[:, i].round(5) for i, c in enumerate(classes)}})
    print(f"left out {left_out}: accuracy {row['accuracy']:.3f}, UAR {row['uar']:.3f}, "
          f"most predicted {row['most_predicted']}", flush=True)
    return row, predictions


def leave_one_corpus_out(data: tuple[str, str], recipe: dict[str, Any]
                         ) -> tuple[pd.DataFrame, dict[str, Any], pd.DataFrame]:
    """(one row per corpus left out, summary, every clip's prediction by the model that never
    heard its corpus). Needs at least two corpora."""
    corpora = sorted(pd.read_parquet(data[1])["corpus"].unique())
    if len(corpora) < 2:
        raise UserError(f"leave-one-corpus-out needs two corpora or more; {data[1]} has {corpora}")
    device = pick_device(recipe["device"])
    rows, predictions = zip(*(leave_one_out(data, recipe, c, corpora, device) for c in corpora))
    predictions = pd.concat(predictions, ignore_index=True)
    unseen, per_corpus = unseen_calibration(predictions, classes_of(recipe))
    rows = [{**row, **per_corpus[row["left_out"]]} for row in rows]
    table = pd.DataFrame(rows)
    summary = {"corpora": corpora, "uar_min": round(float(table["uar"].min()), 5),
               "uar_mean": round(float(table["uar"].mean()), 5), "unseen_temperature": unseen,
               "per_corpus": {row["left_out"]: {k: v for k, v in row.items() if k not in NOT_METRICS}
                              for row in rows}}
    return table, summary, predictions


def classes_of(recipe: dict[str, Any]) -> list[str]:
    return train_classes(recipe["classes"])


def unseen_calibration(predictions: pd.DataFrame, classes: list[str]) -> tuple[float, dict[str, dict[str, Any]]]:
    """The unseen-corpus temperature (ser.calibration.soften) fitted on every left-out corpus's
    predictions of speakers outside its test and calibration splits (the recipe is chosen
    without the test speakers); and per corpus left out, how honest the probabilities are on
    all of it with the temperature fitted on the other corpora alone (nested: `unseen_ece`,
    `unseen_uncertain_share`, `unseen_wrong_flagged`; `wrong_flagged` as calibrated in training),
    on the shared classes as left_out_scores scores them."""
    probs = predictions[[f"prob_{c}" for c in classes]].to_numpy(dtype=np.float64)
    y = predictions["actual"].map(classes.index).to_numpy()
    fit_on = (predictions["split"] == "train").to_numpy()
    corpus = predictions["corpus"].to_numpy()
    per_corpus = {}
    for left_out in sorted(set(corpus)):
        others = fit_on & (corpus != left_out)
        t = round(fit_softening(probs[others], y[others]), 4) if others.any() else 1.0
        mine = corpus == left_out
        shared = sorted(set(y[mine].tolist()))
        local_y = np.array([shared.index(c) for c in y[mine]])
        figures: dict[str, Any] = {"unseen_temperature": t}
        for name, temperature in (("", 1.0), ("unseen_", t)):
            p = soften(probs[mine], temperature)[:, shared]
            p /= p.sum(axis=1, keepdims=True)
            if name:  # as calibrated in training, ece and uncertain_share are left_out_scores'
                figures.update({"unseen_ece": round(expected_calibration_error(p, local_y), 5),
                                "unseen_uncertain_share": round(float((p.max(axis=1) < UNCERTAIN_BELOW).mean()), 5)})
            figures[f"{name}wrong_flagged"] = round(wrong_flagged(p, local_y) or 0.0, 5)
        per_corpus[left_out] = figures
    unseen = round(fit_softening(probs[fit_on], y[fit_on]), 4) if fit_on.any() else 1.0
    return unseen, per_corpus
