import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY_ARCH
from stages.features import ARRAY_NAME, INDEX_NAME, PARAMS_NAME
from stages.models import load_checkpoint
from stages.train import Augment, load_split, train


def _synthetic_dataset(root, feature_params, per_class=24):
    """Two emotions that differ by which mel bands are loud; actors 1-4 train, 5 val, 6 test."""
    rng = np.random.default_rng(0)
    rows, arrays = [], []
    for actor in range(1, 7):
        for emotion, band in (("angry", slice(0, 10)), ("sad", slice(20, 30))):
            for i in range(per_class // 2):
                x = rng.normal(-60, 5, (feature_params.n_mels, feature_params.n_frames))
                x[band] += 30
                arrays.append(x.astype(np.float32))
                rows.append({"path": f"a{actor}/{emotion}{i}.wav", "emotion": emotion, "actor": actor,
                             "split": "train" if actor <= 4 else ("val" if actor == 5 else "test")})
    features = root / "features"
    features.mkdir()
    np.save(features / ARRAY_NAME, np.stack(arrays))
    pd.DataFrame({"path": [r["path"] for r in rows]}).to_parquet(features / INDEX_NAME)
    (features / PARAMS_NAME).write_text(json.dumps(feature_params.to_dict()))
    pd.DataFrame(rows).to_parquet(root / "metadata.parquet")
    return features, root / "metadata.parquet"


def _params(root, features, metadata, **overrides):
    p = {"features_dir": str(features), "metadata": str(metadata), "model_out": str(root / "m" / "model.pt"),
         "history": str(root / "history.csv"), "metrics": str(root / "train.json"),
         "classes": ["angry", "sad"], "seed": 3, "device": "cpu", "epochs": 8, "patience": 10,
         "batch_size": 8, "lr": 0.01, "warmup_fraction": 0.3, "weight_decay": 0.0,
         "label_smoothing": 0.1, "mixup_alpha": 0.0,
         "augment": {"time_shift_frames": 4, "freq_mask": 4, "n_freq_masks": 1, "time_mask": 4, "n_time_masks": 1},
         "model": TINY_ARCH}
    p.update(overrides)
    return p


def test_train_learns_saves_and_is_deterministic(tmp_path, feature_params):
    features, metadata = _synthetic_dataset(tmp_path, feature_params)
    first = train(_params(tmp_path, features, metadata))
    history = pd.read_csv(tmp_path / "history.csv")
    assert list(history.columns) == ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"]
    assert len(history) == 8 and first["val_accuracy"] == pytest.approx(history["val_accuracy"].max(), abs=1e-4)
    assert first["val_accuracy"] >= 0.9  # the two classes are trivially separable
    model, meta = load_checkpoint(tmp_path / "m" / "model.pt")
    assert meta["classes"] == ["sad", "angry"]  # schema order
    assert meta["feature_params"] == feature_params
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    second = train(_params(tmp_path, features, metadata))
    assert {k: v for k, v in first.items() if k != "train_minutes"} == \
           {k: v for k, v in second.items() if k != "train_minutes"}
    again, _ = load_checkpoint(tmp_path / "m" / "model.pt")
    for k, v in again.state_dict().items():
        torch.testing.assert_close(v, weights[k], rtol=0, atol=0)


def test_test_actors_never_reach_training(tmp_path, feature_params):
    features, metadata = _synthetic_dataset(tmp_path, feature_params)
    _, _, train_rows = load_split(str(features), str(metadata), ["angry", "sad"], "train")
    _, _, val_rows = load_split(str(features), str(metadata), ["angry", "sad"], "val")
    assert set(train_rows["actor"]) == {1, 2, 3, 4} and set(val_rows["actor"]) == {5}


def test_mixup_and_crnn_paths_run(tmp_path, feature_params):
    features, metadata = _synthetic_dataset(tmp_path, feature_params)
    summary = train(_params(tmp_path, features, metadata, epochs=1, mixup_alpha=0.4,
                            model={**TINY_ARCH, "lstm_hidden": 4, "pooling": "attention"}))
    assert summary["epochs_run"] == 1


def test_augment_keeps_shape_and_masks_to_the_bin_mean():
    torch.manual_seed(0)
    mean, std = torch.full((16,), -50.0), torch.full((16,), 10.0)
    augment = Augment({"time_shift_frames": 0, "freq_mask": 8, "n_freq_masks": 1, "time_mask": 0,
                       "n_time_masks": 0}, mean, std)
    x = torch.zeros(4, 16, 20)
    out = augment(x)
    assert out.shape == x.shape
    assert set(torch.unique(out).tolist()) <= {0.0, -50.0}
