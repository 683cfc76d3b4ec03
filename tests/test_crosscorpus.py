import numpy as np
import pandas as pd
import pytest

from conftest import synthetic_dataset, train_params
from ser.calibration import expected_calibration_error
from ser import crosscorpus
from ser.crosscorpus import leave_one_corpus_out, score_shared
from ser.util import UserError


def _two_corpora(tmp_path, feature_params, encoder=None):
    features, metadata = synthetic_dataset(tmp_path, feature_params, encoder=encoder)  # actors 1-6
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
    # how honest the probabilities are on each corpus with a temperature fitted on the others' (nested)
    assert summary["unseen_temperature"] > 0 and table["unseen_ece"].between(0, 1).all()
    assert set(predictions["split"]) == {"train", "test"}


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


def test_a_fast_recipe_is_scored_without_the_encoder(tmp_path, feature_params, monkeypatch):
    from ser.prosody import n_functionals

    data = _two_corpora(tmp_path, feature_params, encoder="whisper-base")
    widths = []
    score = crosscorpus.scored_probs
    monkeypatch.setattr("ser.crosscorpus.scored_probs", lambda model, head, x, z, *a: widths.append(
        z.shape[1]) or score(model, head, x, z, *a))
    recipe = train_params(epochs=2, normalisation="speaker", encoder=False, fusion={"weight": 0.4, "c": 1.0})
    table, _, predictions = leave_one_corpus_out(data, recipe)
    assert set(widths) == {n_functionals(feature_params.n_mels)}  # the prosody's functionals alone
    assert table["uar"].min() >= 0.8 and np.allclose(predictions.filter(like="prob_").sum(axis=1), 1, atol=1e-3)


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


def test_the_unseen_temperature_is_fitted_on_other_corpora_without_their_test_speakers():
    """Each corpus's figures come from a temperature fitted on the other corpora alone, and only
    on speakers of their train split; the one the model carries from every corpus's."""
    from ser.calibration import soften
    from ser.crosscorpus import unseen_calibration

    rng = np.random.default_rng(2)
    classes = ["angry", "happy", "sad"]
    rows = []
    for corpus, sureness in (("a", 3.0), ("b", 3.0), ("c", 1.0)):
        for i in range(600):
            logits = rng.normal(0, 1.2, 3)
            actual = rng.choice(3, p=np.exp(logits) / np.exp(logits).sum())
            probs = np.exp(sureness * logits) / np.exp(sureness * logits).sum()
            split = "test" if i % 3 == 0 else "train"
            if corpus == "a" and split == "test":  # test speakers told nothing: were they fitted, t would move
                probs = np.eye(3)[(actual + 1) % 3] * 0.98 + 0.02 / 3
            rows.append({"corpus": corpus, "split": split, "actual": classes[actual],
                         **{f"prob_{c}": p for c, p in zip(classes, probs)}})
    predictions = pd.DataFrame(rows)
    unseen, per_corpus = unseen_calibration(predictions, classes)
    assert 2.5 < per_corpus["c"]["unseen_temperature"] < 3.5  # a and b: three times too sure
    assert 1.5 < per_corpus["a"]["unseen_temperature"] < 2.5  # b's 3, c's 1
    assert per_corpus["c"]["unseen_ece"] > 0.1  # c was honest already: a shift learnt elsewhere can hurt
    b = predictions[predictions["corpus"] == "b"]
    probs = b[[f"prob_{c}" for c in classes]].to_numpy()
    y = b["actual"].map(classes.index).to_numpy()
    t = per_corpus["b"]["unseen_temperature"]
    assert per_corpus["b"]["unseen_ece"] == round(expected_calibration_error(soften(probs, t), y), 5)
    assert per_corpus["b"]["unseen_wrong_flagged"] > per_corpus["b"]["wrong_flagged"]
    assert 1.5 < unseen < 3.0
