"""Actor-fold cross-validation of a training recipe.

The actors are cut into folds of `fold_size` consecutive actor numbers (odd = male, even =
female, so every fold of 4 has two of each). Fold k is tested on its actors and trains on
all the others; no actor is in both, and the test actors never influence training. With
ensemble_seeds > 1 each fold trains that many models and scores their averaged
probabilities. Every clip's prediction comes from the fold that tested it.

The fold whose training would repeat the train stage's (same recipe, same training actors:
the fold of the test actors) scores the train stage's model instead of training it again.
On CPU, `n_jobs` folds train side by side, the torch threads split between them.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from joblib import Parallel, delayed

from ser import features as feature_store
from ser.audio import FeatureParams
from ser.metrics import confusion_matrix, scores_from_confusion
from ser.features import load_functionals
from ser.fusion import LinearHead
from ser.models import load_checkpoint
from ser.training import (fit_ensemble, fit_head, grouped_functionals, input_statistics, load_clips, load_raw,
                          scored_probs, train_classes)
from ser.util import UserError, pick_device


def make_folds(actors: list[int], fold_size: int) -> list[list[int]]:
    """Consecutive groups of fold_size actors, in actor order."""
    actors = sorted(actors)
    if fold_size < 1 or len(actors) < 2 * fold_size:
        raise UserError(f"cv: {len(actors)} actors cannot make train/test folds of {fold_size}")
    if len(actors) % fold_size:
        raise UserError(f"cv: {len(actors)} actors do not split into folds of {fold_size}")
    return [actors[i : i + fold_size] for i in range(0, len(actors), fold_size)]


def fold_actors(folds: list[list[int]], k: int) -> tuple[list[int], list[int]]:
    """(train, test) actors of fold k: tested on fold k, trained on all the others."""
    return sorted(a for fold in folds for a in fold if a not in folds[k]), list(folds[k])


def train_stage_model(model_path: str, recipe: dict[str, Any], features_dir: str, device: torch.device
                      ) -> tuple[torch.nn.Module, dict[str, Any]] | None:
    """The train stage's model and its record when it was trained by this very recipe on the
    features now in features_dir; else None (the folds all train)."""
    if not Path(model_path).is_file():
        return None
    model, meta = load_checkpoint(model_path, device)
    # feature params too: run by hand after a features change, the model file can be stale
    same_features = meta["feature_params"] == feature_store.load(features_dir)[2]
    return (model, meta["extra"]) if same_features and meta["extra"].get("recipe") == recipe else None


def run_fold(data: tuple[str, str], recipe: dict[str, Any], folds: list[list[int]], k: int,
             classes: list[str], fp: FeatureParams, device: torch.device,
             trained: tuple[torch.nn.Module, LinearHead | None] | None = None, threads: int | None = None
             ) -> tuple[dict[str, Any], pd.DataFrame]:
    """Train on fold k's training actors (`trained`: the train stage's model and linear model, scored instead)
    and score on fold k's actors; return the fold's table row and its test clips'
    predictions (path, fold, actual, predicted, one probability column per class).
    `data`: (features dir, metadata file); `threads`: torch threads for this fold."""
    if threads is not None:
        torch.set_num_threads(threads)
    train_actors, test_actors = fold_actors(folds, k)
    norm = recipe.get("normalisation", "clip")
    x_test, y_test, test_clips = load_clips(*data, classes, actors=test_actors, normalisation=norm)
    start = time.perf_counter()
    if trained is None:
        x, y, clips = load_raw(*data, classes, actors=train_actors)
        model, _ = fit_ensemble(recipe, x, y, fp, len(classes), device, label=f"fold {k + 1}/{len(folds)} ",
                                stats=input_statistics(x, clips, norm))
        # the linear model fused as the train stage does; no held-out speakers here, so uncalibrated
        head = fit_head(recipe, data[0], clips, y, len(classes), None, None)
    else:
        model, head = trained
        print(f"cv fold {k + 1}/{len(folds)}: the train stage's model (same recipe and actors)", flush=True)
    minutes = (time.perf_counter() - start) / 60 if trained is None else 0.0
    z = None if head is None else grouped_functionals(
        load_functionals(data[0], test_clips["path"]), test_clips, "speaker", head)
    probs = scored_probs(model, head, x_test, z, recipe["batch_size"], device).exp().numpy()
    predicted = probs.argmax(1)
    scores = scores_from_confusion(confusion_matrix(y_test.numpy(), predicted, len(classes)), classes)
    print(f"cv fold {k + 1}: test actors {test_actors}: accuracy {scores['accuracy']:.3f}, "
          f"UAR {scores['uar']:.3f}", flush=True)
    predictions = pd.DataFrame({"path": test_clips["path"], "fold": k + 1, "actual": test_clips["emotion"],
                                "predicted": [classes[i] for i in predicted],
                                **{f"prob_{c}": probs[:, i].round(5) for i, c in enumerate(classes)}})
    return {"fold": k + 1, "test_actors": " ".join(map(str, test_actors)),
            "test_accuracy": round(scores["accuracy"], 5), "test_uar": round(scores["uar"], 5),
            "test_macro_f1": round(scores["macro_f1"], 5), "train_minutes": round(minutes, 2),
            "model": "train stage" if trained is not None else "trained here"}, predictions


def fold_workers(n: int, device: torch.device, n_folds: int) -> int:
    """n folds side by side on CPU (one at a time on a GPU), at most n_folds."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise UserError(f"cv.n_jobs must be a whole number >= 1, not {n!r}")
    return 1 if device.type == "cuda" else max(1, min(n, n_folds))


def summarise(table: pd.DataFrame, fold_size: int, classes: list[str]) -> dict[str, Any]:
    """Mean and sample std over folds of the per-fold table, plus each fold's scores."""
    summary: dict[str, Any] = {"folds": len(table), "fold_size": fold_size, "classes": classes}
    for column in ("test_accuracy", "test_uar", "test_macro_f1"):
        summary[f"{column}_mean"] = round(float(table[column].mean()), 5)
        summary[f"{column}_std"] = round(float(table[column].std(ddof=1)), 5)  # sample std over folds
    summary["per_fold"] = {f"fold{r.fold}": {k: getattr(r, k) for k in ("test_accuracy", "test_uar", "test_macro_f1")}
                           for r in table.itertuples()}
    summary["train_minutes_total"] = round(float(table["train_minutes"].sum()), 2)
    return summary


def cross_validate(data: tuple[str, str], recipe: dict[str, Any], fold_size: int, n_jobs: int,
                   train_model: str | None = None) -> tuple[pd.DataFrame, dict[str, Any], pd.DataFrame]:
    """(per-fold table, summary, every clip's prediction from the fold that tested it).
    `data`: (features dir, metadata file); `train_model`: the train stage's model file, reused
    for the fold it already is."""
    classes = train_classes(recipe["classes"])
    # folds of RAVDESS actors: clips of other corpora (no actor number) take part in no fold
    folds = make_folds([int(a) for a in pd.read_parquet(data[1])["actor"].dropna().unique()], fold_size)
    fp, device = feature_store.load(data[0])[2], pick_device(recipe["device"])
    trained = train_stage_model(train_model, recipe, data[0], device) if train_model else None
    start = time.perf_counter()
    clips = pd.read_parquet(data[1])
    reused = [k for k in range(len(folds)) if trained is not None and trained[1].get("train_speakers") == sorted(
        clips.loc[clips["actor"].isin(fold_actors(folds, k)[0]), "speaker"].unique())]
    to_train = [k for k in range(len(folds)) if k not in reused]
    results = {k: run_fold(data, recipe, folds, k, classes, fp, device,
                           (trained[0], LinearHead.from_record(trained[1].get("fusion")))) for k in reused}
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
    table = pd.DataFrame(rows)
    summary = summarise(table, fold_size, classes)
    summary["wall_minutes"] = round((time.perf_counter() - start) / 60, 2)
    summary["folds_from_train_stage"] = [k + 1 for k in reused]
    return table, summary, pd.concat(predictions, ignore_index=True)
