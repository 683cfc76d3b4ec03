"""Scores of predictions: confusion matrix, accuracy, UAR, macro F1, per-class and per-group
figures, and the confusion-matrix picture."""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ser.util import atomic_path


def confusion_matrix(actual: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """cm[i, j] = number of clips of class i predicted as class j."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (actual, predicted), 1)
    return cm


def scores_from_confusion(cm: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, unweighted average recall (UAR), macro F1 and per-class precision/recall/F1.
    A class with no predictions (or no clips) gets precision (or recall) 0."""
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1).astype(float)
    predicted = cm.sum(axis=0).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    present = support > 0  # UAR and macro F1 average over the classes the test set has
    return {
        "accuracy": float(tp.sum() / cm.sum()) if cm.sum() else 0.0,
        "uar": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {
            c: {"precision": float(precision[i]), "recall": float(recall[i]),
                "f1": float(f1[i]), "support": int(support[i])}
            for i, c in enumerate(classes)
        },
    }


def group_accuracy(frame: pd.DataFrame, column: str) -> dict[str, float]:
    correct = frame["actual"] == frame["predicted"]
    return {str(k): round(float(v), 5) for k, v in correct.groupby(frame[column]).mean().items()}


def plot_confusion(cm: np.ndarray, classes: list[str], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if rates[i, j] > 0.5 else "black", fontsize=9)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="share of the actual class")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def round_floats(value: Any, digits: int = 5) -> Any:
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: round_floats(v, digits) for k, v in value.items()}
    return value


def balanced_share(cm: np.ndarray) -> np.ndarray:
    """Each class's share of the predictions on a balanced set: the rows of the confusion
    matrix (actual classes) as rates, averaged. A model that collapses onto one class shows it
    here whatever the corpus's class counts."""
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    return rates[cm.sum(axis=1) > 0].mean(axis=0)
