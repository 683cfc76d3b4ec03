import numpy as np
import pytest
import torch

from ser.calibration import expected_calibration_error, fit_temperature, reliability
from ser.models import TemperatureScaled


def test_fit_temperature_recovers_how_overconfident_the_logits_are():
    torch.manual_seed(0)
    logits = torch.randn(4000, 6) * 4
    y = torch.multinomial((logits / 2.5).softmax(dim=1), 1).squeeze(1)  # truly calibrated at T = 2.5
    assert fit_temperature(logits, y) == pytest.approx(2.5, rel=0.08)
    y_sharp = torch.multinomial((logits / 0.5).softmax(dim=1), 1).squeeze(1)  # underconfident: T < 1
    assert fit_temperature(logits, y_sharp) == pytest.approx(0.5, rel=0.1)


def test_fit_temperature_stays_in_bounds_and_is_deterministic():
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    assert fit_temperature(logits, torch.tensor([0, 1])) == 0.05  # always right: as sharp as allowed
    assert fit_temperature(logits, torch.tensor([1, 0])) == 20.0  # always wrong: as flat as allowed
    z, y = torch.randn(50, 3, generator=torch.Generator().manual_seed(1)), torch.arange(50) % 3
    assert fit_temperature(z, y) == fit_temperature(z, y)


def test_expected_calibration_error_by_hand():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    y = np.array([0, 1, 0, 0])
    # bins: 0.9 (2 clips, accuracy 0.5): |0.5 - 0.9| ; 0.6 (2 clips, 1 right of 2): |0.5 - 0.6|
    assert expected_calibration_error(probs, y) == pytest.approx((2 * 0.4 + 2 * 0.1) / 4)
    rng = np.random.default_rng(0)
    confident = rng.uniform(0.5, 1.0, 20000)
    honest = np.stack([confident, 1 - confident], axis=1)
    right = rng.uniform(size=20000) < confident
    assert expected_calibration_error(honest, np.where(right, 0, 1)) < 0.02


def test_reliability_bins_report_confidence_accuracy_and_count():
    probs = np.array([[0.95, 0.05], [0.92, 0.08], [0.55, 0.45]])
    rows = reliability(probs, np.array([0, 1, 0]), bins=10)
    assert [(r["bin"], r["clips"]) for r in rows] == [(0.55, 1), (0.95, 2)]
    assert rows[1]["accuracy"] == 0.5 and rows[1]["confidence"] == pytest.approx(0.935)


def test_temperature_scaling_keeps_the_labels_and_softens_the_probabilities():
    model = torch.nn.Linear(4, 3)
    x = torch.randn(10, 4)
    scaled = TemperatureScaled(model, 2.0)
    torch.testing.assert_close(scaled(x), model(x) / 2.0)
    assert torch.equal(scaled(x).argmax(1), model(x).argmax(1))


def test_a_model_file_with_a_temperature_loads_calibrated(tmp_path, feature_params):
    from conftest import TINY_ARCH
    from ser.corpora import EMOTIONS
    from ser.models import build_model, load_checkpoint, save_checkpoint

    model = build_model(TINY_ARCH, feature_params.n_mels, len(EMOTIONS)).eval()
    save_checkpoint(tmp_path / "m.pt", model, TINY_ARCH, EMOTIONS, feature_params, extra={})
    save_checkpoint(tmp_path / "t.pt", model, TINY_ARCH, EMOTIONS, feature_params, extra={"temperature": 3.0})
    plain, _ = load_checkpoint(tmp_path / "m.pt")
    calibrated, meta = load_checkpoint(tmp_path / "t.pt")
    x = torch.randn(3, feature_params.n_mels, feature_params.n_frames)
    assert isinstance(calibrated, TemperatureScaled) and meta["extra"]["temperature"] == 3.0
    torch.testing.assert_close(calibrated(x), plain(x) / 3.0, atol=1e-5, rtol=0)


def test_the_labellers_import_of_this_module_loads_no_torch():
    import subprocess
    import sys

    code = "import sys, ser.labeller.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_softening_divides_the_fused_log_probabilities_and_keeps_every_label():
    from ser.calibration import soften

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(5, 0.3), size=200).astype(np.float32)
    softer = soften(probs, 2.0)
    assert softer.dtype == np.float32 and np.allclose(softer.sum(axis=1), 1, atol=1e-5)
    assert (softer.argmax(axis=1) == probs.argmax(axis=1)).all()
    assert (softer.max(axis=1) <= probs.max(axis=1) + 1e-6).all() and softer.max(axis=1).mean() < probs.max(axis=1).mean()
    assert soften(probs, 1.0) is probs
    # the same as dividing both the CNN's and the linear model's logits by it, then fusing
    a, b, w = rng.normal(0, 3, (50, 5)), rng.normal(0, 3, (50, 5)), 0.3
    fused = lambda t: torch.softmax((1 - w) * torch.log_softmax(torch.tensor(a) / t, 1)
                                    + w * torch.log_softmax(torch.tensor(b) / t, 1), 1).numpy()
    np.testing.assert_allclose(soften(fused(1.0), 1.7), fused(1.7), atol=1e-6)


def test_the_softening_fitted_undoes_a_known_overconfidence_and_flags_the_wrong_labels():
    from ser.calibration import fit_softening, soften, wrong_flagged

    rng = np.random.default_rng(1)
    logits = rng.normal(0, 1.5, (4000, 4))
    y = np.array([rng.choice(4, p=np.exp(r) / np.exp(r).sum()) for r in logits])  # calibrated at temperature 1
    overconfident = torch.softmax(torch.tensor(logits * 2.5), 1).numpy()  # as sure as a model on another corpus
    t = fit_softening(overconfident, y)
    assert 2.2 < t < 2.8
    honest = soften(overconfident, t)
    assert expected_calibration_error(honest, y) < 0.03 < expected_calibration_error(overconfident, y)
    assert wrong_flagged(honest, y) > wrong_flagged(overconfident, y)
    assert wrong_flagged(np.eye(3), np.arange(3)) is None
