"""Rooms and microphones the corpora never had, simulated on the cached log-Mel features
(so no audio is decoded again and the cost is a few small tensor operations per batch).

Every corpus here was recorded in one studio with one microphone; the recordings users
label were not. Each training clip gets, each with probability `p` and its own random draw:
- reverb: an exponentially decaying tail (reverb time in `rt60_s`) mixed in at a random
  direct-to-reverberant ratio of -3..10 dB, in the power domain along time;
- microphone EQ: a smooth random curve over the bands, up to +-`eq_db`;
- noise: stationary coloured noise (random tilt from pink to brown) at an SNR in `snr_db`
  relative to the clip's sounding frames;
- band-limiting: a low-pass with its cutoff in `lowpass_hz` (a telephone is 3.4 kHz).
Gain is not simulated: the features are referenced to each clip's peak, so it is a no-op.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ser.audio import FeatureParams, hz_to_mel, mel_to_hz

ROOM_KEYS = ("p", "rt60_s", "eq_db", "snr_db", "lowpass_hz")


def band_centres_hz(fp: FeatureParams) -> torch.Tensor:
    """Centre frequency of each mel band of `fp` (Hz)."""
    edges = np.linspace(hz_to_mel(np.array(fp.fmin)), hz_to_mel(np.array(fp.fmax)), fp.n_mels + 2)
    return torch.tensor(mel_to_hz(edges[1:-1]), dtype=torch.float32)


def db_to_power(db: torch.Tensor) -> torch.Tensor:
    return torch.exp(db * (math.log(10) / 10))  # 10 ** (db / 10), 4x faster on CPU


def _uniform(low: float, high: float, n: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(n)


class RoomAugment:
    """Callable on a batch of dB spectrograms (batch, mels, frames) as the features stage
    wrote them (peak-referenced when fp.top_db is set); returns the same shape and range."""

    def __init__(self, room: dict[str, Any], fp: FeatureParams) -> None:
        missing = [k for k in ROOM_KEYS if k not in room]
        if missing:
            raise ValueError(f"train.augment.room needs {', '.join(missing)}")
        self.r, self.fp = room, fp
        self.hz = band_centres_hz(fp)
        self.frame_s = fp.hop_length / fp.sample_rate
        self.floor_db = -fp.top_db if fp.top_db is not None else 10 * math.log10(fp.amin)

    def _chosen(self, n: int) -> torch.Tensor:
        return torch.rand(n) < self.r["p"]

    def reverb(self, power: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        b, m, t = power[rows].shape
        rt60 = _uniform(*self.r["rt60_s"], b)
        taps = int(math.ceil(max(self.r["rt60_s"]) / self.frame_s))
        k = torch.arange(1, taps + 1, dtype=torch.float32)
        tail = 10 ** (-6.0 * k[None, :] * self.frame_s / rt60[:, None])  # -60 dB after rt60
        tail = tail / tail.sum(dim=1, keepdim=True) * 10 ** (-_uniform(-3, 10, b)[:, None] / 10)
        kernel = tail.flip(1).repeat_interleave(m, dim=0)[:, None, :]  # (b*m, 1, taps), causal
        padded = F.pad(power[rows].reshape(1, b * m, t), (taps, 0))
        wet = F.conv1d(padded, kernel, groups=b * m)[..., :t].reshape(b, m, t)
        out = power.clone()
        out[rows] = power[rows] + wet
        return out

    def noise(self, power: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        b = int(rows.sum())
        clips = power[rows]
        sounding = clips.mean(dim=1) > 10 ** ((self.floor_db + 1) / 10)  # (b, frames)
        level = (clips.mean(dim=1) * sounding).sum(dim=1) / sounding.sum(dim=1).clamp_min(1)
        tilt = _uniform(-6.0, -3.0, b)[:, None] * torch.log2(self.hz / 1000.0)[None, :]  # dB per octave
        shape = 10 ** (tilt / 10)
        shape = shape / shape.mean(dim=1, keepdim=True)
        snr = _uniform(*self.r["snr_db"], b)
        jitter = db_to_power(2 * torch.randn(clips.shape))  # +-2 dB frame to frame
        out = power.clone()
        out[rows] = clips + (level / 10 ** (snr / 10))[:, None, None] * shape[:, :, None] * jitter
        return out

    def eq(self, n: int) -> torch.Tensor:
        """n random microphone curves (n, mels) in dB: a sum of three slow cosines over the bands."""
        bands = torch.arange(self.fp.n_mels, dtype=torch.float32) / self.fp.n_mels
        j = torch.arange(1, 4, dtype=torch.float32)
        amp = _uniform(-1, 1, n * 3).reshape(n, 3) * self.r["eq_db"] / 3
        phase = _uniform(0, 2 * math.pi, n * 3).reshape(n, 3)
        return (amp[:, :, None] * torch.cos(math.pi * j[None, :, None] * bands + phase[:, :, None])).sum(1)

    def lowpass(self, n: int) -> torch.Tensor:
        """n random low-pass curves (n, mels) in dB: flat below the cutoff, -40 dB per octave above."""
        cutoff = _uniform(*self.r["lowpass_hz"], n)
        return -(40 * torch.log2(self.hz[None, :] / cutoff[:, None])).clamp_min(0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, m, _ = x.shape
        power = db_to_power(x.float())
        for effect in (self.reverb, self.noise):  # in the power domain, room first
            rows = self._chosen(n)
            if rows.any():
                power = effect(power, rows)
        curve = torch.zeros(n, m)
        for effect in (self.eq, self.lowpass):  # then the microphone and the line, in dB
            rows = self._chosen(n)
            if rows.any():
                curve[rows] += effect(int(rows.sum()))
        db = 10 * torch.log10(power.clamp_min(1e-30)) + curve[:, :, None]
        if self.fp.top_db is not None:  # back to the features' reference: the peak is 0 dB
            db = db - db.amax(dim=(1, 2), keepdim=True)
        return db.clamp_min(self.floor_db).to(x.dtype)
