"""Stage: actor-fold cross-validation of the training recipe (params `train`).

The actors are cut into folds of `fold_size` consecutive actor numbers (odd = male, even =
female, so every fold of 4 has two of each). Fold k is tested on its actors and trains on
the others; with train.selection best_val its checkpoint is chosen on fold k+1's actors,
which then do not train. No actor is in two of train/val/test, and the test actors never
influence training or checkpoint selection. With train.ensemble_seeds > 1 each fold trains
that many models (seeds seed, seed+1, ...) and scores their averaged probabilities; with
train.distill_seeds > 0 it trains the teachers and scores the one model they taught.
Writes per-fold and mean/std metrics, the per-fold table, and every clip's prediction from
the fold that tested it (seed ensembles can be scored from these files).

The fold whose training would repeat the train stage's (same recipe, same train and val
actors: with refit, the fold of the test actors) scores the train stage's model instead of
training it again, so its figures are the evaluate stage's. On CPU, `n_jobs` folds train
side by side, the torch threads split between them.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from joblib import Parallel, delayed

from stages import features as feature_store
from stages.evaluate import confusion_matrix, scores_from_confusion
from stages.models import Ensemble, infer, load_checkpoint
from stages.train import fit_members, load_clips, selection_mode, train_classes
from stages.util import UserError, atomic_path, load_params, pick_device, run_main, write_json


def make_folds(actors: list[int], fold_size: int) -> list[list[int]]:
    """Consecutive groups of fold_size actors, in actor order."""
    actors = sorted(actors)
    if fold_size < 1 or len(actors) < 3 * fold_size:
        raise UserError(f"cv: {len(actors)} actors cannot make train/val/test folds of {fold_size}")
    if len(actors) % fold_size:
        raise UserError(f"cv: {len(actors)} actors do not split into folds of {fold_size}")
    return [actors[i : i + fold_size] for i in range(0, len(actors), fold_size)]


def fold_actors(recipe: dict[str, Any], folds: list[list[int]], k: int) -> tuple[list[int], list[int], list[int]]:
    """(train, val, test) actors of fold k: tested on fold k, checkpoint chosen on fold k+1
    (with refit no checkpoint is chosen and the val fold trains too), trained on the rest."""
    test_actors = folds[k]
    val_actors = folds[(k + 1) % len(folds)]
    train_actors = [a for fold in folds for a in fold if a not in test_actors + val_actors]
    if selection_mode(recipe) == "refit":
        train_actors, val_actors = sorted(train_actors + val_actors), []
    return train_actors, val_actors, test_actors


def train_stage_model(cv: dict[str, Any], recipe: dict[str, Any], device: torch.device
                      ) -> tuple[torch.nn.Module, dict[str, Any]] | None:
    """The train stage's model and its record (recipe, splits, best epochs, val accuracies),
    when it was trained by this very recipe on the features now in cv.features_dir; else
    None (the folds all train)."""
    path = Path(cv["train_model"])
    if not path.is_file() or (cv["features_dir"], cv["metadata"]) != (recipe["features_dir"], recipe["metadata"]):
        return None
    model, meta = load_checkpoint(path, device)
    # feature params too: run by hand after a features change, the model file can be stale
    same_features = meta["feature_params"] == feature_store.load(cv["features_dir"])[2]
    return (model, meta["extra"]) if same_features and meta["extra"].get("recipe") == recipe else None


def trains_fold(record: dict[str, Any], recipe: dict[str, Any], folds: list[list[int]], k: int) -> bool:
    """Whether the train stage's model (its record) was trained on fold k's train and val actors."""
    return record.get("splits") == [list(fold_actors(recipe, folds, k)[:2])]


def run_fold(cv: dict[str, Any], recipe: dict[str, Any], folds: list[list[int]], k: int,
             classes: list[str], n_mels: int, device: torch.device,
             trained: tuple[torch.nn.Module, dict[str, Any]] | None = None,
             threads: int | None = None) -> tuple[dict[str, Any], pd.DataFrame]:
    """Train on fold k's training actors (with best_val, choose the checkpoint on fold
    k+1's actors), once per seed of the recipe's seed ensemble, and score once on fold k's
    actors; return the fold's table row and its test clips' predictions (path, fold,
    actual, predicted, one probability column per class). `trained`: the train stage's
    model and record, scored instead of training (the caller checked trains_fold).
    `threads`: torch threads for this fold (when folds train side by side)."""
    if threads is not None:
        torch.set_num_threads(threads)
    train_actors, val_actors, test_actors = fold_actors(recipe, folds, k)
    reused = trained is not None
    x_test, y_test, test_clips = load_clips(cv["features_dir"], cv["metadata"], classes, actors=test_actors)
    if reused:
        model, record = trained
        minutes, best_epochs = 0.0, [int(e) for e in record["best_epochs"]]  # trained by the train stage
        val_accuracy = mean_or_none(record.get("val_accuracies", [None])) if val_actors else None
        print(f"cv fold {k + 1}/{len(folds)}: the train stage's model (same recipe and actors)", flush=True)
    else:
        data = {name: load_clips(cv["features_dir"], cv["metadata"], classes, actors=actors)
                for name, actors in (("train", train_actors), ("val", val_actors))}
        start = time.perf_counter()
        fitted = fit_members(recipe, *data["train"][:2], *data["val"][:2], n_mels, len(classes), device,
                             label=f"fold {k + 1}/{len(folds)} ")
        members, bests = [model for model, _, _ in fitted], [best for _, _, best in fitted]
        model = members[0] if len(members) == 1 else Ensemble(members)
        minutes = (time.perf_counter() - start) / 60
        best_epochs = [b["epoch"] for b in bests]
        val_accuracy = mean_or_none([b["val_accuracy"] for b in bests]) if val_actors else None
    probs = infer(model, x_test, recipe["batch_size"], device).softmax(dim=1).numpy()
    predicted = probs.argmax(1)
    scores = scores_from_confusion(confusion_matrix(y_test.numpy(), predicted, len(classes)), classes)
    print(f"cv fold {k + 1}: test actors {test_actors}: accuracy {scores['accuracy']:.3f}, "
          f"UAR {scores['uar']:.3f}", flush=True)
    predictions = pd.DataFrame({"path": test_clips["path"], "fold": k + 1, "actual": test_clips["emotion"],
                                "predicted": [classes[i] for i in predicted],
                                **{f"prob_{c}": probs[:, i].round(5) for i, c in enumerate(classes)}})
    return {
        "fold": k + 1,
        "test_actors": " ".join(map(str, test_actors)),
        "val_actors": " ".join(map(str, val_actors)),
        "test_accuracy": round(scores["accuracy"], 5),
        "test_uar": round(scores["uar"], 5),
        "test_macro_f1": round(scores["macro_f1"], 5),
        "val_accuracy": val_accuracy,
        "best_epoch": " ".join(map(str, best_epochs)) if len(best_epochs) > 1 else best_epochs[0],
        "train_minutes": round(minutes, 2),
        "model": "train stage" if reused else "trained here",
    }, predictions


def mean_or_none(values: list[float | None]) -> float | None:
    """The members' mean val accuracy, rounded; None when a member has none recorded."""
    return None if any(v is None for v in values) else round(sum(values) / len(values), 5)


def fold_workers(cv: dict[str, Any], device: torch.device, n_folds: int) -> int:
    """cv.n_jobs folds side by side on CPU (one at a time on a GPU), at most n_folds."""
    n = cv["n_jobs"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise UserError(f"cv.n_jobs must be a whole number >= 1, not {n!r}")
    return 1 if device.type == "cuda" else max(1, min(n, n_folds))


def fold_setup(cv: dict[str, Any], recipe: dict[str, Any]
               ) -> tuple[list[list[int]], list[str], int, torch.device]:
    """(actor folds, classes, n_mels, device) for cross-validating `recipe`."""
    classes = train_classes(recipe)
    folds = make_folds(pd.read_parquet(cv["metadata"])["actor"].unique().tolist(), cv["fold_size"])
    n_mels = feature_store.load(cv["features_dir"])[2].n_mels
    return folds, classes, n_mels, pick_device(recipe["device"])


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


def cross_validate(cv: dict[str, Any], recipe: dict[str, Any]
                   ) -> tuple[pd.DataFrame, dict[str, Any], pd.DataFrame]:
    """(per-fold table, summary, every clip's prediction from the fold that tested it)."""
    folds, classes, n_mels, device = fold_setup(cv, recipe)
    trained = train_stage_model(cv, recipe, device)
    start = time.perf_counter()
    reused = [k for k in range(len(folds)) if trained is not None and trains_fold(trained[1], recipe, folds, k)]
    to_train = [k for k in range(len(folds)) if k not in reused]
    results = {k: run_fold(cv, recipe, folds, k, classes, n_mels, device, trained) for k in reused}
    n_jobs = fold_workers(cv, device, len(to_train))
    if n_jobs == 1:
        results.update({k: run_fold(cv, recipe, folds, k, classes, n_mels, device) for k in to_train})
    else:
        # results depend on the thread count, so a fold gets the same threads however it is scheduled
        threads = max(1, torch.get_num_threads() // n_jobs)
        done = Parallel(n_jobs=n_jobs, backend="loky")(
            delayed(run_fold)(cv, recipe, folds, k, classes, n_mels, device, threads=threads) for k in to_train)
        results.update(zip(to_train, done))
    rows, predictions = zip(*(results[k] for k in range(len(folds))))
    table = pd.DataFrame(rows)
    summary = summarise(table, cv["fold_size"], classes)
    summary["wall_minutes"] = round((time.perf_counter() - start) / 60, 2)
    summary["folds_from_train_stage"] = [k + 1 for k in reused]
    return table, summary, pd.concat(predictions, ignore_index=True)


def main() -> None:
    cv = load_params("cv")
    recipe = load_params("train")  # the recipe under test: cv depends on the whole train section
    table, summary, predictions = cross_validate(cv, recipe)
    with atomic_path(cv["table"]) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(cv["predictions"]) as tmp:
        predictions.to_csv(tmp, index=False)
    write_json(cv["metrics"], summary)
    print(f"cv: accuracy {summary['test_accuracy_mean']:.3f} +/- {summary['test_accuracy_std']:.3f}, "
          f"UAR {summary['test_uar_mean']:.3f} +/- {summary['test_uar_std']:.3f} over {summary['folds']} folds")


if __name__ == "__main__":
    run_main(main)
