import json

import pytest

from conftest import synthetic_dataset, train_params
from stages.features import PARAMS_NAME
from stages.cv import cross_validate, make_folds
from stages.util import UserError


def cv_params(root, features, metadata, **overrides):
    cv = {"features_dir": str(features), "metadata": str(metadata), "fold_size": 2,
          "train_model": str(root / "m" / "model.pt"), "n_jobs": 1}  # train_params' model_out
    return {**cv, **overrides}


def test_folds_are_consecutive_actor_groups():
    assert make_folds(list(range(20, 0, -1)), 4) == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12],
                                                      [13, 14, 15, 16], [17, 18, 19, 20]]
    with pytest.raises(UserError, match="do not split into folds of 4"):
        make_folds(list(range(1, 15)), 4)
    with pytest.raises(UserError, match="cannot make train/val/test folds"):
        make_folds([1, 2, 3, 4, 5, 6, 7, 8], 4)


def test_every_fold_is_tested_on_actors_it_never_trained_or_validated_on(tmp_path, feature_params):
    """One cross-validation (3 trainings) checks the folds, the summary and the per-clip
    predictions: every clip predicted once, by the fold that held out its actor."""
    import pandas as pd

    features, metadata = synthetic_dataset(tmp_path, feature_params)  # actors 1-6
    cv = cv_params(tmp_path, features, metadata)
    table, summary, predictions = cross_validate(cv, train_params(tmp_path, features, metadata, epochs=3))
    assert table["test_actors"].tolist() == ["1 2", "3 4", "5 6"]
    assert table["val_actors"].tolist() == ["3 4", "5 6", "1 2"]
    assert summary["folds"] == 3 and set(summary["per_fold"]) == {"fold1", "fold2", "fold3"}
    assert summary["test_accuracy_mean"] == pytest.approx(table["test_accuracy"].mean(), abs=1e-5)
    assert summary["test_accuracy_std"] == pytest.approx(table["test_accuracy"].std(), abs=1e-5)
    assert summary["test_accuracy_mean"] >= 0.9  # the synthetic classes are separable
    clips = pd.read_parquet(metadata)
    assert sorted(predictions["path"]) == sorted(clips["path"])
    actor = predictions["path"].map(dict(zip(clips["path"], clips["actor"])))
    tested_by = {a: fold for fold, actors in zip(table["fold"], table["test_actors"]) for a in map(int, actors.split())}
    assert (predictions["fold"] == actor.map(tested_by)).all()
    probs = predictions.filter(like="prob_")
    assert ((probs.sum(axis=1) - 1).abs() < 1e-3).all()
    assert (predictions["predicted"] == probs.idxmax(axis=1).str.removeprefix("prob_")).all()
    per_fold = (predictions["predicted"] == predictions["actual"]).groupby(predictions["fold"]).mean()
    assert per_fold.round(5).tolist() == table["test_accuracy"].tolist()


def test_refit_folds_train_on_the_val_fold_too_and_still_test_on_unseen_actors(tmp_path, feature_params):
    features, metadata = synthetic_dataset(tmp_path, feature_params)  # actors 1-6
    cv = cv_params(tmp_path, features, metadata)
    table, summary, _ = cross_validate(cv, train_params(tmp_path, features, metadata, epochs=2, selection="refit"))
    assert table["test_actors"].tolist() == ["1 2", "3 4", "5 6"]
    assert table["val_actors"].tolist() == ["", "", ""] and table["val_accuracy"].isna().all()
    assert table["best_epoch"].tolist() == [2, 2, 2] and summary["folds"] == 3


def test_a_seed_ensemble_fold_scores_the_members_averaged_probabilities(tmp_path, feature_params):
    features, metadata = synthetic_dataset(tmp_path, feature_params)  # actors 1-6
    cv = cv_params(tmp_path, features, metadata)
    runs = [cross_validate(cv, train_params(tmp_path, features, metadata, epochs=2, selection="refit", seed=seed))[2]
            for seed in (3, 4)]
    table, _, predictions = cross_validate(
        cv, train_params(tmp_path, features, metadata, epochs=2, selection="refit", ensemble_seeds=2))
    averaged = (runs[0].filter(like="prob_") + runs[1].filter(like="prob_")) / 2
    assert (predictions["path"] == runs[0]["path"]).all()
    assert (predictions.filter(like="prob_") - averaged).abs().max().max() < 1e-4
    assert table["best_epoch"].tolist() == ["2 2", "2 2", "2 2"]


def test_a_distilled_fold_scores_the_student_alone(tmp_path, feature_params):
    features, metadata = synthetic_dataset(tmp_path, feature_params)  # actors 1-6
    cv = cv_params(tmp_path, features, metadata)
    _, _, plain = cross_validate(cv, train_params(tmp_path, features, metadata, epochs=2, selection="refit"))
    # at weight 0 the student is the plain model of its seed: the teachers must not leak in
    table, _, student = cross_validate(cv, train_params(tmp_path, features, metadata, epochs=2, selection="refit",
                                                        distill_seeds=1, distill_weight=0.0))
    assert table["best_epoch"].tolist() == [2, 2, 2]
    assert student.equals(plain)
    _, _, taught = cross_validate(cv, train_params(tmp_path, features, metadata, epochs=2, selection="refit",
                                                   distill_seeds=1, distill_weight=1.0))
    assert not taught.filter(like="prob_").equals(plain.filter(like="prob_"))


def test_the_fold_the_train_stage_trained_scores_its_model_instead_of_training_again(tmp_path, feature_params):
    import torch

    from stages.evaluate import confusion_matrix, scores_from_confusion
    from stages.models import infer, load_checkpoint
    from stages.train import load_split, train, train_classes

    features, metadata = synthetic_dataset(tmp_path, feature_params)  # train 1-4, val 5, test 6
    cv = cv_params(tmp_path, features, metadata, fold_size=1)
    p = train_params(tmp_path, features, metadata, epochs=2, selection="refit", ensemble_seeds=2)
    train(p)  # refit: actors 1-5, which is fold 6's training set
    table, summary, predictions = cross_validate(cv, p)
    assert table["model"].tolist() == ["trained here"] * 5 + ["train stage"]
    assert summary["folds_from_train_stage"] == [6]
    row = table.iloc[5]
    assert row["best_epoch"] == "2 2" and row["train_minutes"] == 0  # no training here
    # its scores are the saved model's on the test actor, as the evaluate stage computes them
    model, _ = load_checkpoint(p["model_out"])
    classes = train_classes(p)
    x, y, _ = load_split(str(features), str(metadata), classes, "test")
    probs = infer(model, x, 8, torch.device("cpu")).softmax(dim=1).numpy()
    predicted = probs.argmax(1)
    fold6 = predictions[predictions["fold"] == 6]
    assert abs(fold6[[f"prob_{c}" for c in classes]].to_numpy() - probs).max() < 1e-5
    expected = scores_from_confusion(confusion_matrix(y.numpy(), predicted, 2), classes)
    assert [row["test_accuracy"], row["test_uar"]] == [round(expected["accuracy"], 5), round(expected["uar"], 5)]
    # another recipe (or no model file) trains every fold
    other, _, _ = cross_validate(cv, {**p, "seed": 4})
    assert other["model"].tolist() == ["trained here"] * 6
    missing, _, _ = cross_validate(cv_params(tmp_path, features, metadata, fold_size=1,
                                             train_model=str(tmp_path / "none.pt")), p)
    assert missing["model"].tolist() == ["trained here"] * 6
    # features recomputed with other params since the model was trained: it is stale
    params_file = features / PARAMS_NAME
    params_file.write_text(json.dumps({**json.loads(params_file.read_text()), "fmin": 40.0}))
    stale, _, _ = cross_validate(cv, p)
    assert stale["model"].tolist() == ["trained here"] * 6


def test_a_reused_best_val_fold_reports_the_train_stage_val_accuracy(tmp_path, feature_params):
    import pandas as pd

    from stages.train import train

    features, metadata = synthetic_dataset(tmp_path, feature_params)
    clips = pd.read_parquet(metadata)  # test actor 5, val actor 6: fold 5's actors
    clips["split"] = clips["actor"].map(lambda a: "train" if a <= 4 else ("test" if a == 5 else "val"))
    clips.to_parquet(metadata)
    p = train_params(tmp_path, features, metadata, epochs=2, selection="best_val", ensemble_seeds=2)
    summary = train(p)
    table, _, _ = cross_validate(cv_params(tmp_path, features, metadata, fold_size=1), p)
    fold5 = table.iloc[4]
    assert fold5["model"] == "train stage" and fold5["val_actors"] == "6"
    assert fold5["val_accuracy"] == pytest.approx(summary["val_accuracy"], abs=1e-5)
    assert table["val_accuracy"].notna().all()


def test_folds_trained_side_by_side_give_what_one_at_a_time_gives_at_their_threads(tmp_path, feature_params):
    import torch

    features, metadata = synthetic_dataset(tmp_path, feature_params)  # actors 1-6
    p = train_params(tmp_path, features, metadata, epochs=2, selection="refit")
    threads = max(1, torch.get_num_threads() // 2)  # what each of 2 workers gets
    _, summary, parallel = cross_validate(cv_params(tmp_path, features, metadata, n_jobs=2), p)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _, _, sequential = cross_validate(cv_params(tmp_path, features, metadata), p)
    finally:
        torch.set_num_threads(before)
    assert parallel.equals(sequential)
    assert summary["folds"] == 3 and summary["folds_from_train_stage"] == []
    with pytest.raises(UserError, match="cv.n_jobs must be a whole number >= 1"):
        cross_validate(cv_params(tmp_path, features, metadata, n_jobs=0), p)
