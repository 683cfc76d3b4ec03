import pytest
import torch

from conftest import TINY_ARCH
from ser.corpora import EMOTIONS
from ser.models import ModelFileError, build_model, calibrate_batch_norm, count_parameters, infer, load_checkpoint


@pytest.mark.parametrize("change", [{}, {"batch_norm": False}, {"channels": [4, 8, 16], "block_dropout": 0.2}])
def test_forward_shapes(change):
    model = build_model({**TINY_ARCH, **change}, n_mels=32, n_classes=8)
    assert model(torch.randn(3, 32, 63)).shape == (3, 8)
    assert count_parameters(model) > 0


def test_statistics_pooling_gives_each_features_mean_and_spread_over_time():
    from ser.models import statistics_pool

    x = torch.tensor([[[0.0, 1.0], [10.0, 1.0], [0.0, 1.0], [10.0, 1.0]]], requires_grad=True)  # (1, 4 frames, 2)
    pooled = statistics_pool(x)
    torch.testing.assert_close(pooled, torch.tensor([[5.0, 1.0, 5.0, 0.0]]), atol=5e-3, rtol=0)
    pooled.sum().backward()  # feature 2 does not vary: the floor keeps the gradient finite
    assert torch.isfinite(x.grad).all()


def test_statistics_pooling_runs_in_float32_under_bfloat16_autocast():
    from ser.models import statistics_pool

    x = torch.full((1, 4, 1), 300.0, dtype=torch.bfloat16)
    x[0, ::2] = 0.0
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        pooled = statistics_pool(x)
        logits = build_model(TINY_ARCH, 32, 8).eval()(torch.randn(2, 32, 63))
    assert pooled.dtype == torch.float32
    torch.testing.assert_close(pooled, torch.tensor([[150.0, 150.0]]))
    assert logits.shape == (2, 8) and torch.isfinite(logits).all()


def test_settings_of_retired_architectures_load_only_at_the_value_kept():
    """Model files of the previous layout carry cnn4's full settings: they still load."""
    old_cnn4 = {**TINY_ARCH, "convs_per_block": 1, "pooling": "meanstd", "lstm_hidden": 0, "freq_pool": "flatten",
                "utterance_norm": True, "deltas": False}
    assert build_model(old_cnn4, 32, 8)(torch.randn(2, 32, 63)).shape == (2, 8)
    for retired in ({"pooling": "attention"}, {"lstm_hidden": 64}, {"convs_per_block": 2}, {"deltas": True}):
        with pytest.raises(ValueError, match=f"arch setting {next(iter(retired))} is no longer supported"):
            build_model({**TINY_ARCH, **retired}, 32, 8)


def test_the_default_shape_from_params():
    import yaml

    from conftest import ROOT

    arch = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]["model"]
    assert build_model(arch, 64, 8)(torch.randn(2, 64, 201)).shape == (2, 8)


def test_checkpoint_round_trip_with_weights_only(tiny_checkpoint, feature_params):
    raw = torch.load(tiny_checkpoint, weights_only=True)
    assert raw["classes"] == EMOTIONS and raw["feature_params"] == feature_params.to_dict()
    model, meta = load_checkpoint(tiny_checkpoint)
    assert meta["feature_params"] == feature_params and not model.training
    x = torch.randn(4, feature_params.n_mels, feature_params.n_frames)
    again, _ = load_checkpoint(tiny_checkpoint)
    torch.testing.assert_close(infer(model, x, 3, "cpu"), infer(again, x, 2, "cpu"))


def test_bad_model_files_are_refused_clearly(tmp_path):
    with pytest.raises(ModelFileError, match="no model file"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ModelFileError, match="junk.pt: not a loadable model file"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ModelFileError, match="not a model file of format"):
        load_checkpoint(tmp_path / "other.pt")


def test_normalisation_is_part_of_the_model(tiny_checkpoint):
    model, _ = load_checkpoint(tiny_checkpoint)
    assert "feature_mean" in model.state_dict() and "feature_std" in model.state_dict()


def test_a_model_whose_weights_do_not_match_its_classes_or_features_is_refused(tiny_checkpoint):
    raw = torch.load(tiny_checkpoint, weights_only=True)
    torch.save({**raw, "classes": ["angry", "sad"]}, tiny_checkpoint)
    with pytest.raises(ModelFileError, match="do not match the file's class list \\(2 classes\\)"):
        load_checkpoint(tiny_checkpoint)
    torch.save({**raw, "feature_params": {**raw["feature_params"], "n_mels": 40}}, tiny_checkpoint)
    with pytest.raises(ModelFileError, match="feature params"):
        load_checkpoint(tiny_checkpoint)


def test_the_same_weights_give_the_same_file_bytes(tmp_path, feature_params):
    from conftest import TINY_ARCH
    from ser.models import save_checkpoint

    torch.manual_seed(0)
    model = build_model(TINY_ARCH, feature_params.n_mels, 8)
    for name in ("a.pt", "b.pt"):
        save_checkpoint(tmp_path / name, model, TINY_ARCH, EMOTIONS, feature_params, extra={})
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()


def test_utterance_norm_ignores_a_constant_gain():
    model = build_model(TINY_ARCH, n_mels=32, n_classes=8).eval()
    x = torch.randn(2, 32, 63)
    torch.testing.assert_close(model(x), model(x + 12.0), rtol=1e-4, atol=1e-4)


def test_an_ensemble_round_trips_and_averages_its_members_probabilities(tmp_path, feature_params):
    from ser.models import Ensemble, save_checkpoint

    torch.manual_seed(0)
    members = [build_model(TINY_ARCH, feature_params.n_mels, 8).eval() for _ in range(3)]
    x = torch.randn(5, feature_params.n_mels, feature_params.n_frames)
    with torch.no_grad():
        expected = torch.stack([m(x).softmax(dim=1) for m in members]).mean(dim=0)
    save_checkpoint(tmp_path / "e.pt", Ensemble(members), TINY_ARCH, EMOTIONS, feature_params, extra={})
    model, _ = load_checkpoint(tmp_path / "e.pt")
    assert isinstance(model, Ensemble) and len(model.members) == 3 and not model.training
    torch.testing.assert_close(infer(model, x, 2, "cpu").softmax(dim=1), expected)


def test_fusing_batch_norm_for_inference_keeps_the_outputs(feature_params):
    torch.manual_seed(0)
    model = build_model({**TINY_ARCH, "channels": [4, 8, 16]}, feature_params.n_mels, 8)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # non-trivial statistics
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.normal_()
    model.eval()
    x = torch.randn(3, feature_params.n_mels, feature_params.n_frames)
    with torch.no_grad():
        expected = model(x)
        fused = model.fuse_for_inference()
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
        torch.testing.assert_close(fused(x), expected, rtol=1e-4, atol=1e-4)


def test_inference_rewrite_keeps_the_outputs_bit_for_bit_in_the_pool():
    from ser.models import MaxPool2x2

    x = torch.randn(2, 5, 17, 33).contiguous(memory_format=torch.channels_last)
    assert torch.equal(MaxPool2x2()(x), torch.nn.functional.max_pool2d(x, 2))
    model = build_model({**TINY_ARCH, "block_dropout": 0.2}, 32, 8).eval()
    y = torch.randn(4, 32, 40)
    with torch.no_grad():
        expected = model(y)
        fused = model.fuse_for_inference()
        kinds = [type(m).__name__ for m in fused.conv]
        assert "MaxPool2d" not in kinds and "Dropout" not in kinds and kinds.index("MaxPool2x2") < kinds.index("ReLU")
        torch.testing.assert_close(fused(y), expected, rtol=1e-4, atol=1e-4)


def test_the_pool_takes_the_fast_path_only_where_no_gradient_flows_with_the_same_values(monkeypatch):
    from ser.models import MaxPool

    x = torch.relu(torch.randn(3, 4, 17, 33)).to(torch.bfloat16)  # ties at 0, as after a ReLU
    with torch.no_grad():
        assert torch.equal(MaxPool()(x), torch.nn.functional.max_pool2d(x, 2))
    calls = []
    monkeypatch.setattr(torch.nn.functional, "max_pool2d", lambda *a, **k: calls.append(1) or torch.zeros(1))
    with torch.no_grad():
        MaxPool()(x.requires_grad_(True))
    MaxPool()(x.detach())
    assert calls == []  # no gradient: the elementwise maxima, never max_pool2d
    MaxPool()(x)
    assert calls == [1]  # a gradient flows: max_pool2d's backward, as before


def test_bfloat16_labels_of_a_trained_model_agree_with_float32(tmp_path, feature_params):
    """A seeded, trained model on its test clips, clean and with seeded noise up to where it is
    right half the time (near-ties included): bfloat16 gives float32's labels (measured: all of
    them, probabilities within 0.004)."""
    from conftest import synthetic_dataset, train_params
    from ser.models import infer
    from ser.training import load_clips, train

    features, metadata = synthetic_dataset(tmp_path, feature_params)
    model, _, record = train(train_params(), str(features), str(metadata), torch.device("cpu"))
    x, y, _ = load_clips(str(features), str(metadata), record["classes"], split="test")
    generator = torch.Generator().manual_seed(0)
    inputs = torch.cat([x + scale * torch.randn(x.shape, generator=generator) for scale in (0, 5, 10, 20, 40)])
    full = infer(model, inputs, 16, "cpu", "float32").softmax(1)
    half = infer(model, inputs, 16, "cpu", "bfloat16").softmax(1)
    assert half.dtype == torch.float32
    assert (full.argmax(1) == half.argmax(1)).float().mean() >= 0.99
    assert (full - half).abs().max() < 0.01
    assert (full.argmax(1)[: len(y)] == y).float().mean() >= 0.9  # it did learn


def test_speaker_normalisation_standardises_each_speaker_over_its_sounding_frames():
    from ser.models import speaker_normalise

    torch.manual_seed(0)
    x = torch.full((4, 3, 10), -80.0)  # the floor: padding
    x[:2, :, :6] = torch.randn(2, 3, 6) * 2 + 10  # speaker a: loud, padded after frame 6
    x[2:, :, :] = torch.randn(2, 3, 10) * 5 - 30  # speaker b: quiet, no padding
    out = speaker_normalise(x, ["a", "a", "b", "b"])
    a = out[:2, :, :6].transpose(1, 2).reshape(-1, 3)
    b = out[2:].transpose(1, 2).reshape(-1, 3)
    torch.testing.assert_close(a.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(a.std(0), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(b.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    # a speaker's gain (another microphone) is gone: only the voice relative to itself remains
    torch.testing.assert_close(speaker_normalise(x[2:] + 12.0, ["b", "b"]), out[2:], atol=1e-4, rtol=0)


def _checkpoint(tmp_path, feature_params, **changes):
    """A model file's record with `changes`, saved as torch.save writes it."""
    from ser.models import CHECKPOINT_FORMAT

    model = build_model(TINY_ARCH, feature_params.n_mels, len(EMOTIONS))
    record = {"format": CHECKPOINT_FORMAT, "members": [model.state_dict()], "arch": dict(TINY_ARCH),
              "classes": list(EMOTIONS), "feature_params": feature_params.to_dict(), "extra": {}}
    record.update(changes)
    record = {k: v for k, v in record.items() if v is not ...}
    torch.save(record, tmp_path / "m.pt")
    return tmp_path / "m.pt"


@pytest.mark.parametrize("changes, message", [
    ({"extra": ...}, "no extra record"),
    ({"members": []}, "1-32 members' weights"),
    ({"members": [{}]}, "a member has no weights"),
    ({"classes": []}, "class list is not two or more names"),
    ({"extra": {"temperature": "hot"}}, "temperature hot is not a number"),
    ({"extra": {"temperature": -1.0}}, "temperature -1.0 is not a number"),
    ({"extra": {"temperature": float("nan")}}, "temperature nan is not a number"),
    ({"arch": {**TINY_ARCH, "channels": [4] * 50}}, "is not a list of 1-8 widths"),
    ({"arch": {**TINY_ARCH, "head_hidden": 10**9}}, "head_hidden 1000000000 is not a width"),
    ({"arch": {**TINY_ARCH, "channels": [1024] * 8, "head_hidden": 8192}}, "weights \\(at most 50,000,000\\)"),
])
def test_a_malformed_model_file_is_refused_before_anything_is_built(tmp_path, feature_params, changes, message):
    path = _checkpoint(tmp_path, feature_params, **changes)
    with pytest.raises(ModelFileError, match=f"m.pt: not a usable model file \\(.*{message}"):
        load_checkpoint(path)


def test_a_model_file_that_asks_for_a_huge_model_costs_no_memory(tmp_path, feature_params, tiny_checkpoint):
    from bench.hostile import peak_rss_mb
    from conftest import write_tone

    huge = _checkpoint(tmp_path, feature_params, arch={**TINY_ARCH, "channels": [1024] * 8, "head_hidden": 8192})
    clip = write_tone(tmp_path / "a.wav")
    runs = {name: peak_rss_mb(["label", str(clip), "-o", str(tmp_path / f"{name}.csv"), "--model", str(model),
                               "--jobs", "1"]) for name, model in (("huge", huge), ("tiny", tiny_checkpoint))}
    assert runs["huge"][1] == 2 and runs["tiny"][1] == 0
    assert runs["huge"][0] - runs["tiny"][0] < 50, runs  # MB; built, it would take 2-3 GB




def test_batch_norm_calibration_gives_the_exact_mean_of_clean_clips():
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(3))
    model[0].running_mean.fill_(100.0)
    x = torch.randn(49, 3) + torch.tensor([1.0, 2.0, 3.0])
    calibrate_batch_norm(model, x, batch_size=7, device=torch.device("cpu"))
    torch.testing.assert_close(model[0].running_mean, x.mean(dim=0))
    assert not model.training and model[0].momentum == 0.1


def test_batch_norm_calibration_runs_without_dropout_and_draws_no_random_numbers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.BatchNorm1d(3))
    x = torch.randn(20, 3) + 5
    state = torch.get_rng_state()
    calibrate_batch_norm(model, x, batch_size=5, device=torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(model[1].running_mean, x.mean(dim=0))  # dropout would scale by 2 or zero
