import math

import pytest
import torch

from ser.augment import RoomAugment, band_centres_hz

ROOM = {"p": 1.0, "rt60_s": [0.4, 0.4], "eq_db": 8, "snr_db": [20, 20], "lowpass_hz": [2000, 2000]}


def speech_like(n: int = 4, mels: int = 32, frames: int = 63) -> torch.Tensor:
    """Peak-referenced dB spectrograms: loud frames 10-30, the floor (-80) elsewhere."""
    torch.manual_seed(0)
    x = torch.full((n, mels, frames), -80.0)
    x[:, :, 10:30] = (-20 + 5 * torch.randn(n, mels, 20)).clamp(-60, 0)
    x[:, 0, 10] = 0.0  # the peak, as the features stage references it
    return x


def test_band_centres_rise_from_fmin_to_fmax(feature_params):
    hz = band_centres_hz(feature_params)
    assert len(hz) == feature_params.n_mels
    assert (hz.diff() > 0).all() and feature_params.fmin < hz[0] < 200 and 7000 < hz[-1] < feature_params.fmax


def test_output_keeps_shape_dtype_and_the_features_reference(feature_params):
    x = speech_like()
    out = RoomAugment(ROOM, feature_params)(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.allclose(out.amax(dim=(1, 2)), torch.zeros(len(x)))  # peak 0 dB, as the features stage writes
    assert out.min() >= -feature_params.top_db
    assert not torch.equal(out, x)


def test_the_same_seed_gives_the_same_rooms(feature_params):
    x = speech_like()
    torch.manual_seed(7)
    a = RoomAugment({**ROOM, "p": 0.5}, feature_params)(x)
    torch.manual_seed(7)
    b = RoomAugment({**ROOM, "p": 0.5}, feature_params)(x)
    assert torch.equal(a, b)


def test_reverb_leaves_a_tail_that_decays_at_the_reverb_time(feature_params):
    room = RoomAugment(ROOM, feature_params)
    power = 10 ** (speech_like(n=1) / 10)
    out = room.reverb(power, torch.tensor([True]))
    assert torch.equal(out[:, :, :30], power[:, :, :30] + (out - power)[:, :, :30])  # nothing before the sound
    tail_db = 10 * torch.log10(out[0, :, 30:].mean(dim=0))
    assert tail_db[0] > -60  # the silence after the speech now rings
    frame_s = feature_params.hop_length / feature_params.sample_rate
    per_frame = (tail_db[2] - tail_db[12]) / 10
    assert per_frame == pytest.approx(60 * frame_s / 0.4, rel=0.15)  # -60 dB after rt60


def test_noise_is_added_at_the_drawn_snr(feature_params):
    room = RoomAugment(ROOM, feature_params)
    power = 10 ** (speech_like(n=2) / 10)
    out = room.noise(power, torch.tensor([True, True]))
    speech = power[:, :, 10:30].mean(dim=(1, 2))
    noise = (out - power)[:, :, 40:].mean(dim=(1, 2))  # where there was only the floor
    snr = 10 * torch.log10(speech / noise)
    assert torch.allclose(snr, torch.full((2,), 20.0), atol=1.5)


def test_lowpass_cuts_above_the_cutoff_and_eq_stays_within_its_range(feature_params):
    room = RoomAugment(ROOM, feature_params)
    hz = band_centres_hz(feature_params)
    curve = room.lowpass(3)
    assert (curve[:, hz < 2000] == 0).all()
    assert (curve[:, hz > 4000] <= -40).all()
    eq = room.eq(50)
    assert eq.abs().max() <= 8 + 1e-5 and eq.abs().max() > 2
    assert (eq.diff(dim=1).abs().max() < 8 * math.pi * 3 / feature_params.n_mels + 1e-4)  # smooth over bands


def test_missing_settings_are_named(feature_params):
    with pytest.raises(ValueError, match="snr_db"):
        RoomAugment({k: v for k, v in ROOM.items() if k != "snr_db"}, feature_params)
