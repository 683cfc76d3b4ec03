import pandas as pd
import pytest
import torch

import stages.train as train_module
from conftest import TINY_ARCH, synthetic_dataset, train_params
from stages.models import load_checkpoint
from stages.train import (Augment, calibrate_batch_norm, fit, load_clips, load_split, member_splits,
                          speed_perturb, train, train_classes)
from stages.util import UserError


def test_train_learns_saves_and_is_deterministic(tmp_path, feature_params):
    features, metadata = synthetic_dataset(tmp_path, feature_params)
    first = train(train_params(tmp_path, features, metadata))
    history = pd.read_csv(tmp_path / "history.csv")
    assert list(history.columns) == ["member", "epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"]
    assert len(history) == 8 and first["val_accuracy"] == pytest.approx(history["val_accuracy"].max(), abs=1e-4)
    assert first["val_accuracy"] >= 0.9  # the two classes are trivially separable
    model, meta = load_checkpoint(tmp_path / "m" / "model.pt")
    assert meta["classes"] == ["sad", "angry"]  # schema order
    assert meta["feature_params"] == feature_params
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    second = train(train_params(tmp_path, features, metadata))
    assert {k: v for k, v in first.items() if k != "train_minutes"} == \
           {k: v for k, v in second.items() if k != "train_minutes"}
    again, _ = load_checkpoint(tmp_path / "m" / "model.pt")
    for k, v in again.state_dict().items():
        torch.testing.assert_close(v, weights[k], rtol=0, atol=0)


def test_bfloat16_training_learns_and_is_deterministic(tmp_path, feature_params):
    features, metadata = synthetic_dataset(tmp_path, feature_params)
    first = train(train_params(tmp_path, features, metadata, precision="bfloat16"))
    assert first["val_accuracy"] >= 0.9
    second = train(train_params(tmp_path, features, metadata, precision="bfloat16"))
    assert first["per_member"] == second["per_member"] and first["val_loss"] == second["val_loss"]


def test_test_actors_never_reach_training(tmp_path, feature_params):
    features, metadata = synthetic_dataset(tmp_path, feature_params)
    _, _, train_rows = load_split(str(features), str(metadata), ["angry", "sad"], "train")
    _, _, val_rows = load_split(str(features), str(metadata), ["angry", "sad"], "val")
    assert set(train_rows["actor"]) == {1, 2, 3, 4} and set(val_rows["actor"]) == {5}


def test_mixup_and_crnn_paths_run(tmp_path, feature_params):
    features, metadata = synthetic_dataset(tmp_path, feature_params)
    summary = train(train_params(tmp_path, features, metadata, epochs=1, mixup_alpha=0.4,
                            archs={"tiny": {**TINY_ARCH, "lstm_hidden": 4, "pooling": "attention"}}))
    assert summary["per_member"][0]["epochs_run"] == 1


def test_augment_keeps_shape_and_masks_to_the_bin_mean():
    torch.manual_seed(0)
    mean, std = torch.full((16,), -50.0), torch.full((16,), 10.0)
    augment = Augment({"time_shift_frames": 0, "freq_mask": 8, "n_freq_masks": 1, "time_mask": 0,
                       "n_time_masks": 0}, mean, std)
    x = torch.zeros(4, 16, 20)
    out = augment(x)
    assert out.shape == x.shape
    assert set(torch.unique(out).tolist()) <= {0.0, -50.0}


def test_speed_perturbation_at_factor_one_is_the_identity_and_keeps_shape():
    z = torch.randn(3, 16, 40)
    assert torch.allclose(speed_perturb(z, 0.0), z, atol=1e-5)
    torch.manual_seed(0)
    out = speed_perturb(z, 0.2)
    assert out.shape == z.shape and not torch.allclose(out, z)


def test_speed_perturbation_moves_a_tone_up_when_faster():
    z = torch.zeros(1, 32, 40)
    z[0, 10] = 1.0  # one mel bin lit
    torch.manual_seed(1)
    factor = 1 + (torch.rand(1) * 2 - 1) * 0.2  # the factor speed_perturb will draw
    torch.manual_seed(1)
    peak = int(speed_perturb(z, 0.2)[0].mean(dim=1).argmax())
    assert peak == pytest.approx(10.5 * float(factor) - 0.5, abs=1)


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


def test_refit_calibrates_batch_norm_once_and_best_val_at_every_val_check(tmp_path, feature_params, monkeypatch):
    features, metadata = synthetic_dataset(tmp_path, feature_params)
    calls = []
    calibrate = train_module.calibrate_batch_norm

    def count(*args):
        calls.append(1)
        calibrate(*args)

    monkeypatch.setattr(train_module, "calibrate_batch_norm", count)
    train(train_params(tmp_path, features, metadata, epochs=3, selection="refit"))
    assert len(calls) == 1
    calls.clear()
    summary = train(train_params(tmp_path, features, metadata, epochs=3, selection="best_val"))
    assert len(calls) == summary["epochs_run"] == 3


def test_an_unknown_arch_name_is_a_clear_error(tmp_path, feature_params):
    features, metadata = synthetic_dataset(tmp_path, feature_params)
    with pytest.raises(UserError, match="train.arch 'resnet' is not one of train.archs: \\['tiny'\\]"):
        train(train_params(tmp_path, features, metadata, arch="resnet"))


def test_ensemble_members_validate_on_disjoint_actor_groups_and_never_see_test_actors():
    clips = pd.DataFrame({"actor": list(range(1, 11)),
                          "split": ["train"] * 6 + ["val"] * 2 + ["test"] * 2})
    assert member_splits(clips, 1) == [([1, 2, 3, 4, 5, 6], [7, 8])]
    splits = member_splits(clips, 4)
    assert [val for _, val in splits] == [[1, 2], [3, 4], [5, 6], [7, 8]]
    for train_actors, val_actors in splits:
        assert not set(train_actors) & set(val_actors)
        assert set(train_actors) | set(val_actors) == set(range(1, 9))
    with pytest.raises(UserError, match="ensemble_folds=9 needs at least 9 train\\+val actors; there are 8"):
        member_splits(clips, 9)


def test_refit_trains_on_train_and_val_actors_for_every_epoch(tmp_path, feature_params):
    features, metadata = synthetic_dataset(tmp_path, feature_params)
    summary = train(train_params(tmp_path, features, metadata, epochs=4, patience=1, selection="refit"))
    member = summary["per_member"][0]
    assert member["val_actors"] == [] and member["train_clips"] == 5 * 24  # actors 1-5; 6 is test
    assert member["epochs_run"] == member["best_epoch"] == 4  # no early stop, the last epoch is kept
    assert summary["val_accuracy"] is None and summary["val_loss"] is None
    assert pd.read_csv(tmp_path / "history.csv")["val_accuracy"].isna().all()
    # and the model is usable: it separates the two synthetic classes on the test actor
    model, meta = load_checkpoint(tmp_path / "m" / "model.pt")
    x, y, _ = load_split(str(features), str(metadata), meta["classes"], "test")
    assert (model(x).argmax(1) == y).float().mean() >= 0.9


def test_refit_and_selection_mistakes_are_clear_errors(tmp_path, feature_params):
    clips = pd.DataFrame({"actor": list(range(1, 11)), "split": ["train"] * 6 + ["val"] * 2 + ["test"] * 2})
    assert member_splits(clips, 1, refit=True) == [([1, 2, 3, 4, 5, 6, 7, 8], [])]
    with pytest.raises(UserError, match="needs train.selection best_val"):
        member_splits(clips, 4, refit=True)
    features, metadata = synthetic_dataset(tmp_path, feature_params)
    with pytest.raises(UserError, match="train.selection 'best' is not one of best_val, refit"):
        train(train_params(tmp_path, features, metadata, selection="best"))


def test_an_ensemble_of_folds_trains_one_model_per_fold(tmp_path, feature_params):
    features, metadata = synthetic_dataset(tmp_path, feature_params)
    summary = train(train_params(tmp_path, features, metadata, epochs=2, ensemble_folds=5))
    assert summary["members"] == 5 and [m["val_actors"] for m in summary["per_member"]] == [[1], [2], [3], [4], [5]]
    model, _ = load_checkpoint(tmp_path / "m" / "model.pt")
    assert len(model.members) == 5
    assert sorted(pd.read_csv(tmp_path / "history.csv")["member"].unique()) == [1, 2, 3, 4, 5]


def test_a_seed_ensemble_averages_the_single_seed_models(tmp_path, feature_params):
    features, metadata = synthetic_dataset(tmp_path, feature_params)
    x, _, _ = load_split(str(features), str(metadata), ["sad", "angry"], "test")
    singles = []
    for seed in (3, 4):
        train(train_params(tmp_path, features, metadata, epochs=2, selection="refit", seed=seed))
        singles.append(load_checkpoint(tmp_path / "m" / "model.pt")[0](x).softmax(dim=1))
    summary = train(train_params(tmp_path, features, metadata, epochs=2, selection="refit", ensemble_seeds=2))
    assert summary["members"] == 2 and [m["seed"] for m in summary["per_member"]] == [3, 4]
    assert sorted(pd.read_csv(tmp_path / "history.csv")["member"].unique()) == [1, 2]
    ensemble, _ = load_checkpoint(tmp_path / "m" / "model.pt")
    assert len(ensemble.members) == 2
    torch.testing.assert_close(ensemble(x).softmax(dim=1), (singles[0] + singles[1]) / 2, rtol=0, atol=1e-5)


def test_ensemble_seeds_must_be_a_whole_number_of_at_least_one(tmp_path, feature_params):
    features, metadata = synthetic_dataset(tmp_path, feature_params)
    for bad in (0, 1.5, True):
        with pytest.raises(UserError, match="train.ensemble_seeds must be a whole number >= 1"):
            train(train_params(tmp_path, features, metadata, epochs=1, ensemble_seeds=bad))


def test_averaging_keeps_the_mean_of_the_last_epochs_weights(tmp_path, feature_params, monkeypatch):
    features, metadata = synthetic_dataset(tmp_path, feature_params)
    seen = []  # the weights after each epoch, as BatchNorm calibration receives them
    calibrate = train_module.calibrate_batch_norm

    def record(model, *args):
        seen.append({k: v.detach().clone() for k, v in model.named_parameters()})
        calibrate(model, *args)

    monkeypatch.setattr(train_module, "calibrate_batch_norm", record)
    # refit calibrates only the kept epoch; with val clips it calibrates (and logs) every epoch
    p = train_params(tmp_path, features, metadata, epochs=3, selection="refit")
    classes = train_classes(p)
    (x_train, y_train, _), (x_val, y_val, _) = (load_split(str(features), str(metadata), classes, split)
                                                for split in ("train", "val"))
    data = (x_train, y_train, x_val, y_val, feature_params.n_mels, len(classes), torch.device("cpu"))
    fit(p, *data)
    plain, seen[:] = list(seen), []
    fit({**p, "average_epochs": 2}, *data)
    torch.testing.assert_close(seen[1], plain[1], rtol=0, atol=0)  # the same run up to the end
    for name, value in seen[2].items():
        torch.testing.assert_close(value, (plain[1][name] + plain[2][name]) / 2, rtol=0, atol=1e-6)
    assert any(not torch.equal(seen[2][k], plain[2][k]) for k in seen[2])  # not the last epoch's


def test_average_epochs_mistakes_are_clear_errors(tmp_path, feature_params):
    features, metadata = synthetic_dataset(tmp_path, feature_params)
    with pytest.raises(UserError, match="needs train.selection refit"):
        train(train_params(tmp_path, features, metadata, epochs=2, average_epochs=1))
    for bad in (-1, 3, 1.5):
        with pytest.raises(UserError, match="train.average_epochs must be a whole number from 0 to train.epochs"):
            train(train_params(tmp_path, features, metadata, epochs=2, selection="refit", average_epochs=bad))


class SwappedLabels(torch.nn.Module):
    """A teacher that is confidently wrong: a trained model's two class scores swapped."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).flip(1) * 5


def test_a_student_learns_from_its_teachers_probabilities_not_only_the_labels(tmp_path, feature_params):
    features, metadata = synthetic_dataset(tmp_path, feature_params)
    classes = ["angry", "sad"]
    x_train, y_train, _ = load_clips(str(features), str(metadata), classes, actors=[1, 2, 3, 4, 5])
    x_test, y_test, _ = load_split(str(features), str(metadata), classes, "test")
    empty = x_train[:0], y_train[:0]
    p = train_params(tmp_path, features, metadata, selection="refit", label_smoothing=0.0)
    good, _, _ = fit(p, x_train, y_train, *empty, feature_params.n_mels, 2, torch.device("cpu"))
    assert (good(x_test).argmax(1) == y_test).float().mean() >= 0.9
    # taught only by a teacher that swaps the classes, the student swaps them too
    student, _, _ = fit({**p, "distill_weight": 1.0}, x_train, y_train, *empty, feature_params.n_mels, 2,
                        torch.device("cpu"), teacher=SwappedLabels(good))
    assert (student(x_test).argmax(1) != y_test).float().mean() >= 0.9


def test_distillation_keeps_one_model_and_at_weight_zero_the_teachers_change_nothing(tmp_path, feature_params):
    features, metadata = synthetic_dataset(tmp_path, feature_params)
    plain = train(train_params(tmp_path, features, metadata, epochs=3, selection="refit"))
    plain_weights = torch.load(tmp_path / "m" / "model.pt", weights_only=True)["members"]
    summary = train(train_params(tmp_path, features, metadata, epochs=3, selection="refit",
                                 distill_seeds=2, distill_weight=0.0))
    assert summary["members"] == 1 and summary["per_member"][0]["seed"] == 3
    assert summary["train_minutes"] >= plain["train_minutes"]  # the teachers' training counts
    # the same seed's model, untouched (the file also records the recipe, which differs)
    weights = torch.load(tmp_path / "m" / "model.pt", weights_only=True)["members"]
    assert len(weights) == 1 and weights[0].keys() == plain_weights[0].keys()
    assert all(torch.equal(weights[0][k], plain_weights[0][k]) for k in weights[0])
    model, _ = load_checkpoint(tmp_path / "m" / "model.pt")
    assert not isinstance(model, torch.nn.ModuleList) and not hasattr(model, "members")


def test_distillation_mistakes_are_clear_errors(tmp_path, feature_params):
    features, metadata = synthetic_dataset(tmp_path, feature_params)
    for change, message in (({"distill_seeds": -1}, "train.distill_seeds must be a whole number >= 0"),
                            ({"distill_seeds": 1.5}, "train.distill_seeds must be a whole number >= 0"),
                            ({"distill_seeds": 2, "ensemble_seeds": 2}, "it needs train.ensemble_seeds 1"),
                            ({"distill_seeds": 1, "distill_weight": 1.5}, "train.distill_weight must be a number from 0 to 1")):
        with pytest.raises(UserError, match=message):
            train(train_params(tmp_path, features, metadata, epochs=1, **change))
