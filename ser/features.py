"""The feature store: the log-Mel of every clip, computed in parallel with joblib.

A feature directory holds one memory-mappable array `logmel.npy` (clips x n_mels x frames,
float32) whose rows follow the metadata's row order, an index of the paths, and the feature
params used, so training can store them in the model and labelling can recompute the same
features."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from tqdm import tqdm

from ser.audio import AudioError, FeatureParams, LogMel
from ser.util import UserError, atomic_path, write_json

ARRAY_NAME, INDEX_NAME, PARAMS_NAME = "logmel.npy", "index.parquet", "feature_params.json"
# Clips per task sent to a worker: a task of ~0.2 s amortises the inter-process overhead
# that dominated with joblib's automatic batching of a generator.
CLIPS_PER_TASK = 32


def compute_parallel(paths: list[str], fp: FeatureParams, n_jobs: int,
                     desc: str = "features") -> Iterator[np.ndarray]:
    """Features for `paths`, in order, computed by n_jobs worker processes."""
    extractor = LogMel(fp)
    jobs: Iterable = (delayed(extractor.from_file)(path) for path in paths)
    results = Parallel(n_jobs=n_jobs, return_as="generator", batch_size=CLIPS_PER_TASK)(jobs)
    yield from tqdm(results, total=len(paths), desc=desc, unit="clip")


def build(paths: list[str], fp: FeatureParams, out_dir: Path, n_jobs: int) -> float:
    """Write the feature directory for `paths`; return clips per second."""
    start = time.perf_counter()
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        array = np.lib.format.open_memmap(
            tmp / ARRAY_NAME, mode="w+", dtype=np.float32,
            shape=(len(paths), fp.n_mels, fp.n_frames),
        )
        try:
            for i, feature in enumerate(compute_parallel(paths, fp, n_jobs)):
                array[i] = feature
        except AudioError as e:
            raise UserError(str(e)) from None
        array.flush()
        del array
        pd.DataFrame({"path": paths}).to_parquet(tmp / INDEX_NAME, index=False)
        write_json(tmp / PARAMS_NAME, fp.to_dict())
    return len(paths) / (time.perf_counter() - start)


def load(features_dir: str | Path) -> tuple[np.ndarray, pd.DataFrame, FeatureParams]:
    """Open a feature directory: (memory-mapped array, index, feature params)."""
    import json

    features_dir = Path(features_dir)
    array = np.load(features_dir / ARRAY_NAME, mmap_mode="r")
    index = pd.read_parquet(features_dir / INDEX_NAME)
    fp = FeatureParams.from_dict(json.loads((features_dir / PARAMS_NAME).read_text()))
    return array, index, fp
