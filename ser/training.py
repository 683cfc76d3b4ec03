"""Training: the clips of some actors, the augmentation, and one readable loop (after
nanoGPT, no trainer framework) that trains a model on them for a fixed number of epochs
and keeps the last one. No checkpoint is chosen, so no held-out clip is ever looked at:
the test actors never reach this module, and cross-validation (ser.crossval) measures.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import torchaudio.transforms as T

from ser import ddp
from ser import features as feature_store
from ser.corpora import resolve_classes
from ser.audio import FeatureParams
from ser.dsp import hz_to_mel, mel_band_edges
from ser.calibration import expected_calibration_error, fit_temperature
from ser.fusion import LinearHead, average_speaker, fused_log_probs, group_statistics, standardise, train_head
from ser.device import autocast_dtype
from ser.models import Ensemble, build_model, calibrate_batch_norm, infer, speaker_statistics
from ser.util import UserError, seed_everything


NORMALISATIONS = ("clip", "speaker")


def input_statistics(x: torch.Tensor, clips: pd.DataFrame, normalisation: str
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per clip (mean, std) per mel bin that the model of `normalisation` takes its input
    relative to: None for clip (the model subtracts each clip's own mean itself), the
    speaker's statistics for speaker (speaker_statistics, by the clips' speaker column)."""
    if normalisation not in NORMALISATIONS:
        raise UserError(f"train.normalisation must be one of {', '.join(NORMALISATIONS)}, not {normalisation!r}")
    return speaker_statistics(x, clips["speaker"].to_numpy()) if normalisation == "speaker" and len(x) else None


# How a speaker-normalised model's clips can be grouped at labelling time, as evaluation scores
# them: by speaker (the labeller's --speakers folder or manifest), the whole corpus as one group
# (a flat folder of one source: --speakers all), each clip alone (an old model file without the
# training speakers' statistics), or the training speakers' average (population: --speakers none).
SCORED_GROUPINGS = ("speaker", "corpus", "clip", "population")


def grouping_keys(clips: pd.DataFrame, grouping: str) -> np.ndarray | None:
    """Each clip's group under `grouping` (SCORED_GROUPINGS); None for population (no groups)."""
    if grouping not in SCORED_GROUPINGS:
        raise ValueError(f"grouping must be one of {', '.join(SCORED_GROUPINGS)}, not {grouping!r}")
    return {"speaker": clips["speaker"].to_numpy(), "corpus": clips["corpus"].to_numpy(),
            "clip": np.arange(len(clips))}.get(grouping)


def grouped_statistics(x: torch.Tensor, clips: pd.DataFrame, grouping: str,
                       population: tuple[torch.Tensor, torch.Tensor] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per clip (mean, std) per mel bin of the clips' `grouping` (SCORED_GROUPINGS); population: the
    given (mean, std) per bin for every clip (fusion.average_speaker of the training clips')."""
    keys = grouping_keys(clips, grouping)
    if keys is None:
        if population is None:
            raise ValueError("grouping population needs the training speakers' statistics")
        return population[0].expand(len(x), -1), population[1].expand(len(x), -1)
    return speaker_statistics(x, keys)


def grouped_functionals(f: np.ndarray, clips: pd.DataFrame, grouping: str, head: LinearHead | None
                        ) -> np.ndarray | None:
    """The clips' functionals standardised as grouped_statistics groups their log-Mel (population:
    the head's average training speaker); None without a head (no linear model to feed)."""
    if head is None:
        return None
    keys = grouping_keys(clips, grouping)
    return standardise(f, *(head.population if keys is None else group_statistics(f, keys)))


def uses_encoder(r: dict[str, Any]) -> bool:
    """Whether recipe r's linear model hears the encoder's summary (r["encoder"], default true) when
    the features have one; false: a model that labels without running the encoder (params fast)."""
    return r.get("encoder", True) is not False


def model_feature_params(r: dict[str, Any], fp: FeatureParams) -> FeatureParams:
    """The feature params a model of recipe r hears, from those of its training features `fp`: without
    the encoder when the recipe leaves it out, so that the labeller does not run it."""
    return fp if uses_encoder(r) else replace(fp, encoder=None, encoder_layers=None)


def recipe_functionals(r: dict[str, Any], features_dir: str, paths: "pd.Series | list[str]") -> np.ndarray:
    """The functionals of the clips at `paths` that recipe r's linear model hears (uses_encoder)."""
    return feature_store.load_functionals(features_dir, paths, encoder=uses_encoder(r))


def fit_head(r: dict[str, Any], features_dir: str, clips: pd.DataFrame, y: torch.Tensor, n_classes: int,
             weights: torch.Tensor | None, calibration: tuple[torch.Tensor, pd.DataFrame] | None
             ) -> LinearHead | None:
    """The linear model of recipe r (train.fusion) on `clips` (labels y, clip weights as the CNN's
    epochs draw them), calibrated on `calibration` (labels, clips of held-out speakers)."""
    if not (r.get("fusion") or {}).get("weight"):
        return None
    f = recipe_functionals(r, features_dir, clips["path"])
    held_out = None
    if calibration is not None and len(calibration[1]):
        y_cal, cal_clips = calibration
        held_out = (recipe_functionals(r, features_dir, cal_clips["path"]), y_cal.numpy(),
                    cal_clips["speaker"].to_numpy())
    try:
        return train_head(f, y.numpy(), clips["speaker"].to_numpy(), n_classes,
                          None if weights is None else weights.numpy(), r["fusion"], held_out)
    except (KeyError, ValueError) as e:
        raise UserError(f"train.fusion: {e}") from None


def apply_statistics(x: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    return x if stats is None else (x - stats[0][:, :, None]) / stats[1][:, :, None]


def load_raw(features_dir: str, metadata_path: str, classes: list[str], *, split: str | list[str] | None = None,
             speakers: list[str] | None = None, corpora: list[str] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, pd.DataFrame]:
    """Features (as the features stage wrote them) and class indices of the clips of a split
    or splits (and/or of the given speakers, of the given corpora), restricted to `classes`."""
    array, index, _ = feature_store.load(features_dir)
    clips = pd.read_parquet(metadata_path)
    if index["path"].tolist() != clips["path"].tolist():
        raise UserError(f"{features_dir} does not match {metadata_path}; rerun the features stage")
    keep = clips["emotion"].isin(classes)
    if split is not None:
        keep &= clips["split"].isin([split] if isinstance(split, str) else split)
    if speakers is not None:
        keep &= clips["speaker"].isin(speakers)
    if corpora is not None:
        keep &= clips["corpus"].isin(corpora)
    rows = np.flatnonzero(keep.to_numpy())
    x = torch.from_numpy(np.ascontiguousarray(array[rows]))
    y = torch.tensor([classes.index(e) for e in clips["emotion"].iloc[rows]], dtype=torch.long)
    return x, y, clips.iloc[rows].reset_index(drop=True)


def load_clips(features_dir: str, metadata_path: str, classes: list[str], *, split: str | list[str] | None = None,
               speakers: list[str] | None = None, corpora: list[str] | None = None,
               normalisation: str = "clip") -> tuple[torch.Tensor, torch.Tensor, pd.DataFrame]:
    """load_raw's clips as the model of `normalisation` takes them (input_statistics)."""
    x, y, clips = load_raw(features_dir, metadata_path, classes, split=split, speakers=speakers, corpora=corpora)
    return apply_statistics(x, input_statistics(x, clips, normalisation)), y, clips


def model_arch(r: dict[str, Any]) -> dict[str, Any]:
    """The model settings of recipe r: train.model, and the per-clip mean subtraction unless
    the input is speaker-normalised (train.normalisation)."""
    return {**r["model"], "utterance_norm": r.get("normalisation", "clip") == "clip"}


def warp_frequency(x: torch.Tensor, fp: FeatureParams, factors: torch.Tensor) -> torch.Tensor:
    """(batch, mels, frames) log-Mel with clip i's frequency axis scaled by factors[i] on the Hz
    scale (vocal tract length perturbation: the same speech from a shorter, > 1, or longer vocal
    tract; time untouched): each band reads the band at its centre frequency / factor,
    interpolated linearly; what comes from below fmin or above fmax repeats the edge band."""
    n_mels = x.shape[1]
    centre_hz = mel_band_edges(n_mels, fp.fmin, fp.fmax)[1:-1]
    wanted = hz_to_mel(centre_hz[None, :] / factors.double().numpy()[:, None])
    # the (fractional) band whose centre is there: the centres are evenly spaced in mel
    source = np.interp(wanted.ravel(), hz_to_mel(centre_hz), np.arange(n_mels)).reshape(wanted.shape)
    source = torch.from_numpy(source).to(x.dtype)  # (batch, mels) band index, 0 to n_mels - 1
    low = source.floor().long().clamp(max=n_mels - 2)
    weight = (source - low)[:, :, None]
    index = low[:, :, None].expand(-1, -1, x.shape[2])
    return x.gather(1, index) * (1 - weight) + x.gather(1, index + 1) * weight


class Augment:
    """Training-time augmentation on a batch of dB spectrograms (batch, mels, frames): a
    random vocal tract length (warp_frequency, each clip by a factor within 1 +- p["vtlp"];
    0 or absent: off, no random numbers drawn), a random circular time shift and SpecAugment
    masks (filled with the per-bin mean)."""

    def __init__(self, p: dict[str, Any], mean: torch.Tensor, std: torch.Tensor,
                 fp: FeatureParams | None = None) -> None:
        vtlp = p.get("vtlp")
        vtlp = 0.0 if vtlp is None else vtlp  # absent or null: off
        if isinstance(vtlp, bool) or not isinstance(vtlp, (int, float)) or not 0 <= vtlp < 0.5:
            raise UserError(f"train.augment.vtlp must be a number at least 0 and below 0.5, not {vtlp!r}")
        self.vtlp, self.fp = float(vtlp), fp
        if self.vtlp and fp is None:
            raise ValueError("vtlp needs the features' FeatureParams (the mel bands' frequencies)")
        self.shift = p["time_shift_frames"]
        self.masks = torch.nn.Sequential(*(
            [T.FrequencyMasking(p["freq_mask"], iid_masks=True) for _ in range(p["n_freq_masks"])]
            + [T.TimeMasking(p["time_mask"], iid_masks=True) for _ in range(p["n_time_masks"])]
        ))
        self.mean, self.std = mean[:, None], std[:, None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.vtlp:
            x = warp_frequency(x, self.fp, 1 + (torch.rand(len(x), dtype=torch.float64) * 2 - 1) * self.vtlp)
        if self.shift > 0:
            shifts = torch.randint(-self.shift, self.shift + 1, (x.shape[0],))
            x = torch.stack([torch.roll(row, int(s), dims=-1) for row, s in zip(x, shifts)])
        if len(self.masks):
            z = (x - self.mean) / self.std  # in normalised space: 0 = the bin's mean
            x = self.masks(z.unsqueeze(1)).squeeze(1) * self.std + self.mean
        return x


def train_classes(selected: str | list[str] | None) -> list[str]:
    """The class set named by train.classes, in schema order."""
    try:
        return resolve_classes(selected)
    except ValueError as e:
        raise UserError(f"train.classes: {e}") from None


def sampling_weights(clips: pd.DataFrame, r: dict[str, Any]) -> torch.Tensor | None:
    """Per-clip weights for drawing an epoch under recipe r (None: every clip once, shuffled).
    balance corpus: every corpus weighs the same whatever its size, so one big corpus does not
    drown the rest, times r["corpus_weights"][corpus] where given (a corpus not trained on here,
    as in leave-one-corpus-out, is passed over)."""
    balance, corpus_weights = r.get("balance", "none"), r.get("corpus_weights") or {}
    if balance not in ("none", "corpus"):
        raise UserError(f"train.balance must be none or corpus, not {balance!r}")
    bad = {name: w for name, w in corpus_weights.items() if not isinstance(w, (int, float)) or w <= 0}
    if bad:
        raise UserError(f"train.corpus_weights must be positive numbers, not {bad}")
    if balance == "none" or clips["corpus"].nunique() < 2:
        return None
    per_clip = clips["corpus"].map(lambda corpus: float(corpus_weights.get(corpus, 1.0)))
    per_clip = per_clip / clips["corpus"].map(clips["corpus"].value_counts())
    return torch.tensor(per_clip.to_numpy(), dtype=torch.double)


def one_cycle(model: torch.nn.Module, r: dict[str, Any], total_steps: int, amp_dtype: torch.dtype | None
              ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.OneCycleLR, torch.amp.GradScaler]:
    """AdamW under the one-cycle schedule of recipe r, and the loss scaler float16 needs."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=r["lr"], pct_start=r["warmup_fraction"],
                                                    total_steps=total_steps)
    return optimizer, scheduler, torch.amp.GradScaler(enabled=amp_dtype == torch.float16)


def fit(r: dict[str, Any], x_train: torch.Tensor, y_train: torch.Tensor, fp: FeatureParams, n_classes: int,
        device: torch.device, label: str = "", weights: torch.Tensor | None = None,
        stats: tuple[torch.Tensor, torch.Tensor] | None = None
        ) -> tuple[torch.nn.Module, list[dict[str, float]]]:
    """Train one model on (x_train: features as written, fp; `stats`: what the model takes
    them relative to, input_statistics) for r["epochs"] epochs of the one-cycle schedule and
    keep the last; return it in eval mode with its per-epoch history. An epoch is every clip
    once in random order, or as many drawn by `weights` (sampling_weights). Seeded from
    r["seed"]: the same recipe and data give the same weights on one CPU."""
    seed_everything(r["seed"])
    x_train = apply_statistics(x_train, stats)
    # float16 on CUDA (loss-scaled); bfloat16 on CPUs with native units (faster); else float32
    amp_dtype = autocast_dtype(device, r["precision"])
    mean, std = x_train.mean(dim=(0, 2)), x_train.std(dim=(0, 2))
    model = build_model(model_arch(r), fp.n_mels, n_classes)
    model.set_normalization(mean, std)
    model.to(device, memory_format=torch.channels_last)  # oneDNN's faster layout on CPU
    trained = ddp.wrap(model, device)  # under torchrun: gradients averaged over the processes (ser.ddp)
    augment = Augment(r["augment"], mean, std, fp)
    # BatchNorm statistics are recalibrated at the end on a fixed sample of clean clips
    sample = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(r["seed"]))
    calibration = x_train[sample[: r["bn_calibration_clips"]]]
    ddp.seed_augmentation(r["seed"])  # each process its own masks; the epoch order stays shared
    batch_size = r["batch_size"]
    steps_per_epoch = int(np.ceil(len(ddp.my_share(torch.arange(len(x_train)))) / batch_size))
    optimizer, scheduler, scaler = one_cycle(model, r, r["epochs"] * steps_per_epoch, amp_dtype)
    generator = torch.Generator().manual_seed(r["seed"])
    history: list[dict[str, float]] = []
    for epoch in range(1, r["epochs"] + 1):
        model.train()
        order = ddp.my_share(torch.randperm(len(x_train), generator=generator) if weights is None else
                             torch.multinomial(weights, len(x_train), replacement=True, generator=generator))
        total_loss, correct = 0.0, 0
        for step in range(steps_per_epoch):
            batch = order[step * batch_size : (step + 1) * batch_size]
            xb = augment(x_train[batch])
            if device.type == "cuda":  # pinned host memory lets the copy overlap GPU work
                xb = xb.pin_memory()
            xb, yb = xb.to(device, non_blocking=True), y_train[batch].to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                logits = trained(xb)
                loss = F.cross_entropy(logits, yb, label_smoothing=r["label_smoothing"])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            total_loss += loss.item() * len(batch)
            correct += (logits.argmax(1) == yb).sum().item()
        total_loss, correct, seen = ddp.sum_over_ranks(total_loss, correct, len(order))
        history.append({"epoch": epoch, "train_loss": round(total_loss / seen, 5),
                        "train_accuracy": round(correct / seen, 5),
                        "lr": float(f"{scheduler.get_last_lr()[0]:.6g}")})
        if ddp.is_main():
            print(f"{label}epoch {epoch:3d}  train loss {history[-1]['train_loss']:.4f} "
                  f"acc {history[-1]['train_accuracy']:.3f}", flush=True)
    # training normalises by batch statistics, so only the kept epoch needs them (once)
    calibrate_batch_norm(model, calibration, batch_size, device)
    return model.eval(), history


def fit_ensemble(r: dict[str, Any], x_train: torch.Tensor, y_train: torch.Tensor, fp: FeatureParams,
                 n_classes: int, device: torch.device, label: str = "", weights: torch.Tensor | None = None,
                 stats: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.nn.Module, list[dict[str, float]]]:
    """r["ensemble_seeds"] models (seeds seed, seed+1, ...) voting by averaged probabilities
    (one: that model), and the history of every member (column `member`)."""
    if r["precision"] == "int8":
        raise UserError("train.precision int8: training runs in float32 or bfloat16 (int8 is the labeller's)")
    n = r["ensemble_seeds"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise UserError(f"train.ensemble_seeds must be a whole number >= 1, not {n!r}")
    members, history = [], []
    for j in range(n):
        model, rows = fit({**r, "seed": r["seed"] + j}, x_train, y_train, fp, n_classes, device,
                          label=f"{label}member {j + 1}/{n} " if n > 1 else label, weights=weights, stats=stats)
        members.append(model)
        history += [{"member": j + 1, **row} for row in rows]
    return (members[0] if n == 1 else Ensemble(members)), history


def train(r: dict[str, Any], features_dir: str, metadata_path: str, device: torch.device
          ) -> tuple[torch.nn.Module, list[dict[str, float]], dict[str, Any]]:
    """The recipe `r` on every training clip of the metadata (split `train`, every corpus):
    (model, history, record). The record (recipe, training speakers, minutes) goes into the model file,
    so that cross-validation can recognise the fold this model already is."""
    classes = train_classes(r["classes"])
    x, y, clips = load_raw(features_dir, metadata_path, classes, split="train")
    if len(x) == 0:
        raise UserError(f"train: no training clips in {metadata_path}; check metadata.test_actors")
    start, stats = time.perf_counter(), input_statistics(x, clips, r.get("normalisation", "clip"))
    weights = sampling_weights(clips, r)
    model, history = fit_ensemble(r, x, y, feature_store.load(features_dir)[2], len(classes), device,
                                  weights=weights, stats=stats)
    x_cal, y_cal, cal_clips = load_raw(features_dir, metadata_path, classes, split="calibration")
    head = fit_head(r, features_dir, clips, y, len(classes), weights, (y_cal, cal_clips))
    # the average training speaker: what the labeller can normalise by when it knows no speaker
    population = {} if stats is None else {"population": [t.tolist() for t in average_speaker(*stats, clips["speaker"])]}
    record = {"recipe": r, "classes": classes, "normalisation": r.get("normalisation", "clip"), **population,
              "train_speakers": sorted(clips["speaker"].unique()),
              "train_actors": sorted(int(a) for a in clips["actor"].dropna().unique()),
              "train_clips": len(x), "train_minutes": round((time.perf_counter() - start) / 60, 2),
              **calibrate(model, r, (x_cal, y_cal, cal_clips), features_dir, device, head)}
    if head is not None:  # the linear model fused with the CNN (ser.fusion): the labeller reads it here
        record["fusion"] = head.to_record()
    return model, history, record


def calibrate(model: torch.nn.Module, r: dict[str, Any], split: tuple[torch.Tensor, torch.Tensor, pd.DataFrame],
              features_dir: str, device: torch.device, head: LinearHead | None = None) -> dict[str, Any]:
    """The temperature that calibrates `model` on the calibration `split` (load_raw's features,
    labels and clips of speakers it never trained on), with the split's ECE and NLL before and
    after (and fused with `head`, the linear model); {} when the split is empty."""
    x, y, clips = split
    if len(x) == 0:
        return {}
    x = apply_statistics(x, input_statistics(x, clips, r.get("normalisation", "clip")))
    logits = infer(model, x, r["batch_size"], device, r["precision"])
    t = fit_temperature(logits, y)
    ece = {name: expected_calibration_error((logits / k).softmax(dim=1).numpy(), y.numpy())
           for name, k in (("before", 1.0), ("after", t))}
    figures = {"clips": len(x), "ece_before": round(ece["before"], 5), "ece_after": round(ece["after"], 5),
               "nll_before": round(float(F.cross_entropy(logits, y)), 5),
               "nll_after": round(float(F.cross_entropy(logits / t, y)), 5)}
    if head is not None:
        f = recipe_functionals(r, features_dir, clips["path"])
        fused = fused_log_probs(logits / t, grouped_functionals(f, clips, "speaker", head), head)
        figures.update(fused_ece=round(expected_calibration_error(fused.exp().numpy(), y.numpy()), 5),
                       fused_nll=round(float(F.nll_loss(fused, y)), 5))
    return {"temperature": round(t, 5), "calibration_speakers": sorted(clips["speaker"].unique()),
            "calibration": figures}
