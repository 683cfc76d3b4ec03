"""Honest confidence: temperature scaling fitted on speakers the model never trained on,
the expected calibration error, and the `uncertain` rule.

A network trained with cross-entropy on one studio's actors is sure of itself on another
studio's voices. One temperature T divides its logits so that, on held-out speakers (the
metadata's `calibration` split), the probabilities match how often it is right; the ranking
of the classes, so every label, is unchanged. With calibrated probabilities a confidence is
the expected chance of being right, and a clip whose confidence is below UNCERTAIN_BELOW
(more likely wrong than right) is flagged `uncertain`. (The model wrapper is
ser.models.TemperatureScaled; this module imports no torch, for the labeller's fast start.)
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

UNCERTAIN_BELOW = 0.5  # calibrated confidence below this: the label is more likely wrong than right
ECE_BINS = 15


def fit_temperature(logits: "torch.Tensor", y: "torch.Tensor") -> float:
    """The T > 0 minimising the mean negative log-likelihood of softmax(logits / T) on (logits,
    y): a one-dimensional convex problem in log T, solved by bisection on its derivative
    (deterministic, no optimiser settings). Kept within [0.05, 20]."""
    import torch
    import torch.nn.functional as F

    logits, y = logits.double(), y.long()

    def slope(log_t: float) -> float:  # d NLL / d log T
        t = torch.tensor(log_t, dtype=torch.double, requires_grad=True)
        F.cross_entropy(logits / t.exp(), y).backward()
        return float(t.grad)

    low, high = np.log(0.05), np.log(20.0)
    if slope(low) >= 0:
        return 0.05
    if slope(high) <= 0:
        return 20.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if slope(mid) < 0 else (low, mid)
    return float(np.exp((low + high) / 2))


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: over equal-width confidence bins, the clip-weighted mean |accuracy - confidence|."""
    confidence, correct = probs.max(axis=1), (probs.argmax(axis=1) == y).astype(float)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        chosen = which == b
        if chosen.any():
            total += chosen.sum() * abs(correct[chosen].mean() - confidence[chosen].mean())
    return float(total / max(len(y), 1))


def reliability(probs: np.ndarray, y: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """Per confidence bin: its mean confidence, accuracy and clip count (a reliability plot)."""
    confidence, correct = probs.max(axis=1), (probs.argmax(axis=1) == y).astype(float)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    return [{"bin": round((b + 0.5) / bins, 3), "confidence": float(confidence[which == b].mean()),
             "accuracy": float(correct[which == b].mean()), "clips": int((which == b).sum())}
            for b in range(bins) if (which == b).any()]
