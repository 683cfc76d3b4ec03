"""Stage predict: label the extracted corpus with the trained model, as `ser label` would
(labels never come from file names).

    python stages/predict.py --model data/model/model.pt --input data/raw \
        --out data/predictions.csv --segments data/prediction_segments.csv    (params: predict)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from ser.audio import Settings
from ser.labeller import EXIT_SOME_FAILED, exit_now, run_safely


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("model", "input", "out", "segments"):
        parser.add_argument(f"--{name}", required=True)
    args = parser.parse_args()
    p = yaml.safe_load(Path("params.yaml").read_text())["predict"]
    settings = Settings(batch_size=p["batch_size"], n_jobs=p["n_jobs"], min_duration_s=p["min_duration_s"],
                        silence_peak=p["silence_peak"], segment_s=p["segment_s"], hop_s=p["hop_s"],
                        max_queued_windows=p["max_queued_windows"], precision=p["precision"],
                        max_duration_s=p["max_duration_s"], min_sample_rate=p["min_sample_rate"],
                        uncertain_below=p["uncertain_below"], adapt=p["adapt"])
    code = run_safely([args.input], args.out, args.model, settings, p["device"], args.segments,
                      speakers=p["speakers"], cluster=p["cluster"], cluster_certs=p.get("cluster_certs"))
    # files that cannot be labelled are rows of the output, not a failed stage
    return 0 if code == EXIT_SOME_FAILED else code


if __name__ == "__main__":
    sys.stdout.flush()
    exit_now(main())
