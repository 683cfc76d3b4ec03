"""Test-time adaptation to one speaker group, without labels: information maximisation (SHOT-IM,
Liang et al. 2020) on the CNN's BatchNorm scales and shifts only (as TENT, Wang et al. 2021).

A model trained on some corpora hears a voice from another studio through BatchNorm statistics
and scales learnt on its training voices. Given one speaker group's clips (a sub-folder, a
manifest's speaker), the CNN's BatchNorm statistics are recomputed on them (AdaBN), then its
BatchNorm scales and shifts are trained for a few steps so that the fused prediction of each clip
is confident (low entropy) while the group's predictions stay spread over the classes (high
entropy of their mean; without this term the group collapses onto one class). Nothing else
moves: convolutions, dense head, linear model and temperatures are the trained ones.

The spread term assumes that a group holds several emotions; a group of one emotion is pushed
towards others. Measured in docs/experiments.md (sixteenth session), leave one corpus out and on
groups where one emotion is scarce or dominant. Seeded: the same clips give the same model.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch

from ser.fusion import LinearHead, log_softmax
from ser.models import Ensemble, EmotionCNN, TemperatureScaled

LEARNING_RATE = 1e-3  # Adam, on the BatchNorm affine parameters (TENT's and SHOT's published setting)
BATCH_SIZE = 32
PASSES = 3  # over the group's clips...
MIN_STEPS = 20  # ...but at least this many steps, for a small group
MIN_CLIPS = 8  # a smaller group is not adapted: its spread term would be noise


def batch_norms(model: torch.nn.Module) -> list[torch.nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def adaptation_steps(n_clips: int) -> int:
    """How many steps a group of n_clips gets: PASSES over it, at least MIN_STEPS."""
    return max(MIN_STEPS, PASSES * math.ceil(n_clips / BATCH_SIZE))


def information_loss(log_probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the rows' distributions minus the entropy of their mean (SHOT-IM):
    low when each clip is confident and the clips together use many classes."""
    probs = log_probs.exp()
    conditional = -(probs * log_probs).sum(dim=1).mean()
    mean = probs.mean(dim=0)
    marginal = -(mean * torch.log(mean + 1e-8)).sum()
    return conditional - marginal


def fused_log_probs_torch(logits: torch.Tensor, linear: torch.Tensor | None, fusion_weight: float) -> torch.Tensor:
    """ser.fusion.fused_log_probs with gradients to the CNN's (calibrated) logits: `linear` are the
    linear model's calibrated log-probabilities, a constant here."""
    cnn = torch.log_softmax(logits.float(), dim=1)
    if linear is None or fusion_weight == 0:
        return cnn
    return torch.log_softmax((1 - fusion_weight) * cnn + fusion_weight * linear, dim=1)


def adapt_member(model: EmotionCNN, head: LinearHead | None, temperature: float, x: torch.Tensor,
                 z: np.ndarray | None, seed: int = 0) -> EmotionCNN:
    """A copy of one trained (unfused) CNN adapted to the group of clips x (model input,
    normalised as it expects; z: their standardised functionals for the linear model, if any)."""
    adapted = copy.deepcopy(model).cpu().float()
    norms = batch_norms(adapted)
    if len(x) < MIN_CLIPS or not norms:
        return adapted
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # AdaBN: the group's own BatchNorm statistics, the plain average over batches
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        adapted.eval()
        for m in norms:
            m.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), BATCH_SIZE):
            adapted(x[order[start : start + BATCH_SIZE]])
    adapted.eval()  # the statistics stay the group's; dropout off
    for p in adapted.parameters():
        p.requires_grad_(False)
    trained = [p for m in norms for p in (m.weight, m.bias)]
    for p in trained:
        p.requires_grad_(True)
    optimiser = torch.optim.Adam(trained, lr=LEARNING_RATE)
    weight = 0.0 if head is None else head.fusion_weight
    linear = None if head is None or weight == 0 else torch.from_numpy(
        log_softmax(head.logits(z) / head.temperature)).float()
    order, position = torch.randperm(len(x), generator=generator), 0
    for _ in range(adaptation_steps(len(x))):
        if position + BATCH_SIZE > len(order) and position > 0:  # a new shuffled pass
            order, position = torch.randperm(len(x), generator=generator), 0
        batch = order[position : position + BATCH_SIZE]
        position += BATCH_SIZE
        log_probs = fused_log_probs_torch(adapted(x[batch]) / temperature,
                                          None if linear is None else linear[batch], weight)
        loss = information_loss(log_probs)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    for p in trained:
        p.requires_grad_(False)
    return adapted


def adapt_to_group(model: torch.nn.Module, head: LinearHead | None, temperature: float, x: torch.Tensor,
                   z: np.ndarray | None, seed: int = 0) -> torch.nn.Module:
    """The trained model (an EmotionCNN or an Ensemble of them, unfused) adapted to one speaker
    group's clips x; each ensemble member adapts by itself. The input model is left as it was."""
    if isinstance(model, Ensemble):
        return Ensemble([adapt_member(m, head, temperature, x, z, seed + k) for k, m in enumerate(model.members)])
    if isinstance(model, TemperatureScaled):
        raise TypeError("adapt the unscaled model and pass its temperature")
    return adapt_member(model, head, temperature, x, z, seed)


def adapted_probs(model: torch.nn.Module, head: LinearHead | None, temperature: float, x: torch.Tensor,
                  z: np.ndarray | None, keys: np.ndarray, batch_size: int, device: torch.device) -> torch.Tensor:
    """Fused log-probabilities of clips x (model input; z: standardised functionals) with the model
    adapted to each group of `keys` by itself (adapt_to_group), as ser.training.scored_probs."""
    from ser.training import scored_probs

    out = torch.zeros(len(x), model_classes(model))
    for key in np.unique(keys):
        rows = np.flatnonzero(keys == key)
        rows_z = None if z is None else z[rows]
        adapted = adapt_to_group(model, head, temperature, x[rows], rows_z).to(device)
        out[rows] = scored_probs(adapted, head, x[rows], rows_z, batch_size, device, temperature)
    return out


def model_classes(model: torch.nn.Module) -> int:
    member = model.members[0] if isinstance(model, Ensemble) else model
    return member.head[-1].out_features


class WindowSample:
    """A seeded uniform sample of at most `cap` windows per speaker group, however many the
    group has (reservoir sampling): what the labeller adapts a group's model on, in bounded memory."""

    def __init__(self, cap: int, seed: int = 0) -> None:
        self.cap, self.rng = cap, np.random.default_rng(seed)
        self.seen: dict[str, int] = {}
        self.kept: dict[str, list[tuple[np.ndarray, np.ndarray | None]]] = {}

    def add(self, key: str, features: np.ndarray, functionals: np.ndarray | None) -> None:
        kept = self.kept.setdefault(key, [])
        for i in range(len(features)):
            window = (features[i].copy(), None if functionals is None else functionals[i].copy())
            seen = self.seen.get(key, 0)
            self.seen[key] = seen + 1
            if len(kept) < self.cap:
                kept.append(window)
            else:
                slot = int(self.rng.integers(seen + 1))
                if slot < self.cap:
                    kept[slot] = window

    def windows(self, key: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(features, functionals or None) of the group's kept windows."""
        kept = self.kept.get(key, [])
        features = np.stack([w[0] for w in kept]) if kept else np.empty((0,))
        has_functionals = bool(kept) and kept[0][1] is not None
        return features, np.stack([w[1] for w in kept]) if has_functionals else None


class GroupModels:
    """The model each speaker group is heard by: the trained one (key None, or a group that was
    not adapted) or its adaptation to the group, fused for inference when asked for; a group's
    adaptation is kept as its BatchNorm values only (a few kB), the last model built is cached.
    With no group adapted, the trained model is used as it was given (the labeller's fused one)."""

    def __init__(self, model: torch.nn.Module, states: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
        self.model, self.states = model, states or {}
        self.cached: tuple[str | None, torch.nn.Module] | None = None

    def adapted(self, key: str | None) -> bool:
        return key in self.states

    def model_for(self, key: str | None) -> torch.nn.Module:
        from ser.models import fused_copy

        key = key if key in self.states else None
        if not self.states:
            return self.model
        if self.cached is None or self.cached[0] != key:
            model = fused_copy(self.model) if key is None else fused_copy(self.with_state(self.states[key]))
            self.cached = (key, model)
        return self.cached[1]

    def with_state(self, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        model = copy.deepcopy(self.model)
        model.load_state_dict(state, strict=False)
        return model


def unscaled(model: torch.nn.Module) -> tuple[torch.nn.Module, float]:
    """(the model inside a TemperatureScaled wrapper, its temperature); (model, 1.0) otherwise."""
    return (model.model, model.temperature) if isinstance(model, TemperatureScaled) else (model, 1.0)


def batch_norm_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The BatchNorm parameters and statistics of a model: all that adaptation changes."""
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.rsplit(".", 1)[0] in names}


def adapted_state(model: torch.nn.Module, head: LinearHead | None, x: torch.Tensor, z: np.ndarray | None
                  ) -> dict[str, torch.Tensor]:
    """The BatchNorm state of the loaded (unfused, maybe temperature-scaled) model adapted to the
    group of clips x, keyed as the loaded model's state_dict (GroupModels)."""
    inner, temperature = unscaled(model)
    adapted = adapt_to_group(inner, head, temperature, x, z)
    wrapped = TemperatureScaled(adapted, temperature) if inner is not model else adapted
    return batch_norm_state(wrapped)
