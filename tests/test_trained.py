"""A model file becomes one object that carries everything deciding its probabilities."""
import numpy as np
import pytest
import torch

from conftest import TINY_ARCH, fused_model
from ser.fusion import fused_log_probs
from ser.models import ModelFileError, TemperatureScaled, build_model, infer, load_checkpoint, save_checkpoint
from ser.trained import TrainedModel, scored_probs

CPU = torch.device("cpu")


def _calibrated(tmp_path, feature_params, temperature=1.7):
    torch.manual_seed(1)
    classes = ["angry", "calm", "sad"]
    path = tmp_path / "t.pt"
    save_checkpoint(path, build_model(TINY_ARCH, feature_params.n_mels, 3), TINY_ARCH, classes, feature_params,
                    extra={"temperature": temperature, "normalisation": "speaker", "recipe": {"seed": 1}})
    return path


def test_it_carries_the_files_record_and_gives_what_the_file_gives(tmp_path, feature_params):
    path = _calibrated(tmp_path, feature_params)
    trained = TrainedModel.load(path)
    assert trained.classes == ["angry", "calm", "sad"] and trained.feature_params == feature_params
    assert trained.temperature == 1.7 and trained.head is None and trained.by_speaker
    assert trained.extra["recipe"] == {"seed": 1} and trained.arch["channels"] == TINY_ARCH["channels"]
    assert trained.population is None and not trained.uses_functionals
    x = torch.randn(5, feature_params.n_mels, feature_params.n_frames)
    fused, _ = load_checkpoint(path)  # the fused, temperature-scaled model the file always gave
    unfused, _ = load_checkpoint(path, fuse=False)
    assert torch.equal(infer(trained.inference, x, 2, CPU), infer(fused, x, 2, CPU))
    assert torch.equal(infer(trained.scaled(), x, 2, CPU), infer(unfused, x, 2, CPU))
    assert not isinstance(trained.network, TemperatureScaled)  # adaptation tunes the network itself
    assert trained.inference is trained.inference  # fused once
    probs = trained.probabilities(x, None, 2)
    np.testing.assert_allclose(probs, infer(fused, x, 2, CPU).softmax(1).numpy(), atol=1e-6)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)


def test_its_linear_model_and_average_speaker_take_part(tmp_path, feature_params):
    path, head = fused_model(tmp_path, feature_params, pitch_st=0.0)
    trained = TrainedModel.load(path)
    assert trained.uses_functionals and trained.extractor().functionals
    np.testing.assert_array_equal(trained.head.weight, head.weight)
    mean, std = trained.population.bands
    assert mean.dtype == np.float32 and mean.tolist() == [-40.0] * feature_params.n_mels and (std == 8).all()
    x = torch.randn(4, feature_params.n_mels, feature_params.n_frames)
    z = np.random.default_rng(0).normal(size=(4, head.weight.shape[1]))
    expected = fused_log_probs(infer(trained.inference, x, 4, CPU), z, head).exp().numpy()
    np.testing.assert_array_equal(trained.probabilities(x, z, 4), expected)
    np.testing.assert_array_equal(scored_probs(trained.inference, head, x, z, 4, CPU).exp().numpy(), expected)


def test_another_network_can_be_heard_in_its_place(tmp_path, feature_params):
    """The labeller scores a group by the group's adapted copy of the network."""
    trained = TrainedModel.load(_calibrated(tmp_path, feature_params, temperature=1.0))
    other = TemperatureScaled(build_model(TINY_ARCH, feature_params.n_mels, 3).eval(), 2.0)
    x = torch.randn(3, feature_params.n_mels, feature_params.n_frames)
    np.testing.assert_allclose(trained.probabilities(x, None, 8, network=other),
                               infer(other, x, 8, CPU).softmax(1).numpy(), atol=1e-6)


def test_an_uncalibrated_file_has_no_temperature_and_a_bad_file_says_why(tmp_path, tiny_checkpoint):
    trained = TrainedModel.load(tiny_checkpoint)
    assert trained.temperature is None and trained.scaled() is trained.network and trained.normalisation == "clip"
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ModelFileError, match="junk.pt"):
        TrainedModel.load(tmp_path / "junk.pt")
