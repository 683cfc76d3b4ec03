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

from ser.labeller.cli import EXIT_SOME_FAILED, exit_now, run_safely
from ser.labeller.settings import Settings
from ser.util import UserError

RUN_OPTIONS = ("device", "speakers", "cluster", "cluster_certs")  # the rest of the section: Settings

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("model", "input", "out", "segments"):
        parser.add_argument(f"--{name}", required=True)
    args = parser.parse_args()
    p = yaml.safe_load(Path("params.yaml").read_text())["predict"]
    try:
        settings = Settings.from_dict({k: v for k, v in p.items() if k not in RUN_OPTIONS})
    except UserError as e:
        print(f"error: params.yaml predict: {e}", file=sys.stderr)
        return 2
    code = run_safely([args.input], args.out, args.model, settings, p["device"], args.segments,
                      speakers=p["speakers"], cluster=p["cluster"], cluster_certs=p.get("cluster_certs"))
    # files that cannot be labelled are rows of the output, not a failed stage
    return 0 if code == EXIT_SOME_FAILED else code


if __name__ == "__main__":
    sys.stdout.flush()
    exit_now(main())
