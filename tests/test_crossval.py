import json

import pandas as pd
import pytest
import torch

from conftest import synthetic_dataset, train_params
from ser.crossval import Fold, cross_validate, cv_folds, make_folds, speaker_folds
from ser.features import PARAMS_NAME
from ser.util import UserError


def _cv(data, recipe, fold_size=2, n_jobs=1, train_model=None):
    folds = cv_folds(pd.read_parquet(data[1]), "actors", fold_size, 2)
    return cross_validate(data, recipe, folds, n_jobs, train_model=train_model)


def _data(tmp_path, feature_params):
    features, metadata = synthetic_dataset(tmp_path, feature_params)  # actors 1-6
    return str(features), str(metadata)


def test_folds_are_consecutive_actor_groups():
    assert make_folds(list(range(20, 0, -1)), 4) == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12],
                                                      [13, 14, 15, 16], [17, 18, 19, 20]]
    with pytest.raises(UserError, match="do not split into folds of 4"):
        make_folds(list(range(1, 15)), 4)
    with pytest.raises(UserError, match="cannot make train/test folds"):
        make_folds([1, 2, 3, 4], 4)


def test_every_fold_is_tested_on_actors_it_never_trained_on(tmp_path, feature_params):
    """One cross-validation (3 trainings) checks the folds, the summary and the per-clip
    predictions: every clip predicted once, by the fold that held out its actor."""
    data = _data(tmp_path, feature_params)
    table, summary, predictions = _cv(data, train_params(epochs=3))
    assert table["test_speakers"].tolist() == ["syn:1 syn:2", "syn:3 syn:4", "syn:5 syn:6"]
    assert summary["folds"] == 3 and set(summary["per_fold"]) == {"fold1", "fold2", "fold3"}
    assert summary["test_accuracy_mean"] == pytest.approx(table["test_accuracy"].mean(), abs=1e-5)
    assert summary["test_accuracy_std"] == pytest.approx(table["test_accuracy"].std(), abs=1e-5)
    assert summary["test_accuracy_mean"] >= 0.9  # the synthetic classes are separable
    clips = pd.read_parquet(data[1])
    assert sorted(predictions["path"]) == sorted(clips["path"])
    speaker = predictions["path"].map(dict(zip(clips["path"], clips["speaker"])))
    tested_by = {s: fold for fold, speakers in zip(table["fold"], table["test_speakers"]) for s in speakers.split()}
    assert (predictions["fold"] == speaker.map(tested_by)).all()
    assert summary["by_corpus"]["syn"]["accuracy"] == pytest.approx((predictions["predicted"] == predictions["actual"]).mean(),
                                                                     abs=1e-5)
    probs = predictions.filter(like="prob_")
    assert ((probs.sum(axis=1) - 1).abs() < 1e-3).all()
    assert (predictions["predicted"] == probs.idxmax(axis=1).str.removeprefix("prob_")).all()
    per_fold = (predictions["predicted"] == predictions["actual"]).groupby(predictions["fold"]).mean()
    assert per_fold.round(5).tolist() == table["test_accuracy"].tolist()


def _corpora(clips, speakers):
    """Fabricated metadata: each (corpus, speaker count, test speakers) of `speakers`."""
    rows = [{"corpus": corpus, "speaker": f"{corpus}:{i}", "split": "test" if i in test else "train"}
            for corpus, n, test in speakers for i in range(1, n + 1)]
    return pd.DataFrame(rows)


def test_speaker_folds_span_every_corpus_and_leave_the_test_speakers_out():
    clips = _corpora(None, [("ravdess", 10, {9, 10}), ("emodb", 5, {1}), ("tess", 2, {2})])
    folds = speaker_folds(clips, 4)
    assert [f.test for f in folds] == [["emodb:2", "ravdess:1", "ravdess:2"], ["emodb:3", "ravdess:3", "ravdess:4"],
                                       ["emodb:4", "ravdess:5", "ravdess:6"], ["emodb:5", "ravdess:7", "ravdess:8"]]
    for fold in folds:
        assert not set(fold.train) & set(fold.test)
        assert "tess:1" in fold.train  # a corpus's only non-test speaker trains in every fold
        assert not {"ravdess:9", "ravdess:10", "emodb:1", "tess:2"} & set(fold.train + fold.test)  # the test speakers
    with pytest.raises(UserError, match="leave a fold with no speaker to test"):
        speaker_folds(clips, 9)
    with pytest.raises(UserError, match="cv.n_folds must be a whole number >= 2"):
        speaker_folds(clips, 1)
    with pytest.raises(UserError, match="cv.folds must be one of actors, speakers"):
        cv_folds(clips, "random", 4, 4)


def test_speaker_folds_train_on_the_union_and_score_every_corpus(tmp_path, feature_params, monkeypatch):
    from ser import crossval, training

    data = _data(tmp_path, feature_params)
    clips = pd.read_parquet(data[1])
    other = clips["actor"] >= 4  # actors 4-6 are another corpus's speakers (6: its test speaker)
    clips.loc[other, "corpus"] = "other"
    clips.loc[other, "speaker"] = "other:" + clips.loc[other, "actor"].astype(int).astype(str)
    clips.to_parquet(data[1])
    drawn = []
    monkeypatch.setattr(crossval, "fit_ensemble", lambda *a, weights=None, **k: drawn.append(weights) or
                        training.fit_ensemble(*a, weights=weights, **k))
    folds = cv_folds(clips, "speakers", 4, 2)
    assert folds[0] == Fold(["other:5", "syn:3"], ["other:4", "syn:1", "syn:2"])
    table, summary, predictions = cross_validate(data, train_params(epochs=2, balance="corpus"), folds, 1)
    assert all(w is not None for w in drawn)  # corpus-balanced, as the train stage
    assert set(predictions["path"]) == set(clips.loc[clips["split"] != "test", "path"])  # the test speaker: nowhere
    assert summary["by_corpus"]["other"]["clips"] == (clips["speaker"].isin(["other:4", "other:5"])).sum()
    assert set(summary["by_corpus"]) == {"syn", "other"} and table["test_speakers"].tolist() == [
        "other:4 syn:1 syn:2", "other:5 syn:3"]


def test_a_fusion_recipe_fuses_every_fold_with_a_linear_model_of_its_training_actors(tmp_path, feature_params,
                                                                                     monkeypatch):
    from ser import crossval, training

    data = _data(tmp_path, feature_params)
    seen = []
    monkeypatch.setattr(crossval, "fit_head", lambda r, d, clips, *a: seen.append(
        sorted(clips["actor"].unique())) or training.fit_head(r, d, clips, *a))
    fused = train_params(epochs=1, fusion={"weight": 1.0, "c": 0.01})
    table, _, predictions = _cv(data, fused, fold_size=3)
    assert seen == [[4, 5, 6], [1, 2, 3]]
    probs = predictions.filter(like="prob_")
    assert ((probs.sum(axis=1) - 1).abs() < 1e-3).all()
    plain = _cv(data, train_params(epochs=1), fold_size=3)[2].filter(like="prob_")
    assert (probs - plain).abs().max().max() > 0.01  # weight 1: the linear model's probabilities, not the CNN's
    assert table["test_accuracy"].min() >= 0.8  # it learns the functionals that are higher for angry (conftest)


def test_a_seed_ensemble_fold_scores_the_members_averaged_probabilities(tmp_path, feature_params):
    data = _data(tmp_path, feature_params)
    runs = [_cv(data, train_params(epochs=2, seed=seed))[2] for seed in (3, 4)]
    _, _, predictions = _cv(data, train_params(epochs=2, ensemble_seeds=2))
    averaged = (runs[0].filter(like="prob_") + runs[1].filter(like="prob_")) / 2
    assert (predictions["path"] == runs[0]["path"]).all()
    assert (predictions.filter(like="prob_") - averaged).abs().max().max() < 1e-4


def test_the_fold_the_train_stage_trained_scores_its_model_instead_of_training_again(tmp_path, feature_params):
    from ser.features import load
    from ser.metrics import confusion_matrix, scores_from_confusion
    from ser.models import infer, load_checkpoint, save_checkpoint
    from ser.training import load_clips, train

    data = _data(tmp_path, feature_params)  # train 1-5, test 6
    recipe = train_params(epochs=2, ensemble_seeds=2)
    model, _, record = train(recipe, *data, torch.device("cpu"))  # actors 1-5: fold 6's training set
    model_file = tmp_path / "model.pt"
    save_checkpoint(model_file, model, recipe["model"], record["classes"], load(data[0])[2], extra=record)
    table, summary, predictions = _cv(data, recipe, fold_size=1, train_model=str(model_file))
    assert table["model"].tolist() == ["trained here"] * 5 + ["train stage"]
    assert summary["folds_from_train_stage"] == [6] and table.iloc[5]["train_minutes"] == 0
    # its scores are the saved model's on the test actor, as the evaluate stage computes them
    classes = record["classes"]
    x, y, _ = load_clips(*data, classes, split="test")
    probs = infer(load_checkpoint(model_file)[0], x, 8, torch.device("cpu")).softmax(dim=1).numpy()
    fold6 = predictions[predictions["fold"] == 6]
    assert abs(fold6[[f"prob_{c}" for c in classes]].to_numpy() - probs).max() < 1e-5
    expected = scores_from_confusion(confusion_matrix(y.numpy(), probs.argmax(1), 2), classes)
    assert [table.iloc[5]["test_accuracy"], table.iloc[5]["test_uar"]] == [
        round(expected["accuracy"], 5), round(expected["uar"], 5)]
    # another recipe (or no model file) trains every fold
    assert _cv(data, {**recipe, "seed": 4}, 1, train_model=str(model_file))[0]["model"].tolist() == ["trained here"] * 6
    assert _cv(data, recipe, 1, train_model=str(tmp_path / "none.pt"))[0]["model"].tolist() == ["trained here"] * 6
    # features recomputed with other params since the model was trained: it is stale
    params_file = tmp_path / "features" / PARAMS_NAME
    params_file.write_text(json.dumps({**json.loads(params_file.read_text()), "fmin": 40.0}))
    assert _cv(data, recipe, 1, train_model=str(model_file))[0]["model"].tolist() == ["trained here"] * 6


def test_folds_trained_side_by_side_give_what_one_at_a_time_gives_at_their_threads(tmp_path, feature_params):
    data = _data(tmp_path, feature_params)
    recipe = train_params(epochs=2)
    threads = max(1, torch.get_num_threads() // 2)  # what each of 2 workers gets
    _, summary, parallel = _cv(data, recipe, n_jobs=2)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _, _, sequential = _cv(data, recipe)
    finally:
        torch.set_num_threads(before)
    assert parallel.equals(sequential)
    assert summary["folds"] == 3 and summary["folds_from_train_stage"] == []
    with pytest.raises(UserError, match="cv.n_jobs must be a whole number >= 1"):
        _cv(data, recipe, n_jobs=0)
