"""A linear model on speaker-standardised utterance functionals (ser.prosody, and ser.encoder's summary
of the clip when the features have one), fused with the CNN.

The functionals of each clip are standardised by its speaker's (at labelling time: its group's)
mean and spread, clipped to +-CLIP_Z, and a multinomial logistic regression (L2, LBFGS, clips
weighted as the CNN's epochs draw them) maps them to the classes. Its logits are calibrated by
their own temperature on the calibration speakers, and the fused prediction is the weighted mean
of the two calibrated log-probabilities, renormalised: weight w on the linear model, 1 - w on the
CNN. Why: docs/decisions.md ("A linear model on functionals"). Needs no torch to read (the
labeller's fast start).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

CLIP_Z = 6.0  # standardised functionals are clipped to +-CLIP_Z: one odd window cannot dominate
STD_FLOOR = 1e-6


def group_statistics(f: np.ndarray, keys: np.ndarray | list) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the (mean, std) of the functionals over the rows of its group (keys)."""
    keys = np.asarray(keys)
    mean, std = np.empty(f.shape, dtype=np.float64), np.empty(f.shape, dtype=np.float64)
    for key in np.unique(keys):
        rows = keys == key
        mean[rows], std[rows] = f[rows].mean(axis=0), np.maximum(f[rows].std(axis=0), STD_FLOOR)
    return mean, std


def standardise(f: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Functionals relative to their group's statistics, clipped to +-CLIP_Z."""
    return np.clip((f - mean) / np.maximum(std, STD_FLOOR), -CLIP_Z, CLIP_Z)


def average_speaker(mean: Any, std: Any, keys: np.ndarray | list) -> tuple[Any, Any]:
    """The average speaker's (mean, std) from per-row statistics (NumPy arrays or torch tensors,
    each row its speaker's, keys: each row's speaker): every speaker's statistics averaged, every
    speaker weighing the same, not every clip. For files in no group, or in one too small for
    statistics of its own: the log-Mel bands' (ser.training) and the functionals'."""
    _, first = np.unique(np.asarray(keys), return_index=True)
    first = np.sort(first)  # in the order the speakers first appear
    return mean[first].mean(0), std[first].mean(0)


def fit_linear(z: np.ndarray, y: np.ndarray, n_classes: int, weights: np.ndarray | None, c: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """(weight (classes, functionals), bias) of the multinomial logistic regression minimising
    the clip-weighted mean cross-entropy + ||weight||^2 / (2 c n): scikit-learn's objective with
    C = c and the weights scaled to mean 1. LBFGS in float64 from zeros: deterministic."""
    import torch
    import torch.nn.functional as F

    if not c > 0:
        raise ValueError(f"the linear model's c must be > 0, not {c!r}")
    x, target = torch.from_numpy(np.asarray(z, dtype=np.float64)), torch.from_numpy(np.asarray(y, dtype=np.int64))
    w = torch.ones(len(x), dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    w = w / w.mean()
    weight = torch.zeros(n_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=1000, tolerance_grad=1e-8,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (w * F.cross_entropy(x @ weight.T + bias, target, reduction="none")).mean()
        loss = loss + (weight ** 2).sum() / (2 * c * len(x))
        loss.backward()
        return loss

    optimizer.step(objective)
    return weight.detach().numpy().copy(), bias.detach().numpy().copy()


@dataclass
class LinearHead:
    """The linear model as a model file keeps it (plain lists in the record)."""

    weight: np.ndarray  # (classes, functionals)
    bias: np.ndarray  # (classes,)
    temperature: float  # its logits' calibration on held-out speakers
    fusion_weight: float  # its share of the fused log-probabilities
    population: tuple[np.ndarray, np.ndarray]  # the average training speaker's (mean, std)

    def to_record(self) -> dict[str, Any]:
        return {"weight": self.weight.tolist(), "bias": self.bias.tolist(), "temperature": self.temperature,
                "fusion_weight": self.fusion_weight, "population": [v.tolist() for v in self.population]}

    @classmethod
    def from_record(cls, d: dict[str, Any] | None) -> "LinearHead | None":
        if not d:
            return None
        return cls(np.asarray(d["weight"], dtype=np.float64), np.asarray(d["bias"], dtype=np.float64),
                   float(d["temperature"]), float(d["fusion_weight"]),
                   tuple(np.asarray(v, dtype=np.float64) for v in d["population"]))

    def logits(self, z: np.ndarray) -> np.ndarray:
        """Uncalibrated logits of standardised functionals (rows)."""
        return np.asarray(z, dtype=np.float64) @ self.weight.T + self.bias


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def fused_log_probs(cnn_logits: "torch.Tensor", z: np.ndarray | None, head: LinearHead | None) -> "torch.Tensor":
    """Log-probabilities (float32, rows sum to 1 after exp) of the CNN's calibrated logits fused
    with the linear model's on standardised functionals `z`; the CNN's alone without a head."""
    import torch

    cnn = torch.log_softmax(cnn_logits.double(), dim=1).numpy()
    if head is None or head.fusion_weight == 0:
        return torch.from_numpy(cnn).float()
    linear = log_softmax(head.logits(z) / head.temperature)
    fused = log_softmax((1 - head.fusion_weight) * cnn + head.fusion_weight * linear)
    return torch.from_numpy(fused).float()


def train_head(f: np.ndarray, y: np.ndarray, speakers: np.ndarray, n_classes: int, weights: np.ndarray | None,
               settings: dict[str, Any] | None,
               calibration: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> LinearHead | None:
    """The linear model of recipe settings {weight, c} (None: weight 0 or no settings) on
    functionals `f` standardised per speaker, with labels y and clip weights; its temperature
    fitted on `calibration` (functionals, labels, speakers of held-out speakers; 1 without)."""
    from ser.calibration import fit_temperature

    if not settings or not settings.get("weight"):
        return None
    weight = settings["weight"]
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
        raise ValueError(f"train.fusion.weight must be in [0, 1], not {weight!r}")
    w, b = fit_linear(standardise(f, *group_statistics(f, speakers)), y, n_classes, weights, settings["c"])
    head = LinearHead(w, b, 1.0, float(weight), average_speaker(*group_statistics(f, speakers), speakers))
    if calibration is not None and len(calibration[0]):
        import torch

        f_cal, y_cal, cal_speakers = calibration
        logits = head.logits(standardise(f_cal, *group_statistics(f_cal, cal_speakers)))
        head.temperature = round(fit_temperature(torch.from_numpy(logits), torch.as_tensor(y_cal)), 5)
    return head
