import numpy as np
import pytest
import torch

from ser.fusion import (CLIP_Z, LinearHead, fit_linear, fused_log_probs, group_statistics, average_speaker,
                        standardise, train_head)


def blobs(n=300, d=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    centres = rng.normal(0, 1.5, (k, d))
    return centres[y] + rng.normal(0, 1, (n, d)), y


def test_fit_linear_minimises_scikit_learns_objective():
    from sklearn.linear_model import LogisticRegression

    z, y = blobs()
    weights = np.where(y == 0, 3.0, 1.0)
    w, b = fit_linear(z, y, 3, weights, c=0.05)
    ours = LogisticRegression(C=0.05, max_iter=5000, tol=1e-10).fit(z, y, sample_weight=weights / weights.mean())
    np.testing.assert_allclose(w - w.mean(axis=0), ours.coef_ - ours.coef_.mean(axis=0), atol=2e-3)
    assert fit_linear(z, y, 3, weights, c=0.05)[0].tobytes() == w.tobytes()  # deterministic


def test_a_class_absent_from_training_gets_a_low_probability():
    z, y = blobs()
    w, b = fit_linear(z, y, 4, None, c=1.0)  # class 3 never seen
    head = LinearHead(w, b, 1.0, 1.0, (np.zeros(5), np.ones(5)))
    probs = fused_log_probs(torch.zeros(len(z), 4), z, head).exp().numpy()
    assert probs[:, 3].max() < 0.01


def test_group_statistics_standardise_each_group_by_itself_and_clip():
    f = np.array([[1.0, 0.0], [3.0, 0.0], [10.0, 5.0], [30.0, 5.0], [20.0, 5.0]])
    keys = ["a", "a", "b", "b", "b"]
    z = standardise(f, *group_statistics(f, keys))
    np.testing.assert_allclose(z[:2, 0], [-1, 1])
    np.testing.assert_allclose(z[:, 1], 0)  # a constant functional: no spread, no signal
    assert np.abs(standardise(np.array([[1e9]]), np.zeros(1), np.ones(1))).max() == CLIP_Z
    mean, std = average_speaker(*group_statistics(f, keys), keys)  # every speaker weighs the same, not every clip
    np.testing.assert_allclose(mean, [(2 + 20) / 2, 2.5])
    row_mean, row_std = group_statistics(f, keys)  # the same function serves the bands' torch statistics
    as_torch = average_speaker(torch.from_numpy(row_mean), torch.from_numpy(row_std), keys)
    np.testing.assert_allclose(as_torch[0].numpy(), mean)
    np.testing.assert_allclose(as_torch[1].numpy(), std)


def test_fusion_weighs_the_calibrated_log_probabilities():
    cnn = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    z = np.array([[1.0], [-1.0]])
    head = LinearHead(np.array([[-3.0], [3.0]]), np.zeros(2), 2.0, 0.0, (np.zeros(1), np.ones(1)))
    np.testing.assert_allclose(fused_log_probs(cnn, z, head), torch.log_softmax(cnn, 1), atol=1e-6)
    np.testing.assert_allclose(fused_log_probs(cnn, None, None), torch.log_softmax(cnn, 1), atol=1e-6)
    head.fusion_weight = 1.0
    linear = torch.log_softmax(torch.tensor([[-3.0, 3.0], [3.0, -3.0]]) / 2.0, 1)
    np.testing.assert_allclose(fused_log_probs(cnn, z, head), linear, atol=1e-6)
    head.fusion_weight = 0.5
    fused = fused_log_probs(cnn, z, head)
    np.testing.assert_allclose(fused.exp().sum(1), 1, atol=1e-6)
    np.testing.assert_allclose(fused, torch.log_softmax((torch.log_softmax(cnn, 1) + linear) / 2, 1), atol=1e-6)


def test_a_head_survives_the_model_files_record():
    head = LinearHead(np.ones((2, 3)), np.zeros(2), 1.5, 0.4, (np.arange(3.0), np.ones(3)))
    again = LinearHead.from_record(head.to_record())
    assert again.temperature == 1.5 and again.fusion_weight == 0.4
    np.testing.assert_array_equal(again.weight, head.weight)
    np.testing.assert_array_equal(again.population[0], head.population[0])
    assert LinearHead.from_record(None) is None


def test_train_head_calibrates_on_held_out_speakers_and_can_be_switched_off():
    z, y = blobs(400)
    speakers = np.repeat(np.arange(8), 50)
    held_out = (z[:100] * 3, y[:100], speakers[:100])  # another studio: the same signal, louder
    assert train_head(z, y, speakers, 3, None, {"weight": 0, "c": 0.01}) is None
    assert train_head(z, y, speakers, 3, None, None) is None
    with pytest.raises(ValueError, match="weight"):
        train_head(z, y, speakers, 3, None, {"weight": 2, "c": 0.01})
    head = train_head(z, y, speakers, 3, None, {"weight": 0.4, "c": 10.0}, held_out)
    assert head.fusion_weight == 0.4 and head.temperature != 1.0
    assert train_head(z, y, speakers, 3, None, {"weight": 0.4, "c": 10.0}).temperature == 1.0
