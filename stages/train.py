"""Stage 4: train the emotion CNN on the train actors, pick the checkpoint on the val actors.

One readable loop (after nanoGPT): no trainer framework. Test actors are never loaded here.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import torchaudio.transforms as T

from stages import features as feature_store
from stages.labels import resolve_classes
from stages.models import build_model, count_parameters, infer, save_checkpoint
from stages.util import UserError, atomic_path, load_params, pick_device, run_main, seed_everything, write_json


def load_split(features_dir: str, metadata_path: str, classes: list[str], split: str
               ) -> tuple[torch.Tensor, torch.Tensor, pd.DataFrame]:
    """Features and class indices of one split, restricted to `classes`."""
    array, index, _ = feature_store.load(features_dir)
    clips = pd.read_parquet(metadata_path)
    if index["path"].tolist() != clips["path"].tolist():
        raise UserError(f"{features_dir} does not match {metadata_path}; rerun the features stage")
    keep = (clips["split"] == split) & clips["emotion"].isin(classes)
    rows = np.flatnonzero(keep.to_numpy())
    x = torch.from_numpy(np.ascontiguousarray(array[rows]))
    y = torch.tensor([classes.index(e) for e in clips["emotion"].iloc[rows]], dtype=torch.long)
    return x, y, clips.iloc[rows].reset_index(drop=True)


class Augment:
    """Training-time augmentation on a batch of dB spectrograms (batch, mels, frames):
    random circular time shift and SpecAugment masks (filled with the per-bin mean)."""

    def __init__(self, p: dict[str, Any], mean: torch.Tensor, std: torch.Tensor) -> None:
        self.shift = p["time_shift_frames"]
        self.masks = torch.nn.Sequential(*(
            [T.FrequencyMasking(p["freq_mask"], iid_masks=True) for _ in range(p["n_freq_masks"])]
            + [T.TimeMasking(p["time_mask"], iid_masks=True) for _ in range(p["n_time_masks"])]
        ))
        self.mean, self.std = mean[:, None], std[:, None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.shift > 0:
            shifts = torch.randint(-self.shift, self.shift + 1, (x.shape[0],))
            x = torch.stack([torch.roll(row, int(s), dims=-1) for row, s in zip(x, shifts)])
        if len(self.masks):
            z = (x - self.mean) / self.std  # mask in normalised space: 0 = the bin's mean
            z = self.masks(z.unsqueeze(1)).squeeze(1)
            x = z * self.std + self.mean
        return x


def train(p: dict[str, Any]) -> dict[str, Any]:
    seed_everything(p["seed"])
    device = pick_device(p["device"])
    use_amp = device.type == "cuda"
    classes = resolve_classes(p["classes"])
    x_train, y_train, _ = load_split(p["features_dir"], p["metadata"], classes, "train")
    x_val, y_val, _ = load_split(p["features_dir"], p["metadata"], classes, "val")
    if len(x_train) == 0 or len(x_val) == 0:
        raise UserError("train: the train and val splits both need clips; check metadata.*_actors")
    _, _, fp = feature_store.load(p["features_dir"])

    mean = x_train.mean(dim=(0, 2))
    std = x_train.std(dim=(0, 2))
    model = build_model(p["model"], fp.n_mels, len(classes))
    model.set_normalization(mean, std)
    model.to(device)
    augment = Augment(p["augment"], mean, std)

    steps_per_epoch = int(np.ceil(len(x_train) / p["batch_size"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=p["lr"], total_steps=p["epochs"] * steps_per_epoch,
        pct_start=p["warmup_fraction"],
    )
    scaler = torch.amp.GradScaler(enabled=use_amp)
    generator = torch.Generator().manual_seed(p["seed"])
    beta = torch.distributions.Beta(p["mixup_alpha"], p["mixup_alpha"]) if p["mixup_alpha"] > 0 else None

    history: list[dict[str, float]] = []
    best: dict[str, Any] = {"val_accuracy": -1.0, "val_loss": float("inf")}
    best_state = None
    start = time.perf_counter()
    for epoch in range(1, p["epochs"] + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        total_loss, correct = 0.0, 0
        for step in range(steps_per_epoch):
            batch = order[step * p["batch_size"] : (step + 1) * p["batch_size"]]
            xb = augment(x_train[batch])
            if use_amp:  # pinned host memory lets the copy overlap GPU work
                xb = xb.pin_memory()
            xb = xb.to(device, non_blocking=True)
            yb = y_train[batch].to(device, non_blocking=True)
            lam, perm = 1.0, None
            if beta is not None:
                lam = float(beta.sample())
                perm = torch.randperm(len(xb), generator=generator).to(device)
                xb = lam * xb + (1 - lam) * xb[perm]
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                logits = model(xb)
                loss = F.cross_entropy(logits, yb, label_smoothing=p["label_smoothing"])
                if perm is not None:
                    loss = lam * loss + (1 - lam) * F.cross_entropy(
                        logits, yb[perm], label_smoothing=p["label_smoothing"])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            total_loss += loss.item() * len(batch)
            correct += (logits.argmax(1) == yb).sum().item()

        val_logits = infer(model, x_val, p["batch_size"], device)
        val_loss = F.cross_entropy(val_logits, y_val).item()
        val_acc = (val_logits.argmax(1) == y_val).float().mean().item()
        row = {
            "epoch": epoch,
            "train_loss": round(total_loss / len(x_train), 5),
            "train_accuracy": round(correct / len(x_train), 5),
            "val_loss": round(val_loss, 5),
            "val_accuracy": round(val_acc, 5),
            "lr": float(f"{scheduler.get_last_lr()[0]:.6g}"),
        }
        history.append(row)
        improved = val_acc > best["val_accuracy"] or (
            val_acc == best["val_accuracy"] and val_loss < best["val_loss"])
        if improved:
            best = {"epoch": epoch, "val_accuracy": val_acc, "val_loss": val_loss}
            best_state = copy.deepcopy(model.state_dict())
        print(f"epoch {epoch:3d}  train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.3f}  "
              f"val loss {val_loss:.4f} acc {val_acc:.3f}{'  *' if improved else ''}", flush=True)
        if epoch - best["epoch"] >= p["patience"]:
            print(f"early stop: no val improvement for {p['patience']} epochs")
            break

    seconds = time.perf_counter() - start
    model.load_state_dict(best_state)
    save_checkpoint(p["model_out"], model, p["model"], classes, fp,
                    extra={"best_epoch": best["epoch"], "seed": p["seed"]})
    with atomic_path(p["history"]) as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)
    summary = {
        "best_epoch": best["epoch"],
        "val_accuracy": round(best["val_accuracy"], 5),
        "val_loss": round(best["val_loss"], 5),
        "epochs_run": len(history),
        "train_minutes": round(seconds / 60, 2),
        "device": device.type,
        "parameters": count_parameters(model),
        "train_clips": len(x_train),
        "val_clips": len(x_val),
    }
    write_json(p["metrics"], summary)
    return summary


def main() -> None:
    summary = train(load_params("train"))
    print(f"train: best epoch {summary['best_epoch']}, val accuracy {summary['val_accuracy']:.3f}, "
          f"{summary['train_minutes']:.1f} min on {summary['device']}")


if __name__ == "__main__":
    run_main(main)
