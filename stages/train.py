"""Stage train: the CNN (a seed ensemble) on every clip of the training actors.

    python stages/train.py --features data/features --metadata data/metadata.parquet \
        --model data/model/model.pt --history reports/train_history.csv --metrics metrics/train.json

No checkpoint is chosen: the last epoch of the schedule is kept, and the test actors are
never loaded. params: train (the recipe), confidence (the unseen-corpus temperature the model carries);
--overlay fast: params fast's recipe over train's, and its own temperature (the fast model, fast/dvc.yaml).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import yaml

from ser import ddp
from ser.features import load
from ser.models import count_parameters, save_checkpoint
from ser.training import model_arch, model_feature_params, train
from ser.device import pick_device
from ser.util import atomic_path, run_stage, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("features", "metadata", "model", "history", "metrics"):  # read, read, then written
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--overlay", help="params section: its recipe over train's, its temperature")
    args = parser.parse_args()
    params = yaml.safe_load(Path("params.yaml").read_text())
    section = params[args.overlay] if args.overlay else {"recipe": {}, **params["confidence"]}
    recipe = {**params["train"], **section["recipe"]}
    device = ddp.start(pick_device(recipe["device"]))  # under torchrun: one process of several (ser.ddp)
    model, history, record = train(recipe, args.features, args.metadata, device)
    record["unseen_temperature"] = section["unseen_temperature"]  # from make loco / make fast (docs/decisions.md)
    if not ddp.is_main():  # the processes hold the same model; rank 0 alone writes it
        ddp.stop()
        return
    fp = model_feature_params(recipe, load(args.features)[2])
    save_checkpoint(args.model, model, model_arch(recipe), record["classes"], fp, extra=record)
    with atomic_path(args.history) as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)
    # temperature: calibrated on the calibration split's speakers (none: not); fusion: none = the CNN alone
    summary = {"members": recipe["ensemble_seeds"], "epochs": recipe["epochs"], "device": device.type,
               "train_clips": record["train_clips"], "train_actors": record["train_actors"],
               "train_minutes": record["train_minutes"], "parameters": count_parameters(model),
               "final_train_accuracy": history[-1]["train_accuracy"], "temperature": record.get("temperature"),
               "calibration": record.get("calibration"), "unseen_temperature": record["unseen_temperature"],
               "fusion": {k: record["fusion"][k] for k in ("fusion_weight", "temperature")} if "fusion" in record else None}
    write_json(args.metrics, summary)
    print(f"train: {summary['members']} model(s), {summary['train_minutes']:.1f} min on {device.type}"
          f"{f' x {ddp.world()[1]} processes' if ddp.world()[1] > 1 else ''} -> {args.model}")
    ddp.stop()


if __name__ == "__main__":
    run_stage(main)
