"""Ablations scored on the actor folds (the cv stage's protocol), not on one split.

    python bench/cv_experiments.py run NAME [FOLD ...]   # one ablation of experiments.py
    python bench/cv_experiments.py tta NAME              # its kept fold models, test-time warps
    python bench/cv_experiments.py table                 # -> reports/cv_ablations.csv
                                                         #    and reports/arch_comparison_folds.csv

One test split of 4 actors moves by about 5 points between runs of the same recipe, so
recipe choices are made on the mean over all folds. Every ablation trains one model per
fold (train.ensemble_seeds 1, unless it sets it): compare it with the single seed-42 run
("seed 42, current machine"), not with the default's 3-seed ensemble. Each fold's result
is saved as it finishes (data/experiments/cv/<name>/fold<k>.json, and its test clips'
probabilities in fold<k>.csv), so two shells can run different folds of one ablation at
once (THREADS=1 each). `table` lists every ablation whose folds are all done here (rows of
the committed table that were not rerun stay), with the committed cv stage run
(reports/cv_folds.csv) as the default's row, and scores the seed ensembles of SEED_RUNS by
averaging the runs' saved probabilities clip by clip (no training). Ablations of
FEATURE_VARIANTS train on other features, built once with the features stage's code under
data/experiments/features/.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from experiments import ABLATIONS, ROOT, RESULTS, apply, write_table

from stages import features as feature_store  # noqa: E402
from stages import cv as cv_stage  # noqa: E402
from stages import train as train_stage  # noqa: E402
from stages.audio import FeatureParams, hz_to_mel, mel_to_hz  # noqa: E402
from stages.cv import fold_setup, run_fold, summarise  # noqa: E402
from stages.evaluate import confusion_matrix, scores_from_confusion  # noqa: E402
from stages.models import build_model, count_parameters, infer  # noqa: E402

CV_RESULTS = RESULTS / "cv"
TABLE = ROOT / "reports" / "cv_ablations.csv"
COMMITTED = "default (committed cv stage: seeds 42-44, probabilities averaged)"
BEST_VAL = "best_val checkpoint, seed 42 (previous default)"
SPEAKER_NORM = "best_val, per-speaker normalisation, absolute dB"
ARCHS = ["cnn2", "cnn4", "vgg", "crnn"]
ARCH_TABLE = ROOT / "reports" / "arch_comparison_folds.csv"


def arch_run(arch: str) -> str:
    return f"arch {arch}, seed 42, 2026-11-24 machine"


def float32_run(seed: int, pooling: str = "meanmax") -> str:
    """Single-seed runs of the float32 machine (2026-11-30): the default recipe or meanstd."""
    if pooling == "meanstd":
        return f"statistics pooling (mean+std over time), seed {seed}, float32 machine"
    return f"seed {seed}, float32 machine (2026-11-30)"


# Ablations that need other features than the features stage's: the change to params
# `features`, whether each actor's clips are normalised by that actor's statistics, and
# optionally "dir", the features folder's name when several ablations share one.
FEATURE_VARIANTS = {SPEAKER_NORM: {"top_db": None, "speaker_norm": True}}
# Twice the mel resolution (harmonics of the voice's pitch resolved up to ~1 kHz) at half the
# frame rate (hop 32 ms): the same input size, so the same training cost as the default.
# Time shift and mask are in frames, so they are halved to keep their length in seconds.
MEL128_HOP512 = "128 mel bands, hop 512 (100 frames)"
MEL128_HOP512_CHANGE = {"augment.time_shift_frames": 10, "augment.time_mask": 10}


def mel128_run(seed: int) -> str:
    return f"{MEL128_HOP512}, seed {seed}, float32 machine"


FEATURE_VARIANTS.update({mel128_run(seed): {"n_mels": 128, "hop_length": 512, "dir": MEL128_HOP512}
                         for seed in (42, 43, 44)})

# Vocal tract length perturbation (VTLP), a candidate tried here before it would move into
# stages/train.py's Augment: each training clip's frequency axis is scaled by a random factor
# a in [1 - w, 1 + w] on the Hz scale (S'(f) = S(f / a): the same speech from a shorter or
# longer vocal tract, i.e. another voice), time untouched (speed perturbation, which lost,
# also changed the tempo, itself an emotion cue). Per-utterance normalisation removes a
# fixed EQ, not this. name -> w.
VTLP: dict[str, float] = {}


def vtlp_run(seed: int, max_change: float) -> str:
    VTLP[name := f"VTLP {max_change}, seed {seed}, float32 machine"] = max_change
    return name


def vtlp(x: torch.Tensor, fp: FeatureParams, max_change: float) -> torch.Tensor:
    """(batch, mels, frames) dB log-Mel, each clip's frequency axis scaled by its own random
    factor in [1 - max_change, 1 + max_change] (torch's global RNG, seeded by fit)."""
    return warp_frequency(x, fp, 1 + (torch.rand(len(x), dtype=torch.float64) * 2 - 1) * max_change)


def warp_frequency(x: torch.Tensor, fp: FeatureParams, factors: torch.Tensor) -> torch.Tensor:
    """(batch, mels, frames) dB log-Mel with clip i's frequency axis scaled by factors[i] on
    the Hz scale (band centres resampled linearly); bands from below fmin or above fmax
    repeat the edge band."""
    n_mels = x.shape[1]
    mel_lo, mel_hi = hz_to_mel(np.array([fp.fmin, fp.fmax], dtype=np.float64))
    step = (mel_hi - mel_lo) / (n_mels + 1)  # band i's centre: mel_lo + (i + 1) * step
    centre_hz = mel_to_hz(mel_lo + step * np.arange(1, n_mels + 1))
    source = (hz_to_mel(centre_hz[None, :] / factors.numpy()[:, None]) - mel_lo) / step - 1
    source = torch.from_numpy(np.clip(source, 0, n_mels - 1)).float()  # (batch, mels) band index
    low = source.floor().long().clamp(max=n_mels - 2)
    weight = (source - low)[:, :, None]
    index = low[:, :, None].expand(-1, -1, x.shape[2])
    return x.gather(1, index) * (1 - weight) + x.gather(1, index + 1) * weight


def use_vtlp(fp: FeatureParams, max_change: float) -> None:
    """Make the train stage's augmentation warp every batch first (this process only)."""
    class VtlpAugment(train_stage.Augment):
        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            return super().__call__(vtlp(x, fp, max_change))
    train_stage.Augment = VtlpAugment


def keep_model(path: Path) -> None:
    """Make the cv stage save the model it scores next to `path` (its state dict), so that
    test-time changes can be scored later without training again (this process only)."""
    def infer_and_keep(model: torch.nn.Module, *args, **kwargs) -> torch.Tensor:
        torch.save(model.state_dict(), path)
        return infer(model, *args, **kwargs)
    cv_stage.infer = infer_and_keep


# ABLATIONS change the current default. The "best_val" runs were measured while the default
# chose its checkpoint on the val actors (train.selection best_val, until refit won here);
# they pin it so that their rows stay reproducible.
CV_ABLATIONS = {
    **ABLATIONS,
    BEST_VAL: {"selection": "best_val"},
    "best_val, mixup 0.2": {"selection": "best_val", "mixup_alpha": 0.2},
    SPEAKER_NORM: {"selection": "best_val", "arch.utterance_norm": False},
    "best_val, seed 43": {"selection": "best_val", "seed": 43},
    "best_val, seed 44": {"selection": "best_val", "seed": 44},
    "weights averaged over the last 25 epochs": {"average_epochs": 25},
    "weights averaged over the last 50 epochs": {"average_epochs": 50},
    "distilled from 2 teachers (seeds 43, 44), weight 0.5": {"distill_seeds": 2},
    "distilled from 1 teacher (seed 43), weight 0.5": {"distill_seeds": 1},
    "no distillation": {"distill_seeds": 0},
    # Single models on the machine of the committed cv stage (2 threads, as the stage runs);
    # seed 42's folds are the cv stage of cd9c856 (the default was that one model then)
    "seed 42, current machine": {"seed": 42},
    "seed 43, current machine": {"seed": 43},
    "seed 44, current machine": {"seed": 44},
    "speed perturbation 0.1, current machine": {"augment.speed": 0.1},
    "two SpecAugment masks per axis, current machine": {"augment.n_freq_masks": 2, "augment.n_time_masks": 2},
    # The arch comparison on the folds: the default recipe (refit, 100 epochs), one model
    # (seed 42) per fold, only train.arch changed. Measured on a machine whose features
    # stage wrote other bytes than the committed run's (other floats: a new seed-42 row).
    **{arch_run(arch): {"arch": arch} for arch in ARCHS},
    # A CPU without bfloat16 units (AMD EPYC family 25 model 1, AVX2 only): the default trains
    # in float32 there, and its features stage wrote other bytes again; its own seed-42 baseline.
    **{float32_run(seed): {"seed": seed} for seed in (42, 43, 44)},
    **{float32_run(seed, "meanstd"): {"arch.pooling": "meanstd", "seed": seed} for seed in (42, 43, 44)},
    **{mel128_run(seed): {**MEL128_HOP512_CHANGE, "seed": seed} for seed in (42, 43, 44)},
    # regularisation against the 16 training voices (augmented train batches 96-97%, unseen actors ~68%): compare
    # with the statistics-pooling seed runs above (the default recipe since 2026-12-01)
    "block dropout 0.1, seed 42, float32 machine": {"arch.block_dropout": 0.1, "seed": 42},
    "head dropout 0.5, seed 42, float32 machine": {"arch.head_dropout": 0.5, "seed": 42},
    "head dropout 0.1, seed 42, float32 machine": {"arch.head_dropout": 0.1, "seed": 42},
    **{vtlp_run(seed, w): {"seed": seed} for seed in (42, 43, 44) for w in (0.1, 0.2)},
}
# Seed ensembles: one recipe trained with several seeds, probabilities averaged.
SEED_RUNS = {"best_val, seeds 42+43 averaged": [BEST_VAL, "best_val, seed 43"],
             "best_val, seeds 42-44 averaged": [BEST_VAL, "best_val, seed 43", "best_val, seed 44"],
             # (the previous machine's "default (refit), seeds 42+43 averaged" row stays as committed:
             # its seed-42 member was that time's cv stage, whose predictions are not kept)
             "default (refit), seeds 42+43 averaged, current machine":
                 ["seed 42, current machine", "seed 43, current machine"],
             "default (refit), seeds 42-44 averaged, current machine":
                 ["seed 42, current machine", "seed 43, current machine", "seed 44, current machine"],
             # the default's seed ensemble against the same with statistics pooling (float32 machine)
             **{f"{label}, seeds {seeds} averaged, float32 machine": [float32_run(s, pooling) for s in members]
                for label, pooling in (("default (refit)", "meanmax"), ("statistics pooling", "meanstd"))
                for seeds, members in (("42+43", (42, 43)), ("42-44", (42, 43, 44)))},
             **{f"VTLP 0.1, seeds {seeds} averaged, float32 machine": [vtlp_run(s, 0.1) for s in members]
                for seeds, members in (("42+43", (42, 43)), ("42-44", (42, 43, 44)))}}


def slug(name: str) -> str:
    return name.replace(" ", "_").replace("/", "_")


def speaker_normalise(array: np.ndarray, actors: np.ndarray) -> None:
    """In place: each mel bin of each actor's clips to zero mean and unit variance over
    that actor's clips (no labels used). Frames of pure padding (at the array's floor)
    are left out of the statistics. The utterance's level and spectral slope relative to
    its speaker survive, which per-utterance normalisation and peak-referenced dB remove."""
    floor = array.min()
    for actor in np.unique(actors):
        rows = np.flatnonzero(actors == actor)
        clips = array[rows]  # (clips, mels, frames)
        active = clips.max(axis=1) > floor  # (clips, frames)
        frames = clips.transpose(1, 0, 2)[:, active]  # (mels, active frames)
        mean, std = frames.mean(axis=1), frames.std(axis=1)
        array[rows] = (clips - mean[None, :, None]) / np.maximum(std, 1e-3)[None, :, None]


def feature_variant(name: str, params: dict) -> str:
    """The features directory for ablation `name`: the features stage's, or a variant built
    once under data/experiments/features/ with the features stage's own code."""
    if name not in FEATURE_VARIANTS:
        return params["cv"]["features_dir"]
    change = dict(FEATURE_VARIANTS[name])
    speaker_norm = change.pop("speaker_norm", False)
    out = RESULTS / "features" / slug(change.pop("dir", name))  # "dir": shared by several ablations
    if not out.exists():
        partial = out.with_name(out.name + ".partial")  # renamed only when complete
        shutil.rmtree(partial, ignore_errors=True)
        fp = FeatureParams.from_dict({**params["features"], **change})
        clips = pd.read_parquet(params["cv"]["metadata"])
        feature_store.build(clips["path"].tolist(), fp, partial, params["features"]["n_jobs"])
        if speaker_norm:
            array = np.load(partial / feature_store.ARRAY_NAME, mmap_mode="r+")
            speaker_normalise(array, clips["actor"].to_numpy())
            array.flush()
            del array
        partial.rename(out)
    return str(out)


def ablation_setup(name: str) -> tuple[dict, dict, list[list[int]], list[str], int, torch.device]:
    """(params, recipe, folds, classes, n_mels, device) of ablation `name`: one model per
    fold, its features directory in params["cv"]."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    recipe = apply({**params["train"], "ensemble_seeds": 1}, CV_ABLATIONS[name])
    params["cv"]["features_dir"] = feature_variant(name, params)
    return (params, recipe, *fold_setup(params["cv"], recipe))


def run(name: str, folds_wanted: list[int]) -> None:
    params, recipe, folds, classes, n_mels, device = ablation_setup(name)
    if name in VTLP:
        use_vtlp(feature_store.load(params["cv"]["features_dir"])[2], VTLP[name])
    for k in folds_wanted or range(1, len(folds) + 1):
        out = CV_RESULTS / slug(name) / f"fold{k}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        keep_model(out.with_suffix(".pt"))
        row, predictions = run_fold(params["cv"], recipe, folds, k - 1, classes, n_mels, device)
        row.update(name=name, threads=torch.get_num_threads(), epochs=recipe["epochs"])
        predictions.to_csv(out.with_suffix(".csv"), index=False)
        out.write_text(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


# Test-time warps: each test clip scored at these frequency-axis factors, probabilities averaged.
TTA_WARPS = {"none": [1.0], "3 warps +/-5%": [0.95, 1.0, 1.05], "5 warps +/-10%": [0.9, 0.95, 1.0, 1.05, 1.1]}


def tta(name: str) -> None:
    """Score the kept fold models of ablation `name` with each set of TTA_WARPS (no training)."""
    params, recipe, folds, classes, n_mels, device = ablation_setup(name)
    fp = feature_store.load(params["cv"]["features_dir"])[2]
    rows = []
    for k in range(1, len(folds) + 1):
        path = CV_RESULTS / slug(name) / f"fold{k}.pt"
        if not path.exists():  # trained before models were kept
            print(f"{name}: fold {k} has no kept model")
            continue
        model = build_model(train_stage.arch_config(recipe), n_mels, len(classes))
        model.load_state_dict(torch.load(path, weights_only=True))
        x, y, _ = cv_stage.load_clips(params["cv"]["features_dir"], params["cv"]["metadata"], classes,
                                      actors=cv_stage.fold_actors(recipe, folds, k - 1)[2])
        for warps, factors in TTA_WARPS.items():
            probs = sum(infer(model, warp_frequency(x, fp, torch.full((len(x),), a, dtype=torch.float64)),
                              recipe["batch_size"], device).softmax(dim=1) for a in factors) / len(factors)
            scores = scores_from_confusion(confusion_matrix(y.numpy(), probs.argmax(1).numpy(), len(classes)), classes)
            rows.append({"fold": k, "warps": warps, "accuracy": round(scores["accuracy"], 5),
                         "uar": round(scores["uar"], 5)})
    frame = pd.DataFrame(rows)
    print(frame.pivot(index="fold", columns="warps", values="accuracy").to_string())
    print(frame.groupby("warps")[["accuracy", "uar"]].mean().round(4).to_string())
    frame.to_csv(CV_RESULTS / slug(name) / "tta.csv", index=False)


def seed_ensemble(name: str, members: list[pd.DataFrame], member_tables: list[pd.DataFrame]) -> pd.DataFrame:
    """Per-fold scores of the members' probabilities averaged clip by clip; its training
    time is the members' sum."""
    members = [m.sort_values("path").reset_index(drop=True) for m in members]
    first = members[0]
    if any(not m["path"].equals(first["path"]) or not m["fold"].equals(first["fold"]) for m in members):
        raise ValueError(f"{name}: the runs did not test the same clips in the same folds")
    classes = [c.removeprefix("prob_") for c in first.filter(like="prob_").columns]
    probs = sum(m.filter(like="prob_").to_numpy() for m in members) / len(members)
    actual = first["actual"].map(classes.index).to_numpy()
    rows = []
    for fold, idx in first.groupby("fold").indices.items():
        scores = scores_from_confusion(confusion_matrix(actual[idx], probs[idx].argmax(1), len(classes)), classes)
        rows.append({"fold": fold, "test_accuracy": round(scores["accuracy"], 5), "test_uar": round(scores["uar"], 5),
                     "test_macro_f1": round(scores["macro_f1"], 5), "name": name,
                     "train_minutes": sum(float(t.loc[t["fold"] == fold, "train_minutes"].iloc[0]) for t in member_tables)})
    return pd.DataFrame(rows)


def table() -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    n_folds = len(fold_setup(params["cv"], params["train"])[0])
    rows = [pd.read_csv(ROOT / params["cv"]["table"]).assign(name=COMMITTED)]
    committed_predictions = ROOT / params["cv"]["predictions"]
    predictions = {COMMITTED: pd.read_csv(committed_predictions)} if committed_predictions.exists() else {}
    for folder in sorted(CV_RESULTS.glob("*")):
        runs = pd.DataFrame([json.loads(f.read_text()) for f in sorted(folder.glob("fold*.json"))])
        if len(runs) == n_folds:
            rows.append(runs.sort_values("fold"))
            if len(list(folder.glob("fold*.csv"))) == n_folds:
                predictions[runs["name"].iloc[0]] = pd.concat(pd.read_csv(f) for f in sorted(folder.glob("fold*.csv")))
        else:
            print(f"{folder.name}: {len(runs)} of {n_folds} folds done; not in the table")
    tables = {runs["name"].iloc[0]: runs for runs in rows}
    for name, members in SEED_RUNS.items():
        if all(m in predictions for m in members):
            rows.append(seed_ensemble(name, [predictions[m] for m in members], [tables[m] for m in members]))
    out = []
    for runs in rows:
        s = summarise(runs, params["cv"]["fold_size"], [])
        out.append({"name": runs["name"].iloc[0],
                    **{f"{m}_{stat}": s[f"test_{m}_{stat}"] for m in ("accuracy", "uar", "macro_f1")
                       for stat in ("mean", "std")},
                    "fold_accuracies": " ".join(f"{a:.3f}" for a in runs["test_accuracy"]),
                    "train_minutes": s["train_minutes_total"]})
    frame = write_table(pd.DataFrame(out), TABLE)
    print(f"{TABLE.relative_to(ROOT)}:\n{frame.to_string(index=False)}")
    arch_table(params, frame, tables)


def arch_table(params: dict, ablations: pd.DataFrame, tables: dict[str, pd.DataFrame]) -> None:
    """reports/arch_comparison_folds.csv: each arch's fold scores (one model per fold, seed
    42, the default recipe) with its parameter count and mean training minutes per fold."""
    _, classes, n_mels, _ = fold_setup(params["cv"], params["train"])
    by_name = ablations.set_index("name")
    rows = []
    for arch in ARCHS:
        name = arch_run(arch)
        if name not in tables:
            continue
        scores, runs = by_name.loc[name], tables[name]
        model = build_model(params["train"]["archs"][arch], n_mels, len(classes))
        rows.append({"name": arch, "parameters": count_parameters(model),
                     **{c: scores[c] for c in ("accuracy_mean", "accuracy_std", "uar_mean", "uar_std",
                                               "macro_f1_mean", "macro_f1_std", "fold_accuracies")},
                     "train_minutes_per_fold": round(float(runs["train_minutes"].mean()), 2),
                     "threads": int(runs["threads"].iloc[0]), "epochs": int(runs["epochs"].iloc[0])})
    if rows:
        frame = write_table(pd.DataFrame(rows), ARCH_TABLE, ARCHS)
        print(f"{ARCH_TABLE.relative_to(ROOT)}:\n{frame.to_string(index=False)}")


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "run" and sys.argv[2] in CV_ABLATIONS:
        torch.set_num_threads(int(os.environ.get("THREADS", torch.get_num_threads())))
        return run(sys.argv[2], [int(k) for k in sys.argv[3:]])
    if len(sys.argv) == 3 and sys.argv[1] == "tta" and sys.argv[2] in CV_ABLATIONS:
        return tta(sys.argv[2])
    if sys.argv[1:] == ["table"]:
        return table()
    sys.exit(__doc__ + f"\nablations: {', '.join(CV_ABLATIONS)}")


if __name__ == "__main__":
    main()
