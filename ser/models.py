"""Model definitions and the self-contained checkpoint format shared by train, evaluate, predict."""
from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ser.audio import FeatureParams
from ser.device import autocast_dtype
from ser.util import atomic_path

CHECKPOINT_FORMAT = 2  # 2: a list of member weights (one for a single model)
STD_FLOOR = 1e-5  # added to the variance before its square root in statistics pooling
# Settings of architectures measured and dropped (docs/decisions.md): a model file that
# has them is loaded only if they hold the one value this model still has.
RETIRED_ARCH = {"convs_per_block": 1, "pooling": "meanstd", "lstm_hidden": 0, "freq_pool": "flatten",
                "deltas": False}


class EmotionCNN(nn.Module):
    """2D CNN over log-Mel: conv blocks (3x3 conv, [BatchNorm], ReLU, 2x2 max-pool, dropout),
    the remaining mel bands of each frame concatenated, statistics pooling over time (each
    feature's mean and standard deviation), and a dense head. Input (batch, n_mels, frames) in
    dB, normalised inside with stored per-bin statistics, then (utterance_norm) each clip's own
    mean per mel bin subtracted (removes the speaker's and the microphone's average spectrum);
    a model of speaker-normalised input (ser.training.speaker_normalise) keeps it.
    Block dropout before a BatchNorm shifts its statistics between training and eval: keep it
    small; the head's dropout does the regularising."""

    def __init__(self, n_mels: int, n_classes: int, channels: list[int], batch_norm: bool,
                 block_dropout: float, head_dropout: float, head_hidden: int, utterance_norm: bool = True) -> None:
        super().__init__()
        self.utterance_norm = utterance_norm
        self.register_buffer("feature_mean", torch.zeros(n_mels))
        self.register_buffer("feature_std", torch.ones(n_mels))
        layers: list[nn.Module] = []
        in_ch = 1
        for out_ch in channels:
            layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=not batch_norm)]
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_ch))
            layers += [nn.ReLU(inplace=True), MaxPool(), nn.Dropout(block_dropout)]
            in_ch = out_ch
        self.conv = nn.Sequential(*layers)
        bands = n_mels // 2 ** len(channels)
        if bands < 1:
            raise ValueError(f"{len(channels)} pooling blocks need at least {2 ** len(channels)} mel bands")
        width = in_ch * bands
        self.head = nn.Sequential(
            nn.Dropout(head_dropout), nn.Linear(2 * width, head_hidden), nn.ReLU(inplace=True),
            nn.Dropout(head_dropout), nn.Linear(head_hidden, n_classes),
        )

    def fuse_for_inference(self) -> "EmotionCNN":
        """Rewrite the conv stack for eval only (the model cannot train after), with the same
        outputs to float rounding; much faster in bfloat16 on CPU, a little in float32:
        - each BatchNorm folded into the conv before it (one pass less over every map);
        - ReLU moved after the max-pool, with which it commutes (the max of ReLUs is the
          ReLU of the max), so it runs on a quarter of the values; the pool as two
          elementwise maxima (MaxPool2x2); dropout, the identity in eval, dropped;
        - weights stored channels-last, which oneDNN runs about twice as fast."""
        layers, i, fused = list(self.conv), 0, []
        while i < len(layers):
            layer, after = layers[i], layers[i + 1] if i + 1 < len(layers) else None
            if isinstance(layer, nn.Conv2d) and isinstance(after, nn.BatchNorm2d):
                fused.append(torch.nn.utils.fusion.fuse_conv_bn_eval(layer, after))
                i += 2
            elif isinstance(layer, nn.ReLU) and _is_pool_2x2(after):
                fused += [MaxPool2x2(), nn.ReLU(inplace=True)]
                i += 2
            else:
                if not isinstance(layer, nn.Dropout):
                    fused.append(layer)
                i += 1
        self.conv = nn.Sequential(*fused)
        return self.eval().to(memory_format=torch.channels_last)

    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std.clamp_min(1e-3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.feature_mean[:, None]) / self.feature_std[:, None]
        if self.utterance_norm:
            x = x - x.mean(dim=2, keepdim=True)  # per clip and mel bin
        x = self.conv(x.unsqueeze(1))  # (B, C, mels', frames')
        x = x.flatten(1, 2).transpose(1, 2)  # (B, frames', C * bands)
        return self.head(statistics_pool(x))


def speaker_statistics(x: torch.Tensor, speakers: list[str] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per clip, its speaker's mean and spread per mel bin (clips, mels) over the speaker's
    sounding frames (frames wholly at the floor, the padding, are left out). Needs no labels,
    only which clips share a speaker."""
    mean, std, speakers = torch.empty(x.shape[:2]), torch.empty(x.shape[:2]), np.asarray(speakers)
    for speaker in np.unique(speakers):
        rows = torch.from_numpy(np.flatnonzero(speakers == speaker))
        xs = x[rows]
        frames = xs.transpose(1, 2)  # (clips, frames, mels)
        sounding = frames[xs.amax(dim=1) > xs.amin() + 1e-3]
        if len(sounding) < 2:
            sounding = frames.reshape(-1, x.shape[1])
        mean[rows], std[rows] = sounding.mean(dim=0), sounding.std(dim=0).clamp_min(1e-3)
    return mean, std


def speaker_normalise(x: torch.Tensor, speakers: list[str] | np.ndarray) -> torch.Tensor:
    """Each clip's log-Mel standardised per mel bin by its speaker's statistics
    (speaker_statistics): the model then hears each clip relative to its own speaker's voice
    and microphone, not to the training speakers'."""
    mean, std = speaker_statistics(x, speakers)
    return (x - mean[:, :, None]) / std[:, :, None]


def statistics_pool(x: torch.Tensor) -> torch.Tensor:
    """Statistics pooling over time, as in x-vectors: (batch, frames, width) -> (batch,
    2 * width), each feature's mean and standard deviation over the frames. The variance
    gets a small floor so that the square root's gradient stays finite where it is 0.
    Computed in float32 under mixed precision: squares overflow float16 and lose the floor in
    bfloat16 (autocast casts the result back for the head)."""
    x = x.float()
    std = (x.var(dim=1, unbiased=False) + STD_FLOOR).sqrt()
    return torch.cat([x.mean(dim=1), std], dim=1)


def _is_pool_2x2(layer: nn.Module | None) -> bool:
    return (isinstance(layer, nn.MaxPool2d) and layer.kernel_size in (2, (2, 2))
            and layer.stride in (2, (2, 2)) and layer.padding in (0, (0, 0))
            and layer.dilation in (1, (1, 1)) and not layer.ceil_mode)


class MaxPool2x2(nn.Module):
    """nn.MaxPool2d(2) for inference, bit for bit: the maximum of even and odd rows, then
    of even and odd columns. max_pool2d also computes argmax indices; in bfloat16 on CPU
    that took as long as all the convolutions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool_2x2(x)


class MaxPool(nn.MaxPool2d):
    """nn.MaxPool2d(2) that takes MaxPool2x2's path when no gradient flows through it (evaluation,
    the adaptation's BatchNorm pass, inference before fusing): the same values bit for bit, about 7x
    faster on CPU, since max_pool2d computes its argmax indices even under no_grad. When a gradient
    flows, max_pool2d's own (its backward sends each gradient to one element, as ever)."""

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return super().forward(x)
        return max_pool_2x2(x)


def max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """max_pool2d(x, 2)'s values: the maximum of even and odd rows, then of even and odd columns."""
    h, w = x.shape[2] // 2 * 2, x.shape[3] // 2 * 2
    x = torch.maximum(x[:, :, 0:h:2, :w], x[:, :, 1:h:2, :w])
    return torch.maximum(x[:, :, :, 0::2], x[:, :, :, 1::2])


class Ensemble(nn.Module):
    """Several models of one arch voting by averaged class probabilities. Returns the log of
    the average, so that softmax(output) is the average and argmax is the ensemble's label:
    a drop-in for a single model's logits."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([m(x).float().softmax(dim=1) for m in self.members]).mean(dim=0)
        return probs.clamp_min(1e-12).log()


class TemperatureScaled(nn.Module):
    """A model whose logits are divided by a fitted temperature (ser.calibration): the same
    labels, probabilities that match how often it is right on held-out speakers."""

    def __init__(self, model: nn.Module, temperature: float) -> None:
        super().__init__()
        self.model, self.temperature = model, float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).float() / self.temperature


# What a model file may ask for, checked before anything is built: a file of a few bytes
# must not make the loader allocate gigabytes (the default model has 0.4 M weights).
MAX_BLOCKS, MAX_CHANNELS, MAX_HEAD_HIDDEN, MAX_CLASSES, MAX_MEMBERS = 8, 1024, 8192, 256, 32
MAX_PARAMETERS = 50_000_000


def check_arch(arch: dict[str, Any], n_mels: int, n_classes: int) -> None:
    """ValueError unless `arch` is a model of bounded size and sane settings."""
    channels, hidden = arch.get("channels"), arch.get("head_hidden")
    if (not isinstance(channels, (list, tuple)) or not 1 <= len(channels) <= MAX_BLOCKS
            or not all(isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= MAX_CHANNELS for c in channels)):
        raise ValueError(f"arch channels {str(channels)[:80]} is not a list of 1-{MAX_BLOCKS} widths of "
                         f"1-{MAX_CHANNELS}")
    if not isinstance(hidden, int) or isinstance(hidden, bool) or not 1 <= hidden <= MAX_HEAD_HIDDEN:
        raise ValueError(f"arch head_hidden {str(hidden)[:80]} is not a width of 1-{MAX_HEAD_HIDDEN}")
    for name in ("block_dropout", "head_dropout"):
        value = arch.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"arch {name} {str(value)[:80]} is not a rate in [0, 1)")
    if not 1 <= n_classes <= MAX_CLASSES:
        raise ValueError(f"{n_classes} classes (1-{MAX_CLASSES} allowed)")
    widths = [1, *channels]
    weights = sum(9 * a * b for a, b in zip(widths, widths[1:]))
    weights += 2 * channels[-1] * max(1, n_mels // 2 ** len(channels)) * hidden + hidden * n_classes
    if weights > MAX_PARAMETERS:
        raise ValueError(f"the arch asks for {weights:,} weights (at most {MAX_PARAMETERS:,})")


def build_model(arch: dict[str, Any], n_mels: int, n_classes: int) -> EmotionCNN:
    """The model of `arch` (channels, batch_norm, block_dropout, head_dropout, head_hidden),
    its size checked first (check_arch). Settings of retired architectures are accepted at the
    one value this model has."""
    arch = dict(arch)
    for name, kept in RETIRED_ARCH.items():
        if name in arch and arch.pop(name) != kept:
            raise ValueError(f"arch setting {name} is no longer supported except as {kept!r} "
                             "(see docs/decisions.md)")
    check_arch(arch, n_mels, n_classes)
    return EmotionCNN(n_mels=n_mels, n_classes=n_classes, **arch)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_checkpoint(path: str | Path, model: EmotionCNN | Ensemble, arch: dict[str, Any],
                    classes: list[str], fp: FeatureParams, extra: dict[str, Any]) -> None:
    """Everything needed to use the model alone; only tensors and plain types, so it loads
    with torch.load(weights_only=True)."""
    members = list(model.members) if isinstance(model, Ensemble) else [model]
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "members": [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in members],
        "arch": dict(arch),
        "classes": list(classes),
        "feature_params": fp.to_dict(),
        "extra": dict(extra),
    }
    # Through memory: torch.save names the archive after the file, and the temp name is
    # random; a fixed name makes the same weights give the same bytes (and DVC hash).
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


class ModelFileError(ValueError):
    """A model file that cannot be used; the message says which file and why."""


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu", fuse: bool = True
                    ) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model (or ensemble) saved by save_checkpoint, in eval mode, plus its metadata;
    with the file's temperature (extra.temperature) applied to its logits. fuse: rewritten for
    inference only (EmotionCNN.fuse_for_inference); False keeps it trainable (ser.adaptation)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no model file (train one with `dvc repro train`)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelFileError(f"{path}: not a loadable model file ({e})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") not in (1, CHECKPOINT_FORMAT):
        raise ModelFileError(f"{path}: not a model file of format {CHECKPOINT_FORMAT}")
    if checkpoint["format"] == 1:  # one model's weights under "state_dict"
        checkpoint["members"] = [checkpoint.get("state_dict")]
    problem = _record_problem(checkpoint)
    if problem:
        raise ModelFileError(f"{path}: not a usable model file ({problem})")
    try:
        fp = FeatureParams.from_dict(checkpoint["feature_params"])
        check_arch({k: v for k, v in checkpoint["arch"].items() if k not in RETIRED_ARCH}, fp.n_mels,
                   len(checkpoint["classes"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{path}: not a usable model file ({str(e).strip().splitlines()[0]})") from None
    try:
        members = []
        for state in checkpoint["members"]:
            members.append(build_model(checkpoint["arch"], fp.n_mels, len(checkpoint["classes"])))
            members[-1].load_state_dict(state)
            members[-1].eval()
            if fuse:
                members[-1].fuse_for_inference()
        model = members[0] if len(members) == 1 else Ensemble(members)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        detail = str(e).strip().splitlines()[0]
        raise ModelFileError(
            f"{path}: weights do not match the file's class list ({len(checkpoint.get('classes', []))} "
            f"classes) or feature params ({detail})") from None
    if checkpoint["extra"].get("temperature"):  # probabilities calibrated on held-out speakers
        model = TemperatureScaled(model, checkpoint["extra"]["temperature"])
    model.to(device).eval()
    meta = {k: checkpoint[k] for k in ("arch", "classes", "extra")}
    meta["feature_params"] = fp
    return model, meta


def _record_problem(checkpoint: dict[str, Any]) -> str | None:
    """What is wrong with a model file's record around its weights, or None."""
    members, classes, extra = checkpoint.get("members"), checkpoint.get("classes"), checkpoint.get("extra")
    if not isinstance(members, list) or not 1 <= len(members) <= MAX_MEMBERS:
        return f"it must hold 1-{MAX_MEMBERS} members' weights"
    if not all(isinstance(m, dict) and m for m in members):
        return "a member has no weights"
    if not isinstance(classes, list) or not all(isinstance(c, str) and c for c in classes) or len(set(classes)) < 2:
        return "its class list is not two or more names"
    if not isinstance(checkpoint.get("arch"), dict) or not isinstance(checkpoint.get("feature_params"), dict):
        return "no arch or feature_params record"
    if not isinstance(extra, dict):
        return "no extra record (a file written by save_checkpoint has one)"
    temperature = extra.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not 0.01 <= temperature <= 100):
        return f"temperature {str(temperature)[:40]} is not a number in [0.01, 100]"
    return None


def fused_copy(model: nn.Module) -> nn.Module:
    """A copy of a loaded model (EmotionCNN, Ensemble, TemperatureScaled of either) with every
    EmotionCNN in it fused for inference; the original stays trainable."""
    copied = copy.deepcopy(model)
    for m in copied.modules():
        if isinstance(m, EmotionCNN):
            m.eval().fuse_for_inference()
    return copied.eval()


@torch.no_grad()
def infer(model: torch.nn.Module, x: torch.Tensor, batch_size: int,
          device: torch.device | str, precision: str = "float32") -> torch.Tensor:
    """Logits for a (clips, mels, frames) tensor, batch by batch, returned on the CPU as
    float32. precision: see autocast_dtype."""
    model.eval()
    device = torch.device(device)
    dtype = autocast_dtype(device, precision)
    outputs = []
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size].to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            outputs.append(model(xb).float().cpu())
    return torch.cat(outputs) if outputs else torch.empty(0)


@torch.no_grad()
def calibrate_batch_norm(model: torch.nn.Module, x: torch.Tensor, batch_size: int,
                         device: torch.device) -> None:
    """Recompute BatchNorm statistics as the plain average over batches of clean
    (unaugmented) clips.
    The running averages lag behind weights that move fast and come from augmented batches;
    on a long run they cost many points on the test actors. Only the BatchNorm
    layers run in train mode: dropout stays off, as at inference, and draws no random numbers
    (so calibrating does not change the training run's augmentation)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms or len(x) == 0:
        return
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
        m.train()
    for start in range(0, len(x), batch_size):
        model(x[start : start + batch_size].to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()
