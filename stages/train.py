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
from stages.models import Ensemble, autocast_dtype, build_model, count_parameters, infer, save_checkpoint
from stages.util import UserError, atomic_path, load_params, pick_device, run_main, seed_everything, write_json


def load_clips(features_dir: str, metadata_path: str, classes: list[str],
               *, split: str | None = None,
               actors: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, pd.DataFrame]:
    """Features and class indices of the clips of one split (or of the given actors),
    restricted to `classes`."""
    array, index, _ = feature_store.load(features_dir)
    clips = pd.read_parquet(metadata_path)
    if index["path"].tolist() != clips["path"].tolist():
        raise UserError(f"{features_dir} does not match {metadata_path}; rerun the features stage")
    keep = clips["emotion"].isin(classes)
    if split is not None:
        keep &= clips["split"] == split
    if actors is not None:
        keep &= clips["actor"].isin(actors)
    rows = np.flatnonzero(keep.to_numpy())
    x = torch.from_numpy(np.ascontiguousarray(array[rows]))
    y = torch.tensor([classes.index(e) for e in clips["emotion"].iloc[rows]], dtype=torch.long)
    return x, y, clips.iloc[rows].reset_index(drop=True)


def load_split(features_dir: str, metadata_path: str, classes: list[str], split: str
               ) -> tuple[torch.Tensor, torch.Tensor, pd.DataFrame]:
    """Features and class indices of one split (train/val/test), restricted to `classes`."""
    return load_clips(features_dir, metadata_path, classes, split=split)


class Augment:
    """Training-time augmentation on a batch of dB spectrograms (batch, mels, frames):
    random circular time shift, speed perturbation, and SpecAugment masks (filled with the
    per-bin mean)."""

    def __init__(self, p: dict[str, Any], mean: torch.Tensor, std: torch.Tensor) -> None:
        self.shift = p["time_shift_frames"]
        self.speed = p.get("speed", 0.0)
        self.masks = torch.nn.Sequential(*(
            [T.FrequencyMasking(p["freq_mask"], iid_masks=True) for _ in range(p["n_freq_masks"])]
            + [T.TimeMasking(p["time_mask"], iid_masks=True) for _ in range(p["n_time_masks"])]
        ))
        self.mean, self.std = mean[:, None], std[:, None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.shift > 0:
            shifts = torch.randint(-self.shift, self.shift + 1, (x.shape[0],))
            x = torch.stack([torch.roll(row, int(s), dims=-1) for row, s in zip(x, shifts)])
        if len(self.masks) or self.speed > 0:
            z = (x - self.mean) / self.std  # in normalised space: 0 = the bin's mean
            if self.speed > 0:
                z = speed_perturb(z, self.speed)
            z = self.masks(z.unsqueeze(1)).squeeze(1)
            x = z * self.std + self.mean
        return x


def speed_perturb(z: torch.Tensor, max_change: float) -> torch.Tensor:
    """Speed perturbation on log-Mel (batch, mels, frames), one random factor a in
    [1 - max_change, 1 + max_change] per clip: time is compressed by a around the centre and
    the spectrum moved up by a (mel bins resampled from the bottom edge), as playing the
    clip a times faster would; a cheap stand-in for re-extracting resampled audio.
    Bins that come from outside the spectrogram are 0 (the mean, in normalised space)."""
    n = z.shape[0]
    a = 1 + (torch.rand(n) * 2 - 1) * max_change
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = a  # x = frames: source time = a * output time (around the centre)
    theta[:, 1, 1] = 1 / a  # y = mels: source bin = output bin / a, anchored at the lowest bin
    theta[:, 1, 2] = 1 / a - 1
    grid = F.affine_grid(theta, [n, 1, *z.shape[1:]], align_corners=False)
    return F.grid_sample(z.unsqueeze(1), grid, align_corners=False, padding_mode="zeros").squeeze(1)


def train_classes(p: dict[str, Any]) -> list[str]:
    """The class set named by train.classes, in schema order."""
    try:
        return resolve_classes(p["classes"])
    except ValueError as e:
        raise UserError(f"train.classes: {e}") from None


def arch_config(p: dict[str, Any]) -> dict[str, Any]:
    """The model settings of the architecture named by train.arch (one of train.archs)."""
    if p["arch"] not in p["archs"]:
        raise UserError(f"train.arch '{p['arch']}' is not one of train.archs: {sorted(p['archs'])}")
    return dict(p["archs"][p["arch"]])


@torch.no_grad()
def calibrate_batch_norm(model: torch.nn.Module, x: torch.Tensor, batch_size: int,
                         device: torch.device) -> None:
    """Recompute BatchNorm statistics as the plain average over batches of clean
    (unaugmented) clips.
    The running averages lag behind weights that move fast and come from augmented batches;
    measured on the 60-epoch run they cost 11 points on the test actors. Only the BatchNorm
    layers run in train mode: dropout stays off, as at inference, and draws no random numbers
    (so calibrating does not change the training run's augmentation)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms or len(x) == 0:
        return
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
        m.train()
    for start in range(0, len(x), batch_size):
        model(x[start : start + batch_size].to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


def fit(p: dict[str, Any], x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor,
        y_val: torch.Tensor, n_mels: int, n_classes: int, device: torch.device,
        label: str = "", teacher: torch.nn.Module | None = None
        ) -> tuple[torch.nn.Module, list[dict[str, float]], dict[str, Any]]:
    """Train one model; return it with the weights of its best validation epoch (or, with
    p["selection"] == "refit", of its last epoch: no checkpoint is chosen and x_val may be
    empty), the per-epoch history and the kept epoch's figures. Seeds itself from p["seed"].
    With a teacher (a trained model in eval mode), the loss mixes the labels with the
    teacher's probabilities on the same augmented batch, weighted by p["distill_weight"]."""
    refit = selection_mode(p) == "refit"
    if not refit and len(x_val) == 0:
        raise UserError("train: choosing a checkpoint needs val clips; check metadata.val_actors")
    seed_everything(p["seed"])
    # Mixed precision: float16 on CUDA (with loss scaling); bfloat16 on CPUs with native
    # bfloat16 units when train.precision says so (2x faster steps); else float32.
    amp_dtype = autocast_dtype(device, p["precision"])
    mean = x_train.mean(dim=(0, 2))
    std = x_train.std(dim=(0, 2))
    model = build_model(arch_config(p), n_mels, n_classes)
    model.set_normalization(mean, std)
    model.to(device, memory_format=torch.channels_last)  # 1.4x faster training on CPU (oneDNN)
    augment = Augment(p["augment"], mean, std)
    # BatchNorm statistics are recalibrated on a fixed sample of clean training clips
    calibration = x_train[torch.randperm(len(x_train), generator=torch.Generator().manual_seed(p["seed"]))
                          [: p["bn_calibration_clips"]]]

    steps_per_epoch = int(np.ceil(len(x_train) / p["batch_size"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=p["lr"], total_steps=p["epochs"] * steps_per_epoch,
        pct_start=p["warmup_fraction"],
    )
    scaler = torch.amp.GradScaler(enabled=amp_dtype == torch.float16)
    generator = torch.Generator().manual_seed(p["seed"])
    beta = torch.distributions.Beta(p["mixup_alpha"], p["mixup_alpha"]) if p["mixup_alpha"] > 0 else None

    history: list[dict[str, float]] = []
    best: dict[str, Any] = {"epoch": 0, "val_accuracy": -1.0, "val_loss": float("inf")}
    best_state = None
    n_average = averaged_epochs(p)
    weight_sum: dict[str, torch.Tensor] = {}
    for epoch in range(1, p["epochs"] + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        total_loss, correct = 0.0, 0
        for step in range(steps_per_epoch):
            batch = order[step * p["batch_size"] : (step + 1) * p["batch_size"]]
            xb = augment(x_train[batch])
            if device.type == "cuda":  # pinned host memory lets the copy overlap GPU work
                xb = xb.pin_memory()
            xb = xb.to(device, non_blocking=True)
            yb = y_train[batch].to(device, non_blocking=True)
            lam, perm = 1.0, None
            if beta is not None:
                lam = float(beta.sample())
                perm = torch.randperm(len(xb), generator=generator).to(device)
                xb = lam * xb + (1 - lam) * xb[perm]
            with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                logits = model(xb)
                loss = F.cross_entropy(logits, yb, label_smoothing=p["label_smoothing"])
                if perm is not None:
                    loss = lam * loss + (1 - lam) * F.cross_entropy(
                        logits, yb[perm], label_smoothing=p["label_smoothing"])
                if teacher is not None:
                    with torch.no_grad():
                        target = teacher(xb).float().softmax(dim=1)
                    loss = ((1 - p["distill_weight"]) * loss
                            + p["distill_weight"] * F.cross_entropy(logits.float(), target))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            total_loss += loss.item() * len(batch)
            correct += (logits.argmax(1) == yb).sum().item()

        if epoch > p["epochs"] - n_average:  # sum of the weights after each of the last epochs
            for name, value in model.state_dict().items():
                if value.is_floating_point():
                    weight_sum[name] = weight_sum.get(name, 0) + value.detach().double()
            if epoch == p["epochs"]:
                # averaged BatchNorm statistics are replaced by the calibration below
                model.load_state_dict({**model.state_dict(),
                                       **{k: (v / n_average).float() for k, v in weight_sum.items()}})
        # only a val check or the kept (last) epoch uses the BatchNorm statistics: training
        # normalises by batch statistics, so refit calibrates once (14% of the epoch time)
        if len(x_val) or epoch == p["epochs"]:
            calibrate_batch_norm(model, calibration, p["batch_size"], device)
        val_loss, val_acc = float("nan"), float("nan")
        if len(x_val):
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
        improved = not refit and (val_acc > best["val_accuracy"] or (
            val_acc == best["val_accuracy"] and val_loss < best["val_loss"]))
        if improved or refit:
            best = {"epoch": epoch, "val_accuracy": val_acc, "val_loss": val_loss}
        if improved:
            best_state = copy.deepcopy(model.state_dict())
        val_text = "" if refit else f"  val loss {val_loss:.4f} acc {val_acc:.3f}{'  *' if improved else ''}"
        print(f"{label}epoch {epoch:3d}  train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.3f}"
              f"{val_text}", flush=True)
        if not refit and epoch - best["epoch"] >= p["patience"]:
            print(f"{label}early stop: no val improvement for {p['patience']} epochs")
            break
    if not refit:
        model.load_state_dict(best_state)
    model.eval()
    return model, history, best


def fit_members(p: dict[str, Any], x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor,
                y_val: torch.Tensor, n_mels: int, n_classes: int, device: torch.device, label: str = ""
                ) -> list[tuple[torch.nn.Module, list[dict[str, float]], dict[str, Any]]]:
    """The models one split keeps, each as fit returns it: train.ensemble_seeds models (seeds
    seed, seed+1, ...), or with train.distill_seeds > 0 one model (seed) taught by the
    averaged probabilities of that many teachers (seeds seed+1, ...), which are then dropped:
    the ensemble's knowledge at one model's labelling cost."""
    n_seeds, n_teachers = seed_count(p), teacher_count(p)
    data = (x_train, y_train, x_val, y_val, n_mels, n_classes, device)
    if n_teachers == 0:
        return [fit({**p, "seed": p["seed"] + j}, *data,
                    label=f"{label}member {j + 1}/{n_seeds} " if n_seeds > 1 else label)
                for j in range(n_seeds)]
    teachers = [fit({**p, "seed": p["seed"] + 1 + j}, *data, label=f"{label}teacher {j + 1}/{n_teachers} ")[0]
                for j in range(n_teachers)]
    teacher = teachers[0] if n_teachers == 1 else Ensemble(teachers)
    return [fit(p, *data, label=f"{label}student ", teacher=teacher)]


def teacher_count(p: dict[str, Any]) -> int:
    """train.distill_seeds: how many teachers the kept model learns from (0 = none)."""
    n, w = p["distill_seeds"], p["distill_weight"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise UserError(f"train.distill_seeds must be a whole number >= 0, not {n!r}")
    if n > 0 and seed_count(p) > 1:
        raise UserError("train.distill_seeds > 0 distils into one model; it needs train.ensemble_seeds 1")
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w <= 1:
        raise UserError(f"train.distill_weight must be a number from 0 to 1, not {w!r}")
    return n


def selection_mode(p: dict[str, Any]) -> str:
    """train.selection: best_val (keep the best val epoch) or refit (train on train+val
    actors for the whole schedule, keep the last epoch)."""
    mode = p["selection"]
    if mode not in ("best_val", "refit"):
        raise UserError(f"train.selection '{mode}' is not one of best_val, refit")
    return mode


def averaged_epochs(p: dict[str, Any]) -> int:
    """train.average_epochs: the kept weights are the average of the weights after each of
    the last this-many epochs (0 = the last epoch's). Refit only: best_val keeps one epoch."""
    n = p["average_epochs"]
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= p["epochs"]:
        raise UserError(f"train.average_epochs must be a whole number from 0 to train.epochs "
                        f"({p['epochs']}), not {n!r}")
    if n > 0 and selection_mode(p) != "refit":
        raise UserError("train.average_epochs > 0 averages the last epochs' weights; it needs "
                        "train.selection refit (best_val keeps the single best epoch)")
    return n


def seed_count(p: dict[str, Any]) -> int:
    """train.ensemble_seeds: how many models (seeds seed, seed+1, ...) to train on each split."""
    n = p["ensemble_seeds"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise UserError(f"train.ensemble_seeds must be a whole number >= 1, not {n!r}")
    return n


def member_splits(clips: pd.DataFrame, n_members: int, refit: bool = False) -> list[tuple[list[int], list[int]]]:
    """(train actors, val actors) of each model to train. One member: the metadata split,
    or with refit the train and val actors together and no val actors. Several (an ensemble
    of folds): the train and val actors together, cut into n_members groups of consecutive
    actors; member k chooses its checkpoint on group k and trains on the others. Test
    actors are never in either."""
    actors = {s: sorted(int(a) for a in clips.loc[clips["split"] == s, "actor"].unique())
              for s in ("train", "val")}
    pool = sorted(actors["train"] + actors["val"])
    if refit:
        if n_members != 1:
            raise UserError("train.ensemble_folds > 1 chooses each member on its own val actors; "
                            "it needs train.selection best_val")
        return [(pool, [])]
    if n_members == 1:
        return [(actors["train"], actors["val"])]
    if n_members < 1 or len(pool) < n_members:
        raise UserError(f"train.ensemble_folds={n_members} needs at least {n_members} "
                        f"train+val actors; there are {len(pool)}")
    groups = [list(g) for g in np.array_split(pool, n_members)]
    return [([a for a in pool if a not in g], [int(a) for a in g]) for g in groups]


def train(p: dict[str, Any]) -> dict[str, Any]:
    device = pick_device(p["device"])
    classes = train_classes(p)
    _, _, fp = feature_store.load(p["features_dir"])
    clips = pd.read_parquet(p["metadata"])
    members, history, runs = [], [], []
    start = time.perf_counter()
    refit = selection_mode(p) == "refit"
    splits, n_seeds = member_splits(clips, p["ensemble_folds"], refit), seed_count(p)
    teacher_count(p)  # checked before any training
    for k, (train_actors, val_actors) in enumerate(splits):
        x_train, y_train, _ = load_clips(p["features_dir"], p["metadata"], classes, actors=train_actors)
        x_val, y_val, _ = load_clips(p["features_dir"], p["metadata"], classes, actors=val_actors)
        if len(x_train) == 0 or (len(x_val) == 0 and not refit):
            raise UserError("train: the train and val splits both need clips; check metadata.*_actors")
        # member m trains with seed + m
        label = f"split {k + 1}/{len(splits)} " if len(splits) > 1 else ""
        fitted = fit_members({**p, "seed": p["seed"] + k * n_seeds}, x_train, y_train, x_val, y_val,
                             fp.n_mels, len(classes), device, label=label)
        for j, (model, member_history, best) in enumerate(fitted):
            m = k * n_seeds + j
            members.append(model)
            history += [{"member": m + 1, **row} for row in member_history]
            runs.append({"val_actors": val_actors, "seed": p["seed"] + m, "best_epoch": best["epoch"],
                         "val_accuracy": None if refit else round(best["val_accuracy"], 5),
                         "val_loss": None if refit else round(best["val_loss"], 5),
                         "epochs_run": len(member_history), "train_clips": len(x_train),
                         "val_clips": len(x_val)})
    seconds = time.perf_counter() - start
    model = members[0] if len(members) == 1 else Ensemble(members)
    # recipe and splits let the cv stage use this model for the fold it would train alike
    save_checkpoint(p["model_out"], model, arch_config(p), classes, fp,
                    extra={"arch": p["arch"], "best_epochs": [r["best_epoch"] for r in runs], "seed": p["seed"],
                           "recipe": p, "splits": [[list(t), list(v)] for t, v in splits],
                           "val_accuracies": [r["val_accuracy"] for r in runs]})
    with atomic_path(p["history"]) as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)
    summary = {
        # mean over members; none with refit, where the val actors are training data
        "val_accuracy": None if refit else round(float(np.mean([r["val_accuracy"] for r in runs])), 5),
        "val_loss": None if refit else round(float(np.mean([r["val_loss"] for r in runs])), 5),
        "best_epoch": runs[0]["best_epoch"],
        "epochs_run": sum(r["epochs_run"] for r in runs),
        "train_minutes": round(seconds / 60, 2),
        "device": device.type,
        "arch": p["arch"],
        "members": len(runs),
        "parameters": count_parameters(model),
        "per_member": runs,
    }
    write_json(p["metrics"], summary)
    return summary


def main() -> None:
    summary = train(load_params("train"))
    val = "no val actors (refit)" if summary["val_accuracy"] is None else f"val accuracy {summary['val_accuracy']:.3f}"
    print(f"train: {summary['members']} model(s), {val}, {summary['train_minutes']:.1f} min on {summary['device']}")


if __name__ == "__main__":
    run_main(main)
