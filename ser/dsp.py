"""Signal maths below every feature: resampling, length fixing, the mel scale and its
filterbank (NumPy and soxr; librosa's conventions without importing librosa)."""
from __future__ import annotations

import numpy as np


def resample(y: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    if orig_sr == target_sr:
        return np.ascontiguousarray(y, dtype=np.float32)
    import soxr

    return soxr.resample(y, orig_sr, target_sr, quality="HQ").astype(np.float32)


def fix_length(y: np.ndarray, n_samples: int) -> np.ndarray:
    """Centre-crop or centre-pad with zeros to exactly n_samples."""
    if len(y) > n_samples:
        start = (len(y) - n_samples) // 2
        return y[start : start + n_samples]
    pad = n_samples - len(y)
    return np.pad(y, (pad // 2, pad - pad // 2))


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (librosa's default, htk=False): linear below 1 kHz, log above."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / (200.0 / 3)
    log = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(hz >= 1000.0, log, linear)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    return np.where(mel >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mel - 15.0)), mel * (200.0 / 3))


def mel_band_edges(n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """The n_mels + 2 edge frequencies (Hz) of the mel filters, evenly spaced on Slaney's mel
    scale: band i rises from edge i, peaks at edge i + 1 (its centre) and falls to edge i + 2."""
    return mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular filters on Slaney's mel scale with Slaney's
    area normalisation: librosa.filters.mel's defaults (tested equal), without importing
    librosa, which costs about a second per process (scipy.signal, numba)."""
    fft_hz = np.linspace(0, sample_rate / 2, 1 + n_fft // 2)
    edges_hz = mel_band_edges(n_mels, fmin, fmax)
    ramps = edges_hz[:, None] - fft_hz[None, :]
    widths = np.diff(edges_hz)
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
    return weights.astype(np.float32)
