"""Shared fixtures: synthetic audio written to tmp dirs, small feature params, a tiny model."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.audio import FeatureParams  # noqa: E402

MIRROR = ROOT.parent / "shared" / "data" / "ravdess" / "Audio_Speech_Actors_01-20_16k.zip"


def write_tone(path: Path, seconds: float = 1.0, sr: int = 16000, channels: int = 1,
               freq: float = 220.0, subtype: str = "PCM_16", amplitude: float = 0.5) -> Path:
    """A sine tone (with a little seeded noise) as an audio file; format from the suffix."""
    rng = np.random.default_rng(int(freq))
    t = np.arange(int(seconds * sr)) / sr
    y = amplitude * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(len(t))
    data = np.repeat(y[:, None], channels, axis=1).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, sr, subtype=subtype)
    return path


@pytest.fixture
def feature_params() -> FeatureParams:
    return FeatureParams(sample_rate=16000, duration_s=1.0, n_mels=32, n_fft=512,
                         hop_length=256, fmin=20.0, fmax=8000.0, trim_db=30.0, amin=1e-10, top_db=80.0)


TINY_ARCH = {"channels": [4, 8], "convs_per_block": 1, "batch_norm": True, "block_dropout": 0.0, "head_dropout": 0.1,
             "head_hidden": 8, "pooling": "meanmax", "lstm_hidden": 0}


@pytest.fixture
def tiny_checkpoint(tmp_path, feature_params) -> Path:
    """An untrained but valid model file with the eight RAVDESS classes."""
    import torch

    from stages.labels import EMOTIONS
    from stages.models import build_model, save_checkpoint

    torch.manual_seed(0)
    model = build_model(TINY_ARCH, feature_params.n_mels, len(EMOTIONS))
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, TINY_ARCH, EMOTIONS, feature_params, extra={})
    return path
