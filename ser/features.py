"""The feature store: the log-Mel and the functionals of every clip, computed in parallel with joblib.

A feature directory holds one memory-mappable array `logmel.npy` (clips x n_mels x frames,
float32) and one `functionals.npy` (clips x ser.prosody.n_functionals, plus ser.encoder.n_values with an
encoder, float32) whose rows follow the metadata's row order, an index of the paths, and the feature params used, so
training can store them in the model and labelling can recompute the same features."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from tqdm import tqdm

from ser.audio import AudioError, FeatureParams, LogMel
from ser import encoder
from ser.prosody import n_functionals
from ser.util import UserError, atomic_path, write_json

ARRAY_NAME, INDEX_NAME, PARAMS_NAME = "logmel.npy", "index.parquet", "feature_params.json"
FUNCTIONALS_NAME = "functionals.npy"
# Clips per task sent to a worker: a task of ~0.2 s amortises the inter-process overhead
# that dominated with joblib's automatic batching of a generator.
CLIPS_PER_TASK = 32


def compute_parallel(paths: list[str], fp: FeatureParams, n_jobs: int, desc: str = "features",
                     encoder_device: str | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(log-Mel, functionals) of `paths`, in order, computed by n_jobs worker processes;
    encoder_device (a GPU): the encoder runs there on batches of the workers' clips, in float32."""
    if encoder_device is None or fp.encoder is None:
        extractor = LogMel(fp)
        jobs: Iterable = (delayed(extractor.clip_features)(path) for path in paths)
        results = Parallel(n_jobs=n_jobs, return_as="generator", batch_size=CLIPS_PER_TASK)(jobs)
        yield from tqdm(results, total=len(paths), desc=desc, unit="clip")
        return
    extractor = LogMel(fp, encoder_device=encoder_device)
    jobs = (delayed(extractor.clip_features_deferred)(path) for path in paths)
    parts = Parallel(n_jobs=n_jobs, return_as="generator", batch_size=CLIPS_PER_TASK)(jobs)
    items = (((logmel, described), [mel]) for logmel, described, mel in parts)
    for (logmel, described), summary in tqdm(encoder.run_deferred(items, fp.encoder, encoder_device, "float32", fp.encoder_layers),
                                             total=len(paths), desc=desc, unit="clip"):
        yield logmel, np.concatenate([described, summary[0]])


# what computes the features of a list of paths, in order: compute_parallel, or a cluster's
# (ser.cluster.cluster_features: the same code, the same bytes)
Compute = Callable[[list[str]], Iterator[tuple[np.ndarray, np.ndarray]]]


def feature_code() -> tuple:
    """The modules whose code decides a clip's features."""
    from ser import audio, device, dsp, prosody

    return audio, prosody, encoder, dsp, device


def cache_key(fp: FeatureParams, encoder_device: str | None = None) -> str:
    """Names the per-clip cache of the code that computes features (feature_code(); the
    encoder's weights are pinned by hash) and of these feature params, `<code>-<params>`: a
    change to either starts a new cache, never reuses stale features. The encoder on a GPU
    rounds differently from the CPU: its features are kept apart (`-cuda`)."""
    import hashlib
    import json

    code = hashlib.sha256(b"".join(Path(module.__file__).read_bytes() for module in feature_code()))
    params = hashlib.sha256(json.dumps(fp.to_dict(), sort_keys=True).encode())
    where = "" if encoder_device is None or fp.encoder is None else "-" + encoder_device.split(":")[0]
    return f"{code.hexdigest()[:12]}-{params.hexdigest()[:12]}{where}"


def prune_cache(cache_dir: Path, key: str) -> list[Path]:
    """Delete the per-clip caches in cache_dir that other code computed (keys of this code with
    other params stay: switching params back reuses them); also those of the older one-digest
    naming. Returns what was deleted. Anything else in cache_dir is left alone."""
    import re
    import shutil

    code = key.split("-")[0]
    stale = [d for d in Path(cache_dir).iterdir() if d.is_dir() and not d.name.startswith(f"{code}-")
             and re.fullmatch(r"[0-9a-f]{12}-[0-9a-f]{12}(-[a-z]+)?|[0-9a-f]{16}", d.name)]
    for d in stale:
        shutil.rmtree(d)
    return stale


def _file_md5(path: str) -> str:
    import hashlib

    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def build(paths: list[str], fp: FeatureParams, out_dir: Path, n_jobs: int,
          cache_dir: Path | None = None, compute: Compute | None = None, encoder_device: str | None = None
          ) -> tuple[float, int]:
    """Write the feature directory for `paths`; return (clips per second, clips computed).
    `compute`: what computes the clips not cached (default: compute_parallel on n_jobs
    processes, the encoder on encoder_device if given; a cluster's: ser.cluster.cluster_features). With cache_dir, each clip's
    features are kept there under its audio's md5, so a clip
    already computed with the same params and code (another corpus mix, a rerun) is read,
    not recomputed; the caches of older code are then deleted (prune_cache)."""
    start = time.perf_counter()
    store = None if cache_dir is None else Path(cache_dir) / cache_key(fp, encoder_device)
    digests = [_file_md5(p) for p in paths] if store is not None else [None] * len(paths)
    missing = [i for i, d in enumerate(digests) if d is None or not (store / f"{d}.npz").is_file()]
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        array = np.lib.format.open_memmap(
            tmp / ARRAY_NAME, mode="w+", dtype=np.float32,
            shape=(len(paths), fp.n_mels, fp.n_frames),
        )
        functionals = np.zeros((len(paths), n_functionals(fp.n_mels) + encoder.n_values(fp.encoder)), dtype=np.float32)
        for i in sorted(set(range(len(paths))) - set(missing)):
            with np.load(store / f"{digests[i]}.npz") as cached:
                array[i], functionals[i] = cached["logmel"], cached["functionals"]
        try:
            todo = [paths[i] for i in missing]
            computed = (compute_parallel(todo, fp, n_jobs, encoder_device=encoder_device) if compute is None
                        else compute(todo))
            for i, (logmel, described) in zip(missing, computed):
                array[i], functionals[i] = logmel, described
                if store is not None:
                    store.mkdir(parents=True, exist_ok=True)
                    with atomic_path(store / f"{digests[i]}.npz") as cached:
                        with open(cached, "wb") as f:
                            np.savez(f, logmel=logmel, functionals=described)
        except AudioError as e:
            raise UserError(str(e)) from None
        array.flush()
        del array
        np.save(tmp / FUNCTIONALS_NAME, functionals)
        pd.DataFrame({"path": paths}).to_parquet(tmp / INDEX_NAME, index=False)
        write_json(tmp / PARAMS_NAME, fp.to_dict())
    if store is not None:  # features of code that has changed can never be read again
        prune_cache(Path(cache_dir), store.name)
    return len(paths) / (time.perf_counter() - start), len(missing)


def load(features_dir: str | Path) -> tuple[np.ndarray, pd.DataFrame, FeatureParams]:
    """Open a feature directory: (memory-mapped array, index, feature params)."""
    import json

    features_dir = Path(features_dir)
    array = np.load(features_dir / ARRAY_NAME, mmap_mode="r")
    index = pd.read_parquet(features_dir / INDEX_NAME)
    fp = FeatureParams.from_dict(json.loads((features_dir / PARAMS_NAME).read_text()))
    return array, index, fp


def load_functionals(features_dir: str | Path, paths: "pd.Series | list[str]", encoder: bool = True) -> np.ndarray:
    """The functionals (rows, ser.prosody's and any encoder's) of the clips at `paths`, in their order;
    encoder False: ser.prosody's alone (what a model without the encoder hears)."""
    import json

    features_dir = Path(features_dir)
    if not (features_dir / FUNCTIONALS_NAME).is_file():
        raise UserError(f"{features_dir} has no {FUNCTIONALS_NAME}; rerun the features stage")
    row_of = {p: i for i, p in enumerate(pd.read_parquet(features_dir / INDEX_NAME)["path"])}
    missing = [p for p in paths if p not in row_of]
    if missing:
        raise UserError(f"{features_dir} has no features of {missing[0]}; rerun the features stage")
    rows = np.load(features_dir / FUNCTIONALS_NAME, mmap_mode="r")[[row_of[p] for p in paths]]
    return rows if encoder else rows[:, : n_functionals(json.loads((features_dir / PARAMS_NAME).read_text())["n_mels"])]
