"""Utterance functionals: what the linear model fused with the CNN hears (ser.fusion).

The CNN sees 64 mel bands with a 64 ms window, which barely resolve a voice's harmonics, so it
misses pitch: the speaker-relative pitch level, range and movement that carry arousal and
valence. Two groups of summary statistics of one clip (or labelling window), NumPy only (no
librosa in the labeller's workers):
- 15 of a YIN pitch track (de Cheveigne & Kawahara 2002) at 8 kHz, 60-450 Hz, 16 ms hop;
- 384 of the log-Mel the CNN gets: per band over the sounding frames, mean, spread, 10th and
  90th percentiles, mean absolute and spread of the frame-to-frame change.
docs/decisions.md ("A linear model on functionals") has what they are worth.
"""
from __future__ import annotations

import numpy as np
import scipy.fft

PITCH_RATE = 8000  # Hz: the pitch track's sample rate (the voice's fundamental is far below 4 kHz)
PITCH_FMIN, PITCH_FMAX = 60.0, 450.0  # search range (Hz)
PITCH_WINDOW = 256  # samples (32 ms) integrated per lag
PITCH_HOP = 128  # samples (16 ms)
YIN_THRESHOLD = 0.1  # the first dip of the normalised difference below this is the period
# A voiced frame is within VOICED_DB of the loudest frame, its pitch inside the search range (not
# at its edges, where YIN lands when it finds none). YIN's dip is not required below a threshold
# as well: that lost frames the linear model needed (measured when the pitch track was built).
VOICED_DB = 30.0
PITCH_NAMES = ("pitch_mean", "pitch_std", "pitch_p10", "pitch_p50", "pitch_p90", "pitch_range",
               "pitch_change", "pitch_rise", "pitch_fall", "voiced_share", "voiced_segments_per_s",
               "duration_s", "voiced_level_mean", "voiced_level_std", "level_std")
LOGMEL_STATS = ("mean", "std", "p10", "p90", "change", "change_std")


def n_functionals(n_mels: int) -> int:
    """How many functionals a clip of n_mels bands has."""
    return len(LOGMEL_STATS) * n_mels + len(PITCH_NAMES)


def yin(y: np.ndarray, sample_rate: int = PITCH_RATE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pitch in Hz, aperiodicity, level in dB relative to the loudest frame) per frame of a
    mono signal at sample_rate: YIN's cumulative mean normalised difference, its first dip below
    YIN_THRESHOLD in the search range (else its minimum), refined by a parabola."""
    tau_min = int(sample_rate / PITCH_FMAX)
    tau_max = int(np.ceil(sample_rate / PITCH_FMIN))
    span = PITCH_WINDOW + tau_max
    y = np.asarray(y, dtype=np.float32)
    if len(y) < span:
        y = np.pad(y, (0, span - len(y)))
    frames = np.lib.stride_tricks.sliding_window_view(y, span)[::PITCH_HOP]
    n_fft = 1 << int(np.ceil(np.log2(span)))  # no wrap-around for lags up to tau_max
    # float32 FFTs (scipy's pocketfft, as the log-Mel): faster than NumPy's float64, the pitch the
    # same to rounding; the energies are summed in float64, where the differences cancel
    head = scipy.fft.rfft(frames[:, :PITCH_WINDOW], n_fft, workers=1)
    whole = scipy.fft.rfft(frames, n_fft, workers=1)
    correlation = scipy.fft.irfft(np.conj(head) * whole, n_fft, workers=1)[:, : tau_max + 1]
    energy = np.zeros((len(frames), span + 1))
    np.cumsum(frames.astype(np.float64) ** 2, axis=1, out=energy[:, 1:])
    shifted = (energy[:, PITCH_WINDOW : PITCH_WINDOW + tau_max + 1] - energy[:, : tau_max + 1]).astype(np.float32)
    difference = np.maximum(shifted[:, :1] + shifted - 2 * correlation, 0.0)
    cumulative = np.cumsum(difference[:, 1:], axis=1)
    normalised = np.ones_like(difference)
    normalised[:, 1:] = difference[:, 1:] * np.arange(1, tau_max + 1, dtype=np.float32) / np.maximum(cumulative, 1e-12)
    lags = np.arange(tau_min, tau_max)
    inner = normalised[:, tau_min:tau_max]
    dips = (inner < YIN_THRESHOLD) & (inner <= normalised[:, tau_min + 1 : tau_max + 1]) & (
        inner < normalised[:, tau_min - 1 : tau_max - 1])
    best = np.where(dips.any(axis=1), dips.argmax(axis=1), inner.argmin(axis=1))
    rows = np.arange(len(frames))
    tau = lags[best]
    left, centre, right = (normalised[rows, tau + k].astype(np.float64) for k in (-1, 0, 1))
    curve = left - 2 * centre + right
    offset = np.where(np.abs(curve) > 1e-12, 0.5 * (left - right) / np.where(curve == 0, 1, curve), 0.0)
    refined = tau + np.clip(offset, -1, 1)
    power = energy[:, PITCH_WINDOW] / PITCH_WINDOW  # mean square of each frame's window
    level = 10 * np.log10(np.maximum(power, 1e-12) / max(power.max(), 1e-12))
    return sample_rate / refined, centre, level


def pitch_functionals(y: np.ndarray, sample_rate: int) -> np.ndarray:
    """The 15 PITCH_NAMES of a mono signal (its silence already trimmed): pitch in semitones
    over the voiced frames, its change between voiced neighbours, how much is voiced and in how
    many stretches, the duration, the level."""
    from ser.dsp import resample

    y8 = resample(np.asarray(y, dtype=np.float32), sample_rate, PITCH_RATE)
    f0, _, level = yin(y8)
    voiced = (level > -VOICED_DB) & (f0 > PITCH_FMIN * 1.03) & (f0 < PITCH_FMAX * 0.98)
    semitones = 12 * np.log2(np.maximum(f0, 1.0) / 27.5)
    pitch = semitones[voiced] if voiced.sum() >= 3 else np.full(3, np.median(semitones))
    change = np.diff(semitones)[voiced[1:] & voiced[:-1]]
    if len(change) < 2:
        change = np.zeros(2)
    starts = np.count_nonzero(np.diff(np.concatenate([[0], voiced.astype(int)])) == 1)
    duration = max(len(y8) / PITCH_RATE, 1e-3)
    voiced_level = level[voiced] if voiced.any() else level
    p10, p50, p90 = np.percentile(pitch, [10, 50, 90])
    return np.array([pitch.mean(), pitch.std(), p10, p50, p90, p90 - p10, np.abs(change).mean(),
                     change[change > 0].mean() if (change > 0).any() else 0.0,
                     change[change < 0].mean() if (change < 0).any() else 0.0,
                     voiced.mean(), starts / duration, duration, voiced_level.mean(), voiced_level.std(),
                     level.std()], dtype=np.float32)


def logmel_functionals(logmel: np.ndarray, floor_db: float) -> np.ndarray:
    """The LOGMEL_STATS of each band of a (mels, frames) log-Mel in dB, over its sounding frames
    (a frame above `floor_db` in some band; padding sits at the floor), all frames when fewer
    than 3 sound: (len(LOGMEL_STATS) * mels,) grouped by statistic."""
    sounding = logmel[:, logmel.max(axis=0) > floor_db + 1e-3]
    if sounding.shape[1] < 3:
        sounding = logmel
    change = np.diff(sounding, axis=1)
    p10, p90 = np.percentile(sounding, [10, 90], axis=1)
    return np.concatenate([sounding.mean(axis=1), sounding.std(axis=1), p10, p90,
                           np.abs(change).mean(axis=1), change.std(axis=1)]).astype(np.float32)


def functionals(logmel: np.ndarray, spoken: np.ndarray, sample_rate: int, floor_db: float) -> np.ndarray:
    """All functionals of one clip: its log-Mel's, then the pitch track's of `spoken` (the
    signal the log-Mel was computed from, without its padding)."""
    return np.concatenate([logmel_functionals(logmel, floor_db), pitch_functionals(spoken, sample_rate)])
