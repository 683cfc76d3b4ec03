import math

import numpy as np
import pytest
import torch

from ser.adaptation import (MIN_CLIPS, MIN_STEPS, Adam, GroupModels, adapt_and_match, adapt_to_group,
                            adaptation_sample, adaptation_steps, adapted_probs, adapted_state, batch_norms,
                            fused_log_probs_torch, information_loss)
from ser.fusion import LinearHead, fused_log_probs
from ser.models import Ensemble, TemperatureScaled, build_model, infer
from ser.trained import TrainedModel

ARCH = {"channels": [4, 8], "batch_norm": True, "block_dropout": 0.0, "head_dropout": 0.3, "head_hidden": 16}


def group(n=48, seed=0, studio=True):
    """n clips of 16 mel bands x 24 frames, three kinds of spectral shape; `studio`: heard with
    less contrast and a tilt towards the low bands, as another room and microphone might."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(0, 1, (n, 16, 24))
    for i, k in enumerate(y):
        x[i, 5 * k : 5 * k + 5, ::2] += 3.0  # a pattern in time: the model takes out each band's mean
    if studio:
        x = 0.5 * x + np.linspace(3, 0, 16)[None, :, None] * rng.normal(1, 0.3, (n, 1, 24))
    return torch.from_numpy(x).float(), y


def model(seed=0, steps=60):
    """A tiny CNN trained for `steps` on clips of the first studio."""
    torch.manual_seed(seed)
    net = build_model(ARCH, 16, 3)
    x, y = group(256, seed=10 + seed, studio=False)
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for step in range(steps):
        batch = torch.arange(32 * step, 32 * step + 32) % len(x)
        loss = torch.nn.functional.cross_entropy(net(x[batch]), torch.from_numpy(y[batch.numpy()]))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return net.eval()


def test_the_loss_rewards_confident_clips_that_use_many_classes():
    confident_diverse = torch.log(torch.tensor([[0.98, 0.01, 0.01], [0.01, 0.98, 0.01], [0.01, 0.01, 0.98]]))
    collapsed = torch.log(torch.tensor([[0.98, 0.01, 0.01]] * 3))
    unsure = torch.log(torch.full((3, 3), 1 / 3))
    assert information_loss(confident_diverse) < information_loss(collapsed)
    assert information_loss(confident_diverse) < information_loss(unsure)
    assert information_loss(unsure) == pytest.approx(0.0, abs=1e-6)  # log 3 - log 3
    assert information_loss(collapsed) == pytest.approx(0.0, abs=1e-6)  # confident, but no spread to gain


def test_the_fused_probabilities_equal_the_fusion_modules():
    rng = np.random.default_rng(1)
    logits, z = torch.from_numpy(rng.normal(0, 2, (5, 3))).float(), rng.normal(0, 1, (5, 4))
    head = LinearHead(rng.normal(0, 1, (3, 4)), rng.normal(0, 1, 3), 1.7, 0.4, (np.zeros(4), np.ones(4)))
    linear = torch.log_softmax(torch.from_numpy(head.logits(z) / head.temperature), dim=1).float()
    np.testing.assert_allclose(fused_log_probs_torch(logits, linear, 0.4).numpy(),
                               fused_log_probs(logits, z, head).numpy(), atol=1e-5)
    np.testing.assert_allclose(fused_log_probs_torch(logits, None, 0.4).numpy(),
                               torch.log_softmax(logits, 1).numpy(), atol=1e-6)


def test_only_the_batch_norms_move_and_the_trained_model_is_left_as_it_was():
    trained = model()
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    x, _ = group()
    adapted = adapt_to_group(trained, None, 1.0, x, None)
    for k, v in trained.state_dict().items():
        assert torch.equal(v, before[k]), k
    norm_names = {n for n, m in trained.named_modules() if m in batch_norms(trained)}
    moved = {k for k, v in adapted.state_dict().items() if not torch.equal(v, before[k])}
    assert moved and all(k.rsplit(".", 1)[0] in norm_names for k in moved)
    assert {k.rsplit(".", 1)[1] for k in moved} >= {"weight", "bias", "running_mean", "running_var"}
    assert all(not p.requires_grad for p in adapted.parameters())
    convs = [m for m in adapted.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)  # oneDNN's faster layout
    assert next(trained.parameters()).is_contiguous()  # the trained model keeps its own


def test_adapting_lowers_the_information_loss_on_the_group_and_is_seeded():
    trained, (x, _) = model(), group()
    adapted = adapt_to_group(trained, None, 1.0, x, None)
    with torch.no_grad():
        assert information_loss(torch.log_softmax(adapted(x), 1)) < information_loss(torch.log_softmax(trained(x), 1)) - 0.05
    again = adapt_to_group(trained, None, 1.0, x, None)
    assert all(torch.equal(a, b) for a, b in zip(adapted.state_dict().values(), again.state_dict().values()))
    other = adapt_to_group(trained, None, 1.0, x, None, seed=1)
    assert not all(torch.equal(a, b) for a, b in zip(adapted.state_dict().values(), other.state_dict().values()))


def test_a_linear_model_is_part_of_what_the_group_is_adapted_for():
    trained, (x, _) = model(), group()
    rng = np.random.default_rng(2)
    z = rng.normal(0, 1, (len(x), 4))
    head = LinearHead(rng.normal(0, 1, (3, 4)), np.zeros(3), 1.0, 0.4, (np.zeros(4), np.ones(4)))
    alone = adapt_to_group(trained, None, 1.0, x, None)
    fused = adapt_to_group(trained, head, 1.0, x, z)
    assert not torch.equal(alone.state_dict()["conv.1.weight"], fused.state_dict()["conv.1.weight"])


def test_a_small_group_is_not_adapted_and_an_ensemble_adapts_each_member():
    trained, (x, _) = model(), group()
    small = adapt_to_group(trained, None, 1.0, x[: MIN_CLIPS - 1], None)
    assert all(torch.equal(a, b) for a, b in zip(small.state_dict().values(), trained.state_dict().values()))
    pair = Ensemble([model(0), model(1)])
    adapted = adapt_to_group(pair, None, 1.0, x, None)
    assert isinstance(adapted, Ensemble) and len(adapted.members) == 2
    assert not torch.equal(adapted.members[0].state_dict()["conv.1.bias"], pair.members[0].state_dict()["conv.1.bias"])
    with pytest.raises(TypeError, match="unscaled"):
        adapt_to_group(TemperatureScaled(trained, 2.0), None, 1.0, x, None)


def test_the_written_out_adam_steps_as_torch_optims_bit_for_bit():
    torch.manual_seed(0)
    ours = [torch.randn(5, requires_grad=True), torch.randn(3, requires_grad=True)]
    theirs = [p.detach().clone().requires_grad_(True) for p in ours]
    mine, reference = Adam(ours, 1e-3), torch.optim.Adam(theirs, lr=1e-3)
    for step in range(25):
        for params in (ours, theirs):
            loss = sum(((p - step / 10) ** 2 * torch.arange(1.0, len(p) + 1)).sum() for p in params)
            loss.backward()
        mine.step()
        reference.step()
        reference.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in ours)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_a_group_gets_three_passes_or_at_least_the_minimum_steps():
    assert adaptation_steps(10) == MIN_STEPS
    assert adaptation_steps(1400) == 3 * math.ceil(1400 / 32)


def test_the_matched_temperature_gives_the_group_back_the_trained_models_confidence():
    trained, (x, _) = model(), group()
    rng = np.random.default_rng(3)
    z = rng.normal(0, 1, (len(x), 4))
    head = LinearHead(rng.normal(0, 1, (3, 4)), np.zeros(3), 1.0, 0.4, (np.zeros(4), np.ones(4)))
    adapted, matched = adapt_and_match(trained, head, 1.5, x, z)
    cpu = torch.device("cpu")

    def confidence(net, temperature):  # ser.fusion's fused probabilities: the labeller's
        return float(fused_log_probs(infer(net, x, 16, cpu) / temperature, z, head).exp().max(1).values.mean())

    target = confidence(trained, 1.5)
    assert confidence(adapted, 1.5) > target + 0.02  # adapting made it surer
    assert confidence(adapted, matched) == pytest.approx(target, abs=1e-4)
    assert matched > 1.5
    small, unchanged = adapt_and_match(trained, head, 1.5, x[: MIN_CLIPS - 1], z[: MIN_CLIPS - 1])
    assert unchanged == 1.5


def test_bfloat16_steps_adapt_too_seeded_and_close_to_float32():
    trained, (x, _) = model(), group()
    half = adapt_to_group(trained, None, 1.0, x, None, precision="bfloat16")
    full = adapt_to_group(trained, None, 1.0, x, None)
    again = adapt_to_group(trained, None, 1.0, x, None, precision="bfloat16")
    assert all(torch.equal(a, b) for a, b in zip(half.state_dict().values(), again.state_dict().values()))
    assert not torch.equal(half.state_dict()["conv.1.weight"], full.state_dict()["conv.1.weight"])
    with torch.no_grad():
        before = information_loss(torch.log_softmax(trained(x), 1))
        assert information_loss(torch.log_softmax(half(x), 1)) < before - 0.05
        agree = (half(x).argmax(1) == full(x).argmax(1)).float().mean()
    assert agree > 0.9


def test_group_models_hear_a_group_by_its_adapted_state_at_its_matched_temperature(feature_params):
    trained, (x, _) = model(), group()
    loaded = TrainedModel(trained, ["a", "b", "c"], feature_params, {"temperature": 1.5})
    state, matched = adapted_state(loaded, x, None)
    adapted, expected_temperature = adapt_and_match(trained, None, 1.5, x, None)
    assert matched == expected_temperature
    models = GroupModels(loaded, {"anna": (state, matched)})
    cpu = torch.device("cpu")
    np.testing.assert_allclose(infer(models.model_for("anna"), x, 16, cpu).numpy(),
                               (infer(adapted, x, 16, cpu) / matched).numpy(), atol=1e-4)
    np.testing.assert_allclose(infer(models.model_for("bob"), x, 16, cpu).numpy(),  # not adapted: as trained
                               infer(TemperatureScaled(trained, 1.5), x, 16, cpu).numpy(), atol=1e-4)
    assert models.adapted("anna") and not models.adapted("bob") and not models.adapted(None)
    with pytest.raises(ValueError, match="BatchNorm state"):
        models.with_state({"not.a.key": torch.zeros(1)}, 1.0)


def test_a_large_group_adapts_on_its_seeded_sample_and_every_clip_is_scored(monkeypatch):
    import ser.adaptation

    assert adaptation_sample(10).tolist() == list(range(10))
    monkeypatch.setattr(ser.adaptation, "SAMPLE_SIZE", 16)
    sample = adaptation_sample(48)
    assert len(set(sample.tolist())) == 16 and sample.tolist() == sorted(sample.tolist())
    assert np.array_equal(sample, adaptation_sample(48))  # seeded
    trained, (x, _) = model(), group()
    keys = np.array(["anna"] * 40 + ["bob"] * 8)
    probs = adapted_probs(trained, None, 1.0, x, None, keys, 16, torch.device("cpu"))
    cpu = torch.device("cpu")
    anna = np.flatnonzero(keys == "anna")
    for rows, adapted_on in ((anna, anna[adaptation_sample(40)]), (np.arange(40, 48), np.arange(40, 48))):
        adapted, matched = adapt_and_match(trained, None, 1.0, x[adapted_on], None)  # bob: 8 clips, all of them
        expected = torch.log_softmax(infer(adapted, x[rows], 16, cpu) / matched, 1)
        np.testing.assert_allclose(probs[rows].numpy(), expected.numpy(), atol=1e-5)
