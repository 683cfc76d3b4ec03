"""Honest confidence: temperature scaling fitted on speakers the model never trained on,
the expected calibration error, and the `uncertain` rule.

A network trained with cross-entropy on one studio's actors is sure of itself on another
studio's voices. One temperature T divides its logits so that, on held-out speakers (the
metadata's `calibration` split), the probabilities match how often it is right; the ranking
of the classes, so every label, is unchanged. With calibrated probabilities a confidence is
the expected chance of being right, and a clip whose confidence is below UNCERTAIN_BELOW
(more likely wrong than right) is flagged `uncertain`. (The model wrapper is
ser.models.TemperatureScaled; this module imports no torch, for the labeller's fast start.)

Held-out speakers of the training corpora are not recordings from elsewhere: on a corpus it
never heard the model is right less often and as sure. A second factor, the unseen-corpus
temperature, is fitted on leave-one-corpus-out predictions (ser.crosscorpus) and softens the
labels' probabilities (soften) so that they are honest there (docs/decisions.md, "Confidence
on a corpus never heard").
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


def soften(probs: np.ndarray, temperature: float) -> np.ndarray:
    """probs ** (1 / temperature), renormalised per row: what dividing the fused log-probabilities
    by `temperature` gives (the CNN's and the linear model's temperatures both multiplied by it).
    The ranking of the classes, so every label, is unchanged."""
    if temperature == 1.0:
        return probs
    log_probs = np.log(np.clip(probs, 1e-12, None)) / temperature
    log_probs -= log_probs.max(axis=1, keepdims=True)
    out = np.exp(log_probs)
    return (out / out.sum(axis=1, keepdims=True)).astype(probs.dtype)


def fit_softening(probs: np.ndarray, y: np.ndarray) -> float:
    """The temperature t for soften(probs, t) that minimises the negative log-likelihood of y
    (fit_temperature on the log-probabilities: a row's constant does not move softmax)."""
    import torch

    log_probs = torch.from_numpy(np.log(np.clip(probs, 1e-12, None)).astype(np.float64))
    return fit_temperature(log_probs, torch.from_numpy(np.asarray(y)))


def wrong_flagged(probs: np.ndarray, y: np.ndarray) -> float | None:
    """The share of wrong labels flagged uncertain (confidence below UNCERTAIN_BELOW); None if none is wrong."""
    wrong = probs.argmax(axis=1) != y
    return float((probs[wrong].max(axis=1) < UNCERTAIN_BELOW).mean()) if wrong.any() else None
