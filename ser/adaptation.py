"""Test-time adaptation to one speaker group, without labels: information maximisation (SHOT-IM,
Liang et al. 2020) on the CNN's BatchNorm scales and shifts only (as TENT, Wang et al. 2021).

A model trained on some corpora hears a voice from another studio through BatchNorm statistics
and scales learnt on its training voices. Given one speaker group's clips (a sub-folder, a
manifest's speaker), the CNN's BatchNorm statistics are recomputed on them (AdaBN), then its
BatchNorm scales and shifts are trained for a few steps so that the fused prediction of each clip
is confident (low entropy) while the group's predictions stay spread over the classes (high
entropy of their mean; without this term the group collapses onto one class). Nothing else
moves: convolutions, dense head and linear model are the trained ones.

The entropy term makes every adapted prediction confident, right or wrong; each group's adapted
logits are therefore divided by the temperature at which the group's mean confidence is the
trained model's (matched_temperature: no labels, only the group's clips). On a CPU with bfloat16
units the labeller runs the adaptation's forward passes in bfloat16 (faster, the same UAR within
rounding on the corpora left out); evaluate and leave-one-corpus-out use float32.

The spread term assumes that a group holds several emotions; a group of one emotion is pushed
towards others (docs/decisions.md, "Adapt the model to each speaker group"). Seeded: the same
clips give the same model.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch

from ser.fusion import LinearHead, log_softmax
from ser.device import autocast_dtype
from ser.models import Ensemble, EmotionCNN, TemperatureScaled, calibrate_batch_norm, fused_copy, infer
from ser.trained import TrainedModel, scored_probs

CPU = torch.device("cpu")

LEARNING_RATE = 1e-3  # Adam, on the BatchNorm affine parameters (TENT's and SHOT's published setting)
BATCH_SIZE = 32
PASSES = 3  # over the group's clips...
MIN_STEPS = 20  # ...but at least this many steps, for a small group
MIN_CLIPS = 8  # a smaller group is not adapted: its spread term would be noise
SAMPLE_SIZE = 256  # a group adapts on a seeded sample of at most this many of its clips or windows: bounded
# time and memory. The labeller keeps such a sample in its first pass; the metrics draw one (adaptation_sample).
MATCH_RANGE = (0.2, 10.0)  # the matched temperature lies within these factors of the trained one
MATCH_STEPS = 40  # bisection steps: the factor to within 1e-10 of its range


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
                 z: np.ndarray | None, seed: int = 0, precision: str = "float32") -> EmotionCNN:
    """A copy of one trained (unfused) CNN adapted to the group of clips x (model input,
    normalised as it expects; z: their standardised functionals for the linear model, if any).
    precision: the steps' forward passes as ser.device.autocast_dtype on the CPU (the weights stay float32)."""
    # channels-last, as training stores it: oneDNN runs the steps about twice as fast on CPU
    adapted = copy.deepcopy(model).cpu().float().to(memory_format=torch.channels_last)
    norms = batch_norms(adapted)
    if len(x) < MIN_CLIPS or not norms:
        return adapted
    generator, dtype = torch.Generator().manual_seed(seed), autocast_dtype(CPU, precision)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        # AdaBN: the group's own BatchNorm statistics, over a shuffled order
        calibrate_batch_norm(adapted, x[torch.randperm(len(x), generator=generator)], BATCH_SIZE, CPU)
    adapted.eval()  # the statistics stay the group's; dropout off
    for p in adapted.parameters():
        p.requires_grad_(False)
    trained = [p for m in norms for p in (m.weight, m.bias)]
    for p in trained:
        p.requires_grad_(True)
    optimiser = Adam(trained, LEARNING_RATE)
    weight, linear = fusion_weight(head), linear_log_probs(head, z)
    order, position = torch.randperm(len(x), generator=generator), 0
    for _ in range(adaptation_steps(len(x))):
        if position + BATCH_SIZE > len(order) and position > 0:  # a new shuffled pass
            order, position = torch.randperm(len(x), generator=generator), 0
        batch = order[position : position + BATCH_SIZE]
        position += BATCH_SIZE
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = adapted(x[batch])
        log_probs = fused_log_probs_torch(logits / temperature, None if linear is None else linear[batch], weight)
        loss = information_loss(log_probs)
        loss.backward()
        optimiser.step()
    for p in trained:
        p.requires_grad_(False)
    return adapted


class Adam:
    """torch.optim.Adam's update, bit for bit (its single-tensor path, which it takes on the CPU),
    written out: torch.optim's first step imports torch._dynamo, 1.3 s of the labeller's 8.6 s
    on 1,200 files. step() applies the gradients and clears them."""

    def __init__(self, params: list[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params, self.lr, self.betas, self.eps, self.steps = params, lr, betas, eps, 0
        self.averages = [torch.zeros_like(p) for p in params]
        self.squares = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        beta1, beta2 = self.betas
        step_size = self.lr / (1 - beta1 ** float(self.steps))
        correction2 = (1 - beta2 ** float(self.steps)) ** 0.5
        for p, average, square in zip(self.params, self.averages, self.squares):
            average.lerp_(p.grad, 1 - beta1)
            square.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            p.addcdiv_(average, (square.sqrt() / correction2).add_(self.eps), value=-step_size)
            p.grad = None


def adapt_to_group(model: torch.nn.Module, head: LinearHead | None, temperature: float, x: torch.Tensor,
                   z: np.ndarray | None, seed: int = 0, precision: str = "float32") -> torch.nn.Module:
    """The trained model (an EmotionCNN or an Ensemble of them, unfused) adapted to one speaker
    group's clips x; each ensemble member adapts by itself. The input model is left as it was."""
    if isinstance(model, Ensemble):
        return Ensemble([adapt_member(m, head, temperature, x, z, seed + k, precision)
                         for k, m in enumerate(model.members)])
    if isinstance(model, TemperatureScaled):
        raise TypeError("adapt the unscaled model and pass its temperature")
    return adapt_member(model, head, temperature, x, z, seed, precision)


def fusion_weight(head: LinearHead | None) -> float:
    return 0.0 if head is None else head.fusion_weight


def linear_log_probs(head: LinearHead | None, z: np.ndarray | None) -> torch.Tensor | None:
    """The linear model's calibrated log-probabilities of standardised functionals z (None without
    one): a constant while the CNN adapts."""
    if head is None or head.fusion_weight == 0:
        return None
    return torch.from_numpy(log_softmax(head.logits(z) / head.temperature)).float()


def mean_confidence(logits: torch.Tensor, linear: torch.Tensor | None, weight: float) -> float:
    """The mean over clips of the fused prediction's top probability (CNN logits already scaled)."""
    return float(fused_log_probs_torch(logits, linear, weight).exp().max(dim=1).values.mean())


def matched_temperature(trained: torch.nn.Module, adapted: torch.nn.Module, head: LinearHead | None,
                        temperature: float, x: torch.Tensor, z: np.ndarray | None, precision: str = "float32") -> float:
    """The temperature for the adapted model's logits at which the group's mean fused confidence
    equals the trained model's (at its own temperature) on the same clips, x and z as adapt_to_group.
    The entropy term makes every adapted prediction confident whether right or not (calibration
    error on the test speakers quadrupled); this gives the group back the trained model's
    confidence, no labels needed. Confidence falls as the temperature rises: bisection."""
    if len(x) < MIN_CLIPS:
        return temperature
    weight, linear = fusion_weight(head), linear_log_probs(head, z)
    device = next(trained.parameters()).device  # the trained model may sit on a GPU; the adapted one is on the CPU
    target = mean_confidence(infer(trained, x, BATCH_SIZE, device, precision) / temperature, linear, weight)
    logits = infer(adapted, x, BATCH_SIZE, CPU, precision)
    low, high = temperature * MATCH_RANGE[0], temperature * MATCH_RANGE[1]
    for _ in range(MATCH_STEPS):
        middle = math.sqrt(low * high)
        surer = mean_confidence(logits / middle, linear, weight) > target
        low, high = (middle, high) if surer else (low, middle)
    return math.sqrt(low * high)


def adapt_and_match(model: torch.nn.Module, head: LinearHead | None, temperature: float, x: torch.Tensor,
                    z: np.ndarray | None, seed: int = 0, precision: str = "float32") -> tuple[torch.nn.Module, float]:
    """(adapt_to_group's model, its matched_temperature): what a speaker group is heard by."""
    adapted = adapt_to_group(model, head, temperature, x, z, seed, precision)
    return adapted, matched_temperature(model, adapted, head, temperature, x, z, precision)


def adapted_probs(model: torch.nn.Module, head: LinearHead | None, temperature: float, x: torch.Tensor,
                  z: np.ndarray | None, keys: np.ndarray, batch_size: int, device: torch.device) -> torch.Tensor:
    """Fused log-probabilities of clips x (model input; z: standardised functionals) with the model
    adapted to each group of `keys` by itself (on its adaptation_sample) at its matched temperature
    (adapt_and_match), as ser.trained.scored_probs."""
    out = torch.zeros(len(x), model_classes(model))
    for key in np.unique(keys):
        rows = np.flatnonzero(keys == key)
        sample = rows[adaptation_sample(len(rows))]
        adapted, matched = adapt_and_match(model, head, temperature, x[sample], None if z is None else z[sample])
        rows_z = None if z is None else z[rows]
        out[rows] = scored_probs(adapted.to(device), head, x[rows], rows_z, batch_size, device, matched)
    return out


def adaptation_sample(n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded uniform sample of min(n, SAMPLE_SIZE) of a group's n clips: what
    the group adapts on, so that the metrics score what the labeller does (3 passes over a 1,400-clip
    group's every clip scored 5 points more on TESS left out than its 256-window sample gives)."""
    if n <= SAMPLE_SIZE:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, SAMPLE_SIZE, replace=False))


def model_classes(model: torch.nn.Module) -> int:
    member = model.members[0] if isinstance(model, Ensemble) else model
    return member.head[-1].out_features


class WindowSample:
    """A seeded uniform sample of at most `cap` windows per speaker group, however many the
    group has (reservoir sampling): what the labeller adapts a group's model on, in bounded memory.
    Each group draws from its own generator, so its sample depends on its own windows only (the
    same whether its files are read with other groups' or alone, as on a cluster)."""

    def __init__(self, cap: int, seed: int = 0) -> None:
        self.cap, self.seed = cap, seed
        self.rngs: dict[str, np.random.Generator] = {}
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
                rng = self.rngs.setdefault(key, np.random.default_rng(self.seed))
                slot = int(rng.integers(seen + 1))
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
    not adapted; its fused `inference`) or its adaptation to the group, fused for inference; a
    group's adaptation is kept as its BatchNorm values and matched temperature only (a few kB),
    the last model built is cached."""

    def __init__(self, trained: TrainedModel,
                 states: dict[str, tuple[dict[str, torch.Tensor], float]] | None = None) -> None:
        self.trained, self.states = trained, states or {}
        self.cached: tuple[str, torch.nn.Module] | None = None

    def adapted(self, key: str | None) -> bool:
        return key in self.states

    def model_for(self, key: str | None) -> torch.nn.Module:
        if key not in self.states:
            return self.trained.inference
        if self.cached is None or self.cached[0] != key:
            self.cached = (key, fused_copy(self.with_state(*self.states[key])))
        return self.cached[1]

    def with_state(self, state: dict[str, torch.Tensor], temperature: float) -> torch.nn.Module:
        inner = copy.deepcopy(self.trained.network)
        unexpected = inner.load_state_dict(state, strict=False).unexpected_keys  # BatchNorm keys only
        if unexpected:
            raise ValueError(f"not this model's BatchNorm state: {unexpected[:3]}")
        return TemperatureScaled(inner, temperature)


def batch_norm_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The BatchNorm parameters and statistics of a model: all that adaptation changes."""
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.rsplit(".", 1)[0] in names}


def adapted_state(trained: TrainedModel, x: torch.Tensor, z: np.ndarray | None, precision: str = "float32"
                  ) -> tuple[dict[str, torch.Tensor], float]:
    """(the BatchNorm state, the matched temperature) of the trained model adapted to the group of
    clips x (z: their standardised functionals), the state keyed as its network's (GroupModels)."""
    adapted, matched = adapt_and_match(trained.network, trained.head, trained.temperature or 1.0, x, z,
                                       precision=precision)
    return batch_norm_state(adapted), matched
