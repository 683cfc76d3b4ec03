import pytest
import torch

import ser.training as train_module
from conftest import synthetic_dataset, train_params
from ser.audio import FeatureParams
from ser.training import Augment, fit_ensemble, load_clips, train, train_classes, warp_frequency
from ser.util import UserError

CPU = torch.device("cpu")


def _data(tmp_path, feature_params):
    features, metadata = synthetic_dataset(tmp_path, feature_params)
    return str(features), str(metadata)


def test_train_learns_and_is_deterministic(tmp_path, feature_params):
    data = _data(tmp_path, feature_params)
    model, history, record = train(train_params(), *data, CPU)
    assert [r["epoch"] for r in history] == list(range(1, 9)) and set(history[0]) == {
        "member", "epoch", "train_loss", "train_accuracy", "lr"}
    x, y, _ = load_clips(*data, record["classes"], split="test")
    assert record["classes"] == ["sad", "angry"]  # schema order
    assert (model(x).argmax(1) == y).float().mean() >= 0.9  # the two classes are trivially separable
    again, history_again, _ = train(train_params(), *data, CPU)
    assert history == history_again
    for (k, v), w in zip(model.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(v, w, rtol=0, atol=0)


def test_bfloat16_training_learns_and_is_deterministic(tmp_path, feature_params):
    data = _data(tmp_path, feature_params)
    _, first, _ = train(train_params(precision="bfloat16"), *data, CPU)
    _, second, _ = train(train_params(precision="bfloat16"), *data, CPU)
    assert first == second and first[-1]["train_accuracy"] >= 0.9


def test_test_actors_never_reach_training(tmp_path, feature_params, monkeypatch):
    data = _data(tmp_path, feature_params)
    seen = []
    fit_ensemble_ = train_module.fit_ensemble
    monkeypatch.setattr(train_module, "fit_ensemble", lambda r, x, *a, **k: seen.append(len(x)) or fit_ensemble_(r, x, *a, **k))
    _, _, record = train(train_params(epochs=1), *data, CPU)
    assert record["train_actors"] == [1, 2, 3, 4, 5] and seen == [record["train_clips"]] == [120]


def test_augment_keeps_shape_and_masks_to_the_bin_mean():
    torch.manual_seed(0)
    mean, std = torch.full((16,), -50.0), torch.full((16,), 10.0)
    augment = Augment({"time_shift_frames": 0, "freq_mask": 8, "n_freq_masks": 1, "time_mask": 0,
                       "n_time_masks": 0}, mean, std)
    x = torch.zeros(4, 16, 20)
    out = augment(x)
    assert out.shape == x.shape
    assert set(torch.unique(out).tolist()) <= {0.0, -50.0}


def _bands(n_mels=32):
    return FeatureParams.from_dict({"sample_rate": 16000, "duration_s": 1.0, "trim_db": None, "n_mels": n_mels,
                                    "n_fft": 512, "hop_length": 160, "fmin": 20, "fmax": 8000,
                                    "amin": 1e-10, "top_db": 80})


def test_a_frequency_warp_moves_a_formant_up_for_a_shorter_vocal_tract_and_down_for_a_longer():
    fp = _bands()
    x = torch.full((3, 32, 5), -60.0)
    x[:, 16, :] = 0.0  # one band lit, at about 1.6 kHz
    out = warp_frequency(x, fp, torch.tensor([1.0, 1.15, 0.85]))
    assert torch.equal(out[0], x[0])  # factor 1: the same clip
    peaks = out.argmax(dim=1)[:, 0].tolist()
    assert peaks[1] > 16 > peaks[2]  # 1.6 kHz * 1.15 lies in a higher band; * 0.85 in a lower
    assert out.shape == x.shape and out.max() <= 0.0 and out.min() >= -60.0  # interpolation only


def test_vtlp_off_draws_no_random_numbers_and_on_warps_each_clip_by_its_own_factor():
    fp = _bands(16)
    mean, std = torch.zeros(16), torch.ones(16)
    off = {"time_shift_frames": 0, "freq_mask": 0, "n_freq_masks": 0, "time_mask": 0, "n_time_masks": 0}
    x = torch.randn(8, 16, 10)
    torch.manual_seed(1)
    assert torch.equal(Augment({**off, "vtlp": 0.0}, mean, std, fp)(x), x)
    Augment(off, mean, std)(x), Augment({**off, "vtlp": None}, mean, std)(x)  # absent or null: off too
    after_augmenting = torch.rand(1)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(1), after_augmenting)  # nothing drawn: the default's epochs are as before
    warped = Augment({**off, "vtlp": 0.2}, mean, std, fp)(x)
    assert not torch.equal(warped, x)
    assert not any(torch.equal(warped[i], warped[j]) for i in range(8) for j in range(i))
    for bad in (0.7, -0.1, "0.1", True, False, ""):
        with pytest.raises(UserError, match="train.augment.vtlp must be a number"):
            Augment({**off, "vtlp": bad}, mean, std, fp)


def test_a_vtlp_recipe_trains_with_the_warp_and_is_deterministic(tmp_path, feature_params):
    data = _data(tmp_path, feature_params)
    augment = {**train_params()["augment"], "vtlp": 0.1}
    _, plain, _ = train(train_params(epochs=2), *data, CPU)
    _, warped, _ = train(train_params(epochs=2, augment=augment), *data, CPU)
    _, again, _ = train(train_params(epochs=2, augment=augment), *data, CPU)
    assert warped == again and warped != plain


def test_batch_norm_is_calibrated_once_at_the_end(tmp_path, feature_params, monkeypatch):
    data = _data(tmp_path, feature_params)
    calls = []
    calibrate = train_module.calibrate_batch_norm
    monkeypatch.setattr(train_module, "calibrate_batch_norm", lambda *args: calls.append(1) or calibrate(*args))
    train(train_params(epochs=3), *data, CPU)
    assert len(calls) == 1


def test_a_seed_ensemble_averages_the_single_seed_models(tmp_path, feature_params):
    data = _data(tmp_path, feature_params)
    x, y, _ = load_clips(*data, ["sad", "angry"], split="test")
    singles = [train(train_params(epochs=2, seed=seed), *data, CPU)[0](x).softmax(dim=1) for seed in (3, 4)]
    ensemble, history, _ = train(train_params(epochs=2, ensemble_seeds=2), *data, CPU)
    assert len(ensemble.members) == 2 and sorted({r["member"] for r in history}) == [1, 2]
    torch.testing.assert_close(ensemble(x).softmax(dim=1), (singles[0] + singles[1]) / 2, rtol=0, atol=1e-5)


def test_ensemble_seeds_must_be_a_whole_number_of_at_least_one(feature_params):
    for bad in (0, 1.5, True):
        with pytest.raises(UserError, match="train.ensemble_seeds must be a whole number >= 1"):
            fit_ensemble(train_params(ensemble_seeds=bad), torch.zeros(2, 32, 5), torch.zeros(2), feature_params, 2, CPU)


def test_class_sets():
    assert train_classes("six") == ["neutral", "happy", "sad", "angry", "fearful", "disgust"]
    with pytest.raises(UserError, match="train.classes"):
        train_classes("seven")


def test_corpus_balance_draws_every_corpus_alike():
    import pandas as pd

    from ser.training import sampling_weights

    clips = pd.DataFrame({"corpus": ["big"] * 90 + ["small"] * 10})
    weights = sampling_weights(clips, {"balance": "corpus"})
    assert torch.equal(weights, torch.tensor([1 / 90] * 90 + [1 / 10] * 10, dtype=torch.double))
    drawn = torch.multinomial(weights, 10_000, replacement=True, generator=torch.Generator().manual_seed(0))
    assert abs((drawn >= 90).float().mean().item() - 0.5) < 0.03
    assert sampling_weights(clips, {"balance": "none"}) is None and sampling_weights(clips, {}) is None
    assert sampling_weights(clips.iloc[:90], {"balance": "corpus"}) is None
    with pytest.raises(UserError, match="train.balance must be none or corpus"):
        sampling_weights(clips, {"balance": "class"})


def test_a_corpus_weight_draws_that_corpus_more_and_ignores_corpora_not_trained_on():
    import pandas as pd

    from ser.training import sampling_weights

    clips = pd.DataFrame({"corpus": ["big"] * 90 + ["small"] * 10})
    weights = sampling_weights(clips, {"balance": "corpus", "corpus_weights": {"big": 3, "left_out": 2}})
    assert float(weights[:90].sum()) == pytest.approx(3 * float(weights[90:].sum()))
    drawn = torch.multinomial(weights, 10_000, replacement=True, generator=torch.Generator().manual_seed(0))
    assert abs((drawn < 90).float().mean().item() - 0.75) < 0.03
    with pytest.raises(UserError, match="corpus_weights must be positive"):
        sampling_weights(clips, {"balance": "corpus", "corpus_weights": {"big": 0}})


def test_a_speaker_normalised_recipe_trains_and_its_model_skips_the_clip_mean(tmp_path, feature_params):
    data = _data(tmp_path, feature_params)
    model, _, record = train(train_params(normalisation="speaker", balance="corpus"), *data, CPU)
    assert record["normalisation"] == "speaker" and model.utterance_norm is False
    x, y, _ = load_clips(*data, record["classes"], split="test", normalisation="speaker")
    assert (model(x).argmax(1) == y).float().mean() >= 0.9
    with pytest.raises(UserError, match="train.normalisation must be one of clip, speaker"):
        load_clips(*data, record["classes"], split="test", normalisation="corpus")


def test_the_temperature_is_fitted_on_the_calibration_speakers_only(tmp_path, feature_params, monkeypatch):
    import pandas as pd

    features, metadata = _data(tmp_path, feature_params)
    clips = pd.read_parquet(metadata)
    clips.loc[clips["actor"] == 5, "split"] = "calibration"
    clips.to_parquet(metadata)
    seen = []
    fit_temperature = train_module.fit_temperature
    monkeypatch.setattr(train_module, "fit_temperature", lambda logits, y: seen.append(len(y)) or fit_temperature(logits, y))
    model, _, record = train(train_params(), features, metadata, CPU)
    assert record["train_actors"] == [1, 2, 3, 4] and seen == [record["calibration"]["clips"]] == [24]
    assert record["calibration_speakers"] == ["syn:5"] and record["temperature"] > 0
    assert record["calibration"]["nll_after"] <= record["calibration"]["nll_before"]
    (tmp_path / "plain").mkdir()
    _, _, plain = train(train_params(epochs=1), *_data(tmp_path / "plain", feature_params), CPU)
    assert "temperature" not in plain  # no calibration split: probabilities as trained


def test_a_fusion_recipe_trains_a_linear_model_on_the_functionals_and_the_file_keeps_it(tmp_path, feature_params):
    import numpy as np
    import pandas as pd

    from ser.features import load_functionals
    from ser.fusion import LinearHead

    features, metadata = _data(tmp_path, feature_params)
    clips = pd.read_parquet(metadata)
    clips.loc[clips["actor"] == 5, "split"] = "calibration"
    clips.to_parquet(metadata)
    _, _, record = train(train_params(epochs=1, fusion={"weight": 0.4, "c": 1.0}), features, metadata, CPU)
    head = LinearHead.from_record(record["fusion"])
    assert head.fusion_weight == 0.4 and head.temperature != 1.0  # calibrated on actor 5
    angry, sad = record["classes"].index("angry"), record["classes"].index("sad")
    assert head.weight[angry, 0] > 0 > head.weight[sad, 0]  # the first functionals are higher for angry (conftest)
    train_f = load_functionals(features, clips.loc[clips["split"] == "train", "path"])
    np.testing.assert_allclose(head.population[0][0], train_f[:, 0].mean(), atol=0.3)  # speakers alike here
    assert {"fused_ece", "fused_nll"} <= set(record["calibration"])
    _, _, off = train(train_params(epochs=1, fusion={"weight": 0, "c": 1.0}), features, metadata, CPU)
    assert "fusion" not in off
    with pytest.raises(UserError, match="train.fusion"):
        train(train_params(epochs=1, fusion={"weight": 0.4}), features, metadata, CPU)


def test_int8_is_the_labellers_not_a_training_precision(feature_params):
    x, y = torch.zeros(4, feature_params.n_mels, feature_params.n_frames), torch.zeros(4, dtype=torch.long)
    with pytest.raises(UserError, match="train.precision int8"):
        fit_ensemble(train_params(precision="int8"), x, y, feature_params, 2, CPU)



FAST = {"encoder": False, "fusion": {"weight": 0.4, "c": 1.0}}


def test_a_fast_recipe_trains_a_model_that_hears_no_encoder(tmp_path, feature_params):
    from ser.features import load
    from ser.fusion import LinearHead
    from ser.prosody import n_functionals
    from ser.training import model_feature_params

    features, metadata = synthetic_dataset(tmp_path, feature_params, encoder="whisper-base")
    fp = load(features)[2]
    assert fp.encoder == "whisper-base" and model_feature_params(FAST, fp) == feature_params  # no encoder
    model, history, record = train(train_params(**FAST), str(features), str(metadata), CPU)
    assert LinearHead.from_record(record["fusion"]).weight.shape == (2, n_functionals(feature_params.n_mels))
    # the CNN is the same as with the encoder (it hears the log-Mel only); the linear model differs
    default, history_default, record_default = train(train_params(fusion=FAST["fusion"]), str(features),
                                                      str(metadata), CPU)
    assert history == history_default
    assert LinearHead.from_record(record_default["fusion"]).weight.shape == (2, n_functionals(feature_params.n_mels) + 1024)
