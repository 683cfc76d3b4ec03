"""ser.evaluation on tiny cases whose figures are known by hand."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from ser.evaluation import confidence_figures, per_corpus, score_test_speakers
from ser.trained import TrainedModel

CLASSES = ["angry", "sad"]


def test_per_corpus_scores_each_corpus_on_its_own_clips():
    frame = pd.DataFrame({"corpus": ["a", "a", "a", "a", "b", "b"],
                          "actual": ["angry", "angry", "sad", "sad", "sad", "sad"],
                          "predicted": ["angry", "sad", "sad", "sad", "angry", "sad"]})
    result = per_corpus(frame, CLASSES)
    assert result["a"]["accuracy"] == pytest.approx(0.75) and result["a"]["clips"] == 4
    assert result["a"]["uar"] == pytest.approx((0.5 + 1.0) / 2)  # recall of angry 1/2, of sad 2/2
    assert result["b"]["accuracy"] == pytest.approx(0.5) and result["b"]["uar"] == pytest.approx(0.5)  # sad only


def test_confidence_figures_count_the_uncertain_and_how_often_each_side_is_right():
    probs = np.array([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.4, 0.35, 0.25], [0.3, 0.45, 0.25]])
    y = np.array([0, 1, 0, 2])
    result = confidence_figures(probs, y, 1.5)
    assert result["temperature"] == 1.5
    assert result["uncertain_share"] == 0.5  # the two below 0.5
    assert result["accuracy_when_certain"] == 0.5 and result["accuracy_when_uncertain"] == 0.5
    assert 0 <= result["test_ece"] <= 1


class Oracle(torch.nn.Module):
    """Calls each clip the class written in its first value, with logits +-2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sad = x[:, 0, 0].round()
        return torch.stack([2 - 4 * sad, 4 * sad - 2], dim=1)


def test_scoring_four_clips_of_two_speakers(feature_params):
    raw = torch.zeros(4, 3, 5)
    raw[:, 0, 0] = torch.tensor([0.0, 1.0, 1.0, 1.0])  # the model's calls: angry, sad, sad, sad
    y = torch.tensor([0, 1, 1, 0])  # the last call is wrong
    clips = pd.DataFrame({"path": [f"{i}.wav" for i in range(4)], "corpus": ["c"] * 4,
                          "speaker": ["c:1", "c:1", "c:2", "c:2"], "sex": ["f", "f", "m", "m"],
                          "intensity": [None] * 4, "actor": [1, 1, 2, 2]})
    trained = TrainedModel(Oracle(), CLASSES, feature_params, {})
    metrics, frame, cm, probs = score_test_speakers(trained, raw, y, clips, None, 2)
    assert metrics["test_accuracy"] == pytest.approx(0.75) and metrics["test_clips"] == 4
    assert metrics["test_uar"] == pytest.approx((0.5 + 1.0) / 2)
    assert cm.tolist() == [[1, 1], [0, 2]]
    assert metrics["accuracy_by_sex"] == {"f": 1.0, "m": 0.5}
    assert metrics["test_actors"] == [1, 2] and metrics["test_speakers"] == ["c:1", "c:2"]
    right, wrong = math.log(1 + math.exp(-4)), math.log(1 + math.exp(4))  # cross-entropy of logits +-2
    assert metrics["test_loss"] == pytest.approx((3 * right + wrong) / 4, rel=1e-5)
    assert frame["predicted"].tolist() == ["angry", "sad", "sad", "sad"]
    np.testing.assert_allclose(probs.max(axis=1), 1 / (1 + math.exp(-4)), rtol=1e-5)
    assert metrics["by_grouping"] == {}  # a clip-normalised model: no speaker groupings to compare
