import numpy as np
import pytest

from ser.audio import LogMel
from ser.prosody import (LOGMEL_STATS, PITCH_NAMES, PITCH_RATE, logmel_functionals, n_functionals,
                         pitch_functionals, yin)


def voice(f0: np.ndarray, sr: int = PITCH_RATE) -> np.ndarray:
    """A harmonic signal following the pitch contour f0 (one value per sample)."""
    phase = 2 * np.pi * np.cumsum(f0) / sr
    return (np.sin(phase) + 0.5 * np.sin(2 * phase) + 0.25 * np.sin(3 * phase)).astype(np.float32)


@pytest.mark.parametrize("hz", [80.0, 150.0, 220.0, 400.0])
def test_yin_finds_the_pitch_of_a_harmonic_tone(hz):
    f0, aperiodicity, level = yin(voice(np.full(PITCH_RATE, hz)))
    assert np.median(f0) == pytest.approx(hz, rel=0.01)
    assert np.median(aperiodicity) < 0.1 and level.max() == 0.0


def test_pitch_functionals_follow_level_range_and_movement():
    sr = 16000
    t = np.arange(2 * sr) / sr
    steady = pitch_functionals(voice(np.full(len(t), 150.0), sr), sr)
    rising = pitch_functionals(voice(110.0 * 2 ** (t / 2), sr), sr)  # one octave up over 2 s
    names = dict(zip(PITCH_NAMES, range(len(PITCH_NAMES))))
    semitones_150 = 12 * np.log2(150 / 27.5)
    assert steady[names["pitch_mean"]] == pytest.approx(semitones_150, abs=0.2)
    assert steady[names["pitch_range"]] < 0.3 and steady[names["voiced_share"]] > 0.9
    assert steady[names["duration_s"]] == pytest.approx(2.0, abs=0.01)
    assert rising[names["pitch_range"]] == pytest.approx(12 * 0.8, abs=1.0)  # 10th to 90th percentile
    assert rising[names["pitch_rise"]] > 0 and rising[names["pitch_change"]] > steady[names["pitch_change"]]


def test_silence_and_noise_give_finite_functionals():
    rng = np.random.default_rng(0)
    for y in (np.zeros(4000, np.float32), rng.normal(0, 0.1, 100).astype(np.float32)):
        values = pitch_functionals(y, 16000)
        assert values.shape == (len(PITCH_NAMES),) and np.isfinite(values).all()


def test_logmel_functionals_leave_the_padding_out():
    rng = np.random.default_rng(0)
    sounding = rng.normal(-30, 5, (8, 20)).astype(np.float32)
    padded = np.concatenate([np.full((8, 10), -80.0, np.float32), sounding, np.full((8, 15), -80.0, np.float32)], 1)
    values = logmel_functionals(padded, floor_db=-80.0)
    assert values.shape == (len(LOGMEL_STATS) * 8,)
    np.testing.assert_allclose(values, logmel_functionals(sounding, floor_db=-80.0))
    np.testing.assert_allclose(values[:8], sounding.mean(axis=1), rtol=1e-5)


def test_describe_gives_the_log_mel_and_the_functionals_of_the_signal_without_its_padding(feature_params):
    extractor = LogMel(feature_params)
    y = voice(np.full(8000, 200.0), 16000)  # 0.5 s: the log-Mel pads it to 1 s
    logmel, functionals = extractor.describe(y)
    np.testing.assert_array_equal(logmel, extractor(y))
    assert functionals.shape == (n_functionals(feature_params.n_mels),)
    assert functionals[-len(PITCH_NAMES) + PITCH_NAMES.index("duration_s")] == pytest.approx(0.5, abs=0.02)
    assert functionals[-len(PITCH_NAMES) + PITCH_NAMES.index("voiced_share")] > 0.9
