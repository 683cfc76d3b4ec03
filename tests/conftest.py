"""Shared fixtures: synthetic audio written to tmp dirs, small feature params, a tiny model."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import json

import pandas as pd

from ser.audio import FeatureParams
from ser.features import ARRAY_NAME, FUNCTIONALS_NAME, INDEX_NAME, PARAMS_NAME
from ser.prosody import n_functionals

ROOT = Path(__file__).resolve().parents[1]
UNDER_CI = os.environ.get("CI") == "true"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI a skip is a failure: what CI needs (chromium, the mirror, dask) is installed by
    `make test` and lies in ../shared, so a skip there means a test silently did not run."""
    outcome = yield
    report = outcome.get_result()
    if UNDER_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome, report.longrepr = "failed", f"skipped under CI (CI=true): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """The same for a whole module skipped at import (pytest.importorskip)."""
    outcome = yield
    report = outcome.get_result()
    if UNDER_CI and report.skipped:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome, report.longrepr = "failed", f"skipped under CI (CI=true): {reason}"

MIRROR = ROOT.parent / "shared" / "data" / "ravdess" / "Audio_Speech_Actors_01-20_16k.zip"


def write_tone(path: Path, seconds: float = 1.0, sr: int = 16000, channels: int = 1,
               freq: float = 220.0, subtype: str = "PCM_16", amplitude: float = 0.5,
               format: str | None = None) -> Path:
    """A sine tone (with a little seeded noise) as an audio file; format from the suffix
    unless given (Opus: format OGG)."""
    rng = np.random.default_rng(int(freq))
    t = np.arange(int(seconds * sr)) / sr
    y = amplitude * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(len(t))
    data = np.repeat(y[:, None], channels, axis=1).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, sr, subtype=subtype, format=format)
    return path


@pytest.fixture
def feature_params() -> FeatureParams:
    return FeatureParams(sample_rate=16000, duration_s=1.0, n_mels=32, n_fft=512,
                         hop_length=256, fmin=20.0, fmax=8000.0, trim_db=30.0, amin=1e-10, top_db=80.0)


TINY_ARCH = {"channels": [4, 8], "batch_norm": True, "block_dropout": 0.0, "head_dropout": 0.1, "head_hidden": 8}


@pytest.fixture
def tiny_checkpoint(tmp_path, feature_params) -> Path:
    """An untrained but valid model file with the eight RAVDESS classes."""
    import torch

    from ser.corpora import EMOTIONS
    from ser.models import build_model, save_checkpoint

    torch.manual_seed(0)
    model = build_model(TINY_ARCH, feature_params.n_mels, len(EMOTIONS))
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, TINY_ARCH, EMOTIONS, feature_params, extra={})
    return path


def synthetic_dataset(root, feature_params, per_class=24, encoder=None):
    """Two emotions that differ by which mel bands are loud in the first half of the clip (a
    pattern over time: the model subtracts each clip's own mean per band); actors 1-5 train, 6 test.
    encoder (a name): the features say they hold its summary, whose first 16 values tell the emotions apart."""
    rng = np.random.default_rng(0)
    rows, arrays = [], []
    for actor in range(1, 7):
        for emotion, band in (("angry", slice(0, 10)), ("sad", slice(20, 30))):
            for i in range(per_class // 2):
                x = rng.normal(-60, 5, (feature_params.n_mels, feature_params.n_frames))
                x[band, : feature_params.n_frames // 2] += 30
                arrays.append(x.astype(np.float32))
                rows.append({"path": f"a{actor}/{emotion}{i}.wav", "emotion": emotion, "actor": actor,
                             "corpus": "syn", "speaker": f"syn:{actor}",
                             "split": "train" if actor <= 5 else "test"})
    features = root / "features"
    features.mkdir()
    np.save(features / ARRAY_NAME, np.stack(arrays))
    # functionals: noise, but the first 32 are higher for angry (what the linear model can learn)
    functionals = rng.normal(0, 1, (len(rows), n_functionals(feature_params.n_mels))).astype(np.float32)
    functionals[:, :32] += np.array([[3.0] if r["emotion"] == "angry" else [0.0] for r in rows], dtype=np.float32)
    if encoder is not None:
        from dataclasses import replace

        from ser.encoder import n_values

        summary = rng.normal(0, 1, (len(rows), n_values(encoder))).astype(np.float32)
        summary[:, :16] += np.array([[4.0] if r["emotion"] == "angry" else [0.0] for r in rows], dtype=np.float32)
        functionals, feature_params = np.hstack([functionals, summary]), replace(feature_params, encoder=encoder)
    np.save(features / FUNCTIONALS_NAME, functionals)
    pd.DataFrame({"path": [r["path"] for r in rows]}).to_parquet(features / INDEX_NAME)
    (features / PARAMS_NAME).write_text(json.dumps(feature_params.to_dict()))
    pd.DataFrame(rows).to_parquet(root / "metadata.parquet")
    return features, root / "metadata.parquet"


def train_params(**overrides):
    p = {"classes": ["angry", "sad"], "seed": 3, "device": "cpu", "precision": "float32", "epochs": 8,
         "ensemble_seeds": 1, "batch_size": 8, "lr": 0.01, "warmup_fraction": 0.3, "weight_decay": 0.0,
         "label_smoothing": 0.1, "bn_calibration_clips": 16,
         "augment": {"time_shift_frames": 4, "freq_mask": 4, "n_freq_masks": 1, "time_mask": 4, "n_time_masks": 1},
         "model": TINY_ARCH}
    p.update(overrides)
    return p


def fused_model(tmp_path, feature_params, pitch_st: float):
    """A speaker model whose linear model (weight 1: it alone decides) calls a window angry when
    its mean pitch is above the reference, sad below; the average training speaker's pitch is
    `pitch_st` semitones, with a spread of 1 in every functional."""
    import torch

    from ser.corpora import EMOTIONS
    from ser.fusion import LinearHead
    from ser.models import build_model, save_checkpoint
    from ser.prosody import LOGMEL_STATS, PITCH_NAMES, n_functionals

    torch.manual_seed(2)
    arch, d = {**TINY_ARCH, "utterance_norm": False}, n_functionals(feature_params.n_mels)
    pitch = len(LOGMEL_STATS) * feature_params.n_mels + PITCH_NAMES.index("pitch_mean")
    weight = np.zeros((len(EMOTIONS), d))
    weight[EMOTIONS.index("angry"), pitch], weight[EMOTIONS.index("sad"), pitch] = 3.0, -3.0
    population_f = np.zeros(d)
    population_f[pitch] = pitch_st
    head = LinearHead(weight, np.zeros(len(EMOTIONS)), 1.0, 1.0, (population_f, np.ones(d)))
    population = [[-40.0] * feature_params.n_mels, [8.0] * feature_params.n_mels]
    save_checkpoint(tmp_path / "fused.pt", build_model(arch, feature_params.n_mels, len(EMOTIONS)), arch, EMOTIONS,
                    feature_params, extra={"normalisation": "speaker", "population": population,
                                           "fusion": head.to_record()})
    return tmp_path / "fused.pt", head


def local_cluster(n_workers: int = 2):
    """A Dask scheduler and n_workers worker processes on 127.0.0.1 (dashboards there too)."""
    import distributed

    return distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                                    dashboard_address="127.0.0.1:0", silence_logs=40)


@pytest.fixture(scope="module")
def cluster():
    with local_cluster() as c:
        yield c


@pytest.fixture
def recordings(tmp_path):
    """Two speakers' folders of short clips, a long recording, and files that cannot be labelled."""
    d = tmp_path / "in"
    for speaker, freq in (("anna", 200), ("bob", 500)):
        for i in range(9):
            write_tone(d / speaker / f"{i}.wav", seconds=1.0 + 0.1 * i, freq=freq + 37 * i)
    write_tone(d / "long.wav", seconds=14, freq=330)
    (d / "empty.wav").write_bytes(b"")
    (d / "text.wav").write_text("not audio")
    return d
