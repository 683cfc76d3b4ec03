import pytest

from conftest import synthetic_dataset, train_params
from stages.cv import cross_validate, make_folds
from stages.util import UserError


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
    cv = {"features_dir": str(features), "metadata": str(metadata), "fold_size": 2}
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
    cv = {"features_dir": str(features), "metadata": str(metadata), "fold_size": 2}
    table, summary, _ = cross_validate(cv, train_params(tmp_path, features, metadata, epochs=2, selection="refit"))
    assert table["test_actors"].tolist() == ["1 2", "3 4", "5 6"]
    assert table["val_actors"].tolist() == ["", "", ""] and table["val_accuracy"].isna().all()
    assert table["best_epoch"].tolist() == [2, 2, 2] and summary["folds"] == 3


def test_a_seed_ensemble_fold_scores_the_members_averaged_probabilities(tmp_path, feature_params):
    features, metadata = synthetic_dataset(tmp_path, feature_params)  # actors 1-6
    cv = {"features_dir": str(features), "metadata": str(metadata), "fold_size": 2}
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
    cv = {"features_dir": str(features), "metadata": str(metadata), "fold_size": 2}
    _, _, plain = cross_validate(cv, train_params(tmp_path, features, metadata, epochs=2, selection="refit"))
    # at weight 0 the student is the plain model of its seed: the teachers must not leak in
    table, _, student = cross_validate(cv, train_params(tmp_path, features, metadata, epochs=2, selection="refit",
                                                        distill_seeds=1, distill_weight=0.0))
    assert table["best_epoch"].tolist() == [2, 2, 2]
    assert student.equals(plain)
    _, _, taught = cross_validate(cv, train_params(tmp_path, features, metadata, epochs=2, selection="refit",
                                                   distill_seeds=1, distill_weight=1.0))
    assert not taught.filter(like="prob_").equals(plain.filter(like="prob_"))
