import numpy as np
import pandas as pd
import pytest

from conftest import synthetic_dataset, train_params
from ser.crosscorpus import leave_one_corpus_out, score_shared
from ser.util import UserError


def _two_corpora(tmp_path, feature_params):
    features, metadata = synthetic_dataset(tmp_path, feature_params)  # actors 1-6
    clips = pd.read_parquet(metadata)
    clips["corpus"] = np.where(clips["actor"] <= 3, "studio_a", "studio_b")
    clips["speaker"] = clips["corpus"] + ":" + clips["actor"].astype(str)
    clips.to_parquet(metadata)
    return str(features), str(metadata)


def test_every_corpus_is_scored_by_a_model_that_never_heard_it(tmp_path, feature_params):
    data = _two_corpora(tmp_path, feature_params)
    table, summary, predictions = leave_one_corpus_out(data, train_params(epochs=4, normalisation="speaker"))
    assert table["left_out"].tolist() == ["studio_a", "studio_b"]
    assert table["trained_on"].tolist() == ["studio_b", "studio_a"]
    assert table["test_clips"].tolist() == [72, 72] and table["not_scored"].tolist() == [0, 0]
    assert summary["corpora"] == ["studio_a", "studio_b"]
    assert summary["uar_min"] == table["uar"].min() and summary["uar_min"] >= 0.9  # separable classes
    clips = pd.read_parquet(data[1])
    assert sorted(predictions["path"]) == sorted(clips["path"])
    per_corpus = (predictions["actual"] == predictions["predicted"]).groupby(predictions["corpus"]).mean()
    assert per_corpus.round(5).tolist() == table["accuracy"].tolist()
    probs = predictions.filter(like="prob_")  # calibrated, every class the model has: e.g. to score a fusion
    assert list(probs.columns) == [f"prob_{c}" for c in table["classes"][0].split()]  # the model's classes
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-3)
    assert (probs.idxmax(axis=1).str[5:] == predictions["predicted"]).all()  # both corpora have every class
    # scored as the labeller hears them with less to go on: a flat folder, each clip alone, no one
    for grouping in ("corpus", "clip", "population"):
        assert table[f"{grouping}_uar"].between(0, 1).all()
        assert summary["per_corpus"]["studio_a"][f"{grouping}_uar"] == table[f"{grouping}_uar"][0]
    # separable by pattern over time: by speaker or as one folder, still right
    assert table["corpus_uar"].min() >= 0.9
    # and with the model adapted to each speaker, and to the flat folder (ser.adaptation): still right
    for grouping in ("speaker", "corpus"):
        assert table[f"adapted_{grouping}_uar"].min() >= 0.9
        assert table[f"adapted_{grouping}_ece"].between(0, 1).all()  # at the matched temperature
        assert table[f"adapted_{grouping}_uncertain_share"].between(0, 1).all()
        assert summary["per_corpus"]["studio_a"][f"adapted_{grouping}_uar"] == table[f"adapted_{grouping}_uar"][0]
    assert summary["per_corpus"]["studio_b"]["most_predicted_balanced"] == table["most_predicted_balanced"][1]


def test_a_fusion_recipe_is_scored_fused_and_its_linear_model_never_hears_the_left_out_corpus(
        tmp_path, feature_params, monkeypatch):
    from ser import training

    data = _two_corpora(tmp_path, feature_params)
    seen = []
    fit_head = training.fit_head
    monkeypatch.setattr("ser.crosscorpus.fit_head", lambda r, d, clips, *a: seen.append(
        set(clips["corpus"])) or fit_head(r, d, clips, *a))
    recipe = train_params(epochs=1, normalisation="speaker", fusion={"weight": 1.0, "c": 0.01})
    table, _, predictions = leave_one_corpus_out(data, recipe)
    assert seen == [{"studio_b"}, {"studio_a"}]
    assert table["fusion_temperature"].notna().all()
    assert np.allclose(predictions.filter(like="prob_").sum(axis=1), 1, atol=1e-3)
    # weight 1: the linear model alone, which learns the functionals that are higher for angry (conftest)
    assert table["uar"].min() >= 0.8


def test_a_clip_normalised_model_is_scored_once(tmp_path, feature_params):
    table, summary, _ = leave_one_corpus_out(_two_corpora(tmp_path, feature_params), train_params(epochs=2))
    assert "clip_uar" not in table.columns and "uar" in summary["per_corpus"]["studio_a"]
    assert "adapted_speaker_uar" not in table.columns  # adaptation is to a speaker group


def test_one_corpus_is_not_enough(tmp_path, feature_params):
    features, metadata = synthetic_dataset(tmp_path, feature_params)
    with pytest.raises(UserError, match="needs two corpora or more"):
        leave_one_corpus_out((str(features), str(metadata)), train_params(epochs=1))


def test_a_corpus_is_scored_on_the_classes_both_sides_share():
    classes = ["neutral", "calm", "happy"]
    probs = np.array([[0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.1, 0.8, 0.1]])  # the first would be "calm"
    # the test corpus lacks calm: its clips are scored among neutral and happy
    scores, cm, names, scored = score_shared(probs[:2], np.array([0, 2]), classes, trained={0, 1, 2})
    assert names == ["neutral", "happy"] and scores["accuracy"] == 1.0 and cm.tolist() == [[1, 0], [0, 1]]
    # training lacked calm: the test corpus's calm clip is counted, not scored
    scores, cm, names, scored = score_shared(probs, np.array([0, 2, 1]), classes, trained={0, 2})
    assert names == ["neutral", "happy"] and scored.tolist() == [True, True, False] and scores["accuracy"] == 1.0
