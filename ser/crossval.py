"""Speaker-fold cross-validation of a training recipe, in one of two schemes (FOLD_SCHEMES):
- `actors`: RAVDESS's actors cut into folds of `fold_size` consecutive actor numbers (odd =
  male, even = female, so every fold of 4 has two of each), trained on RAVDESS alone: the
  figure comparable with published RAVDESS results (its folds include the test actors);
- `speakers`: every corpus's speakers outside the test split (train and calibration), each
  corpus's cut into `n_folds` runs of consecutive speakers; fold k is tested on run k of every
  corpus and trains on all the other speakers of every corpus, corpus-balanced as the train
  stage. The test speakers take no part, so a recipe can be chosen on it (a corpus with a
  single such speaker, TESS, trains in every fold and is scored in none).
No speaker is in a fold's training and its test. With ensemble_seeds > 1 each fold trains that
many models and scores their averaged probabilities. Every clip's prediction comes from the
fold that tested it.

The fold whose training would repeat the train stage's (same recipe, same training actors:
the fold of the test actors) scores the train stage's model instead of training it again.
On CPU, `n_jobs` folds train side by side, the torch threads split between them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from joblib import Parallel, delayed

from ser import features as feature_store
from ser.audio import FeatureParams
from ser.metrics import confusion_matrix, scores_from_confusion
from ser.trained import TrainedModel, scored_probs
from ser.training import (fit_ensemble, fit_head, grouped_functionals, input_statistics, load_clips, load_raw,
                          model_feature_params, recipe_functionals, sampling_weights, train_classes)
from ser.device import pick_device
from ser.util import UserError


def make_folds(actors: list[int], fold_size: int) -> list[list[int]]:
    """Consecutive groups of fold_size actors, in actor order."""
    actors = sorted(actors)
    if fold_size < 1 or len(actors) < 2 * fold_size:
        raise UserError(f"cv: {len(actors)} actors cannot make train/test folds of {fold_size}")
    if len(actors) % fold_size:
        raise UserError(f"cv: {len(actors)} actors do not split into folds of {fold_size}")
    return [actors[i : i + fold_size] for i in range(0, len(actors), fold_size)]


FOLD_SCHEMES = ("actors", "speakers")


@dataclass(frozen=True)
class Fold:
    train: list[str]  # the speakers trained on
    test: list[str]  # the speakers tested on


def actor_folds(clips: pd.DataFrame, fold_size: int) -> list[Fold]:
    """The `actors` scheme: RAVDESS actors in folds of fold_size (make_folds); each fold trains on
    the other folds' actors (clips without an actor number, other corpora, take no part)."""
    actors = clips.dropna(subset=["actor"])
    speakers_of = {int(a): sorted(group["speaker"].unique()) for a, group in actors.groupby("actor")}
    folds = make_folds(list(speakers_of), fold_size)
    return [Fold(sorted(s for a in speakers_of if a not in fold for s in speakers_of[a]),
                 sorted(s for a in fold for s in speakers_of[a])) for fold in folds]


def speaker_folds(clips: pd.DataFrame, n_folds: int) -> list[Fold]:
    """The `speakers` scheme (see the module): the speakers outside the test split of every
    corpus with two or more of them, cut per corpus into n_folds runs of consecutive speakers."""
    if isinstance(n_folds, bool) or not isinstance(n_folds, int) or n_folds < 2:
        raise UserError(f"cv.n_folds must be a whole number >= 2, not {n_folds!r}")
    pool = clips[clips["split"] != "test"]
    tested: list[list[str]] = [[] for _ in range(n_folds)]
    for _, corpus in pool.groupby("corpus", sort=True):
        speakers = sorted(corpus["speaker"].unique())
        if len(speakers) >= 2:  # one speaker cannot be tested on without leaving its corpus out
            for k, run in enumerate(np.array_split(np.arange(len(speakers)), n_folds)):
                tested[k] += [speakers[i] for i in run]
    if not all(tested):
        raise UserError(f"cv: {n_folds} folds leave a fold with no speaker to test (fewer speakers than folds)")
    everyone = set(pool["speaker"])
    return [Fold(sorted(everyone - set(test)), sorted(test)) for test in tested]


def cv_folds(clips: pd.DataFrame, scheme: str, fold_size: int, n_folds: int) -> list[Fold]:
    """The folds of `scheme` (FOLD_SCHEMES) over the metadata's clips."""
    if scheme not in FOLD_SCHEMES:
        raise UserError(f"cv.folds must be one of {', '.join(FOLD_SCHEMES)}, not {scheme!r}")
    return actor_folds(clips, fold_size) if scheme == "actors" else speaker_folds(clips, n_folds)


def train_stage_model(model_path: str, recipe: dict[str, Any], features_dir: str, device: torch.device
                      ) -> TrainedModel | None:
    """The train stage's model and its record when it was trained by this very recipe on the
    features now in features_dir; else None (the folds all train)."""
    if not Path(model_path).is_file():
        return None
    trained = TrainedModel.load(model_path, device)
    # feature params too: run by hand after a features change, the model file can be stale
    same_features = trained.feature_params == model_feature_params(recipe, feature_store.load(features_dir)[2])
    return trained if same_features and trained.extra.get("recipe") == recipe else None


def run_fold(data: tuple[str, str], recipe: dict[str, Any], folds: list[Fold], k: int,
             classes: list[str], fp: FeatureParams, device: torch.device,
             trained: TrainedModel | None = None, threads: int | None = None
             ) -> tuple[dict[str, Any], pd.DataFrame]:
    """Train on fold k's training speakers (`trained`: the train stage's model, scored instead) and score on its test speakers; return the fold's table row and its test clips'
    predictions (path, corpus, fold, actual, predicted, one probability column per class).
    `data`: (features dir, metadata file); `threads`: torch threads for this fold."""
    if threads is not None:
        torch.set_num_threads(threads)
    fold, norm = folds[k], recipe.get("normalisation", "clip")
    x_test, y_test, test_clips = load_clips(*data, classes, speakers=fold.test, normalisation=norm)
    start = time.perf_counter()
    if trained is None:
        x, y, clips = load_raw(*data, classes, speakers=fold.train)
        weights = sampling_weights(clips, recipe)  # as the train stage draws its epochs
        model, _ = fit_ensemble(recipe, x, y, fp, len(classes), device, label=f"fold {k + 1}/{len(folds)} ",
                                weights=weights, stats=input_statistics(x, clips, norm))
        # the linear model fused as the train stage does; no held-out speakers here, so uncalibrated
        head = fit_head(recipe, data[0], clips, y, len(classes), weights, None)
    else:
        model, head = trained.inference, trained.head
        print(f"cv fold {k + 1}/{len(folds)}: the train stage's model (same recipe and actors)", flush=True)
    minutes = (time.perf_counter() - start) / 60 if trained is None else 0.0
    z = None if head is None else grouped_functionals(
        recipe_functionals(recipe, data[0], test_clips["path"]), test_clips, "speaker", head)
    probs = scored_probs(model, head, x_test, z, recipe["batch_size"], device).exp().numpy()
    predicted = probs.argmax(1)
    scores = scores_from_confusion(confusion_matrix(y_test.numpy(), predicted, len(classes)), classes)
    print(f"cv fold {k + 1}: test speakers {' '.join(fold.test)}: accuracy {scores['accuracy']:.3f}, "
          f"UAR {scores['uar']:.3f}", flush=True)
    predictions = pd.DataFrame({"path": test_clips["path"], "corpus": test_clips["corpus"], "fold": k + 1,
                                "actual": test_clips["emotion"], "predicted": [classes[i] for i in predicted],
                                **{f"prob_{c}": probs[:, i].round(5) for i, c in enumerate(classes)}})
    return {"fold": k + 1, "test_speakers": " ".join(fold.test),
            "test_accuracy": round(scores["accuracy"], 5), "test_uar": round(scores["uar"], 5),
            "test_macro_f1": round(scores["macro_f1"], 5), "train_minutes": round(minutes, 2),
            "model": "train stage" if trained is not None else "trained here"}, predictions


def fold_workers(n: int, device: torch.device, n_folds: int) -> int:
    """n folds side by side on CPU (one at a time on a GPU), at most n_folds."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise UserError(f"cv.n_jobs must be a whole number >= 1, not {n!r}")
    return 1 if device.type == "cuda" else max(1, min(n, n_folds))


def summarise(table: pd.DataFrame, predictions: pd.DataFrame, classes: list[str]) -> dict[str, Any]:
    """Mean and sample std over folds of the per-fold table, each fold's scores, and each
    corpus's scores over all its clips (each predicted by the fold that tested it)."""
    summary: dict[str, Any] = {"folds": len(table), "classes": classes}
    for column in ("test_accuracy", "test_uar", "test_macro_f1"):
        summary[f"{column}_mean"] = round(float(table[column].mean()), 5)
        summary[f"{column}_std"] = round(float(table[column].std(ddof=1)), 5)  # sample std over folds
    summary["per_fold"] = {f"fold{r.fold}": {k: getattr(r, k) for k in ("test_accuracy", "test_uar", "test_macro_f1")}
                           for r in table.itertuples()}
    summary["by_corpus"] = {}
    for corpus, rows in predictions.groupby("corpus", sort=True):
        actual, predicted = (rows[column].map(classes.index).to_numpy() for column in ("actual", "predicted"))
        cm = confusion_matrix(actual, predicted, len(classes))
        scores = scores_from_confusion(cm, classes)
        summary["by_corpus"][corpus] = {"clips": len(rows), "accuracy": round(scores["accuracy"], 5),
                                        "uar": round(scores["uar"], 5)}
    summary["train_minutes_total"] = round(float(table["train_minutes"].sum()), 2)
    return summary


def cross_validate(data: tuple[str, str], recipe: dict[str, Any], folds: list[Fold], n_jobs: int,
                   train_model: str | None = None) -> tuple[pd.DataFrame, dict[str, Any], pd.DataFrame]:
    """(per-fold table, summary, every clip's prediction from the fold that tested it) of the
    `folds` (cv_folds). `data`: (features dir, metadata file); `train_model`: the train stage's
    model file, reused for the fold it already is."""
    classes = train_classes(recipe["classes"])
    fp, device = feature_store.load(data[0])[2], pick_device(recipe["device"])
    trained = train_stage_model(train_model, recipe, data[0], device) if train_model else None
    start = time.perf_counter()
    reused = [k for k, fold in enumerate(folds)
              if trained is not None and trained.extra.get("train_speakers") == fold.train]
    to_train = [k for k in range(len(folds)) if k not in reused]
    results = {k: run_fold(data, recipe, folds, k, classes, fp, device, trained) for k in reused}
    workers = fold_workers(n_jobs, device, len(to_train))
    if workers == 1:
        results.update({k: run_fold(data, recipe, folds, k, classes, fp, device) for k in to_train})
    else:
        # results depend on the thread count, so a fold gets the same threads however it is scheduled
        threads = max(1, torch.get_num_threads() // workers)
        done = Parallel(n_jobs=workers, backend="loky")(
            delayed(run_fold)(data, recipe, folds, k, classes, fp, device, threads=threads) for k in to_train)
        results.update(zip(to_train, done))
    rows, predictions = zip(*(results[k] for k in range(len(folds))))
    table, predictions = pd.DataFrame(rows), pd.concat(predictions, ignore_index=True)
    summary = summarise(table, predictions, classes)
    summary["wall_minutes"] = round((time.perf_counter() - start) / 60, 2)
    summary["folds_from_train_stage"] = [k + 1 for k in reused]
    return table, summary, predictions
