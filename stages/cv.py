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
"""
from __future__ import annotations

import time
from typing import Any

import pandas as pd
import torch

from stages import features as feature_store
from stages.evaluate import confusion_matrix, scores_from_confusion
from stages.models import Ensemble, infer
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


def run_fold(cv: dict[str, Any], recipe: dict[str, Any], folds: list[list[int]], k: int,
             classes: list[str], n_mels: int, device: torch.device) -> tuple[dict[str, Any], pd.DataFrame]:
    """Train on fold k's training actors (with best_val, choose the checkpoint on fold
    k+1's actors), once per seed of the recipe's seed ensemble, and score once on fold k's
    actors; return the fold's table row and its test clips' predictions (path, fold,
    actual, predicted, one probability column per class)."""
    test_actors = folds[k]
    val_actors = folds[(k + 1) % len(folds)]
    train_actors = [a for fold in folds for a in fold if a not in test_actors + val_actors]
    if selection_mode(recipe) == "refit":  # no checkpoint to choose: the val actors train too
        train_actors, val_actors = sorted(train_actors + val_actors), []
    data = {name: load_clips(cv["features_dir"], cv["metadata"], classes, actors=actors)
            for name, actors in (("train", train_actors), ("val", val_actors), ("test", test_actors))}
    start = time.perf_counter()
    fitted = fit_members(recipe, *data["train"][:2], *data["val"][:2], n_mels, len(classes), device,
                         label=f"fold {k + 1}/{len(folds)} ")
    members, bests = [model for model, _, _ in fitted], [best for _, _, best in fitted]
    n_seeds = len(members)
    model = members[0] if n_seeds == 1 else Ensemble(members)
    minutes = (time.perf_counter() - start) / 60
    x_test, y_test, test_clips = data["test"]
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
        # members' mean
        "val_accuracy": round(sum(b["val_accuracy"] for b in bests) / n_seeds, 5) if val_actors else None,
        "best_epoch": " ".join(str(b["epoch"]) for b in bests) if n_seeds > 1 else bests[0]["epoch"],
        "train_minutes": round(minutes, 2),
    }, predictions


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
    rows, predictions = zip(*(run_fold(cv, recipe, folds, k, classes, n_mels, device) for k in range(len(folds))))
    table = pd.DataFrame(rows)
    return table, summarise(table, cv["fold_size"], classes), pd.concat(predictions, ignore_index=True)


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
