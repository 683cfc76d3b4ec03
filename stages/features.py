"""Stage features: the log-Mel spectrogram of every clip, in parallel (joblib).

    python stages/features.py --metadata data/metadata.parquet --out data/features \
        --cache data/feature_cache    (params: features)

Clips already computed with the same params and code are read from the cache, so adding a
corpus computes only its clips.
"""
from __future__ import annotations

import argparse
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
import yaml

from ser.audio import FeatureParams
from ser.cluster import cluster_features, connect
from ser.device import chosen_device
from ser.features import build
from ser.util import run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--metadata", required=True, help="clips table; features follow its row order")
    parser.add_argument("--out", required=True, help="feature directory")
    parser.add_argument("--cache", help="per-clip cache kept between runs (keyed by audio md5, params, code)")
    args = parser.parse_args()
    p = yaml.safe_load(Path("params.yaml").read_text())["features"]
    fp = FeatureParams.from_dict(p)
    clips = pd.read_parquet(args.metadata)
    with connect(p["cluster"], p.get("cluster_certs")) if p["cluster"] else nullcontext() as client:
        compute = None if client is None else cluster_features(client, fp)  # on the workers: the same bytes
        device = chosen_device(p["device"])  # a GPU runs the encoder for the CPU workers
        rate, computed = build(clips["path"].tolist(), fp, Path(args.out), p["n_jobs"],
                               args.cache and Path(args.cache), compute, None if device == "cpu" else device)
    print(f"features: {len(clips)} clips -> {args.out} ({computed} computed, {len(clips) - computed} from the cache; "
          f"{fp.n_mels} mels x {fp.n_frames} frames, {rate:.0f} clips/s)")


if __name__ == "__main__":
    run_stage(main)
