import numpy as np
import pandas as pd
import pytest

from ser.metrics import balanced_share, confusion_matrix, group_accuracy, scores_from_confusion


def test_confusion_matrix_counts_pairs():
    cm = confusion_matrix(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 2, 0]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_scores_on_a_known_confusion_matrix():
    # rows actual, columns predicted
    cm = np.array([[8, 2, 0],
                   [1, 3, 0],
                   [0, 4, 6]])
    s = scores_from_confusion(cm, ["a", "b", "c"])
    assert s["accuracy"] == pytest.approx(17 / 24)
    recalls = [8 / 10, 3 / 4, 6 / 10]
    precisions = [8 / 9, 3 / 9, 6 / 6]
    f1 = [2 * p * r / (p + r) for p, r in zip(precisions, recalls)]
    assert s["uar"] == pytest.approx(np.mean(recalls))
    assert s["macro_f1"] == pytest.approx(np.mean(f1))
    assert s["per_class"]["b"] == pytest.approx({"precision": 3 / 9, "recall": 0.75, "f1": f1[1], "support": 4})


def test_classes_absent_from_the_test_set_do_not_count_in_uar():
    cm = np.array([[5, 0], [0, 0]])
    s = scores_from_confusion(cm, ["a", "b"])
    assert s["uar"] == 1.0 and s["macro_f1"] == 1.0
    assert s["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_group_accuracy():
    frame = pd.DataFrame({"actual": ["x", "y", "x", "y"], "predicted": ["x", "x", "x", "y"],
                          "sex": ["male", "male", "female", "female"]})
    assert group_accuracy(frame, "sex") == {"female": 1.0, "male": 0.5}


def test_the_balanced_share_shows_a_collapse_whatever_the_class_counts():
    # 90 clips of class 0 all right, 10 of class 1 all called 0: half of a balanced set is 0
    assert balanced_share(np.array([[90, 0], [10, 0]])).tolist() == [1.0, 0.0]
    assert balanced_share(np.array([[9, 1], [0, 10]])).tolist() == [0.45, 0.55]
    assert balanced_share(np.array([[5, 5, 0], [0, 0, 0], [0, 0, 4]])).tolist() == [0.25, 0.25, 0.5]
