"""Labelling and feature extraction on a Dask cluster (`ser label --cluster tcp://host:8786`).

The cluster runs the same code as the local run: files are cut into shards, each worker
loads the model once (its bytes are sent to every worker, so workers need the audio at the
same paths but not the model file) and labels a shard with ser.labeller.label_rows, one
process decoding and inferring; the rows come back and are put in path order, so the output
has the local run's columns, error rows and order. A speaker group is never split between
shards, so speaker statistics are those of the local run.

A worker that dies mid-shard loses nothing: the scheduler runs its shard again on another
worker (Dask's `distributed.scheduler.allowed-failures`, 3 by default, before it gives up),
and each shard's rows are taken once, from its one result, so none is lost or doubled.
"""
from __future__ import annotations

import hashlib
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from ser.audio import FeatureParams, LogMel, Settings
from ser.util import UserError

if TYPE_CHECKING:
    from distributed import Client

    from ser.labeller import Table

FILES_PER_SHARD = 64  # 0.2 s of one core's work for 3.7-s clips; the cluster path costs 0.4 ms a file
CONNECT_TIMEOUT_S = 30
_models: dict[str, tuple[Any, dict[str, Any], Any]] = {}  # on a worker: model digest -> (model, meta, device)
_tuning: Any = None  # on a worker: its BLAS thread limit, held


def connect(address: str) -> "Client":
    """A client of the scheduler at `address` (tcp://host:port), or a clear error."""
    from distributed import Client

    try:
        return Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except (OSError, TimeoutError) as e:
        raise UserError(f"--cluster {address}: no Dask scheduler answers there ({e})") from None


def shards_of(paths: list[Path], groups: list[str] | None, files_per_shard: int = FILES_PER_SHARD
              ) -> list[list[int]]:
    """Indices of `paths` cut into shards of about files_per_shard, in path order; with
    speaker `groups`, each group whole in one shard (a group bigger than a shard is one)."""
    if groups is None:
        return [list(range(i, min(i + files_per_shard, len(paths)))) for i in range(0, len(paths), files_per_shard)]
    members: dict[str, list[int]] = {}
    for i, key in enumerate(groups):
        members.setdefault(key, []).append(i)
    shards: list[list[int]] = [[]]
    for indices in members.values():
        if shards[-1] and len(shards[-1]) + len(indices) > files_per_shard:
            shards.append([])
        shards[-1].extend(indices)
    return [s for s in shards if s]


def _worker_model(model_bytes: bytes, digest: str, device_name: str, fuse: bool = True
                  ) -> tuple[Any, dict[str, Any], Any]:
    """The model, loaded once per worker process (kept by its digest); fuse: False keeps it
    trainable, to adapt to each speaker group (Settings.adapt)."""
    digest = f"{digest} {'fused' if fuse else 'trainable'}"
    if digest not in _models:
        import tempfile

        import torch

        from ser.labeller import one_core_worker
        from ser.models import load_checkpoint
        from ser.util import pick_device

        # One thread a worker, as the local labeller's feature workers: and glibc's heap kept,
        # which Dask's workers otherwise trim at 64 kB (MALLOC_TRIM_THRESHOLD_): 2x slower, measured.
        global _tuning
        _tuning = one_core_worker()
        torch.set_num_threads(1)
        device = pick_device(device_name)
        with tempfile.NamedTemporaryFile(suffix=".pt") as f:
            f.write(model_bytes)
            f.flush()
            model, meta = load_checkpoint(f.name, device, fuse=fuse)
        _models.clear()
        _models[digest] = (model, meta, device)
    return _models[digest]


def label_shard(paths: list[str], groups: list[str] | None, model_bytes: bytes, digest: str,
                settings: Settings, speakers: str, device_name: str) -> tuple[list[dict], list[dict]]:
    """On a worker: label_rows of one shard in this process (file rows, window rows)."""
    import dataclasses

    from ser.labeller import label_rows

    model, meta, device = _worker_model(model_bytes, digest, device_name, fuse=not (settings.adapt and groups))
    serial = dataclasses.replace(settings, n_jobs=1)  # the worker is the parallelism
    files, segments = label_rows([Path(p) for p in paths], model, meta, serial, device, None, speakers,
                                 groups=groups)
    return files.rows, segments.rows


def label_on_cluster(client: "Client", paths: list[Path], model_path: str | Path, classes: list[str],
                     settings: Settings, speakers: str = "none", groups: list[str] | None = None,
                     device_name: str = "auto", files_per_shard: int = FILES_PER_SHARD,
                     on_shard: Callable[[int, int], None] | None = None) -> tuple["Table", "Table"]:
    """label_rows of `paths` on the cluster: (file rows, window rows), in path order.
    on_shard(done, total) is called as each shard's rows arrive."""
    from distributed import as_completed

    from ser.labeller import file_table, segment_table

    model_bytes = Path(model_path).read_bytes()
    digest = hashlib.sha256(model_bytes).hexdigest()
    [model_future] = client.scatter([model_bytes], broadcast=True, hash=False)
    shards = shards_of(paths, groups, files_per_shard)
    futures = {client.submit(label_shard, [str(paths[i]) for i in shard],
                             None if groups is None else [groups[i] for i in shard], model_future, digest,
                             settings, speakers, device_name, pure=False): n for n, shard in enumerate(shards)}
    results: list[tuple[list[dict], list[dict]] | None] = [None] * len(shards)
    try:
        for done, future in enumerate(as_completed(list(futures), loop=client.loop), start=1):
            results[futures[future]] = future.result()
            if on_shard is not None:
                on_shard(done, len(shards))
    finally:
        client.cancel(list(futures) + [model_future])
    order = {str(p): i for i, p in enumerate(paths)}
    rows = sorted((r for files, _ in results for r in files), key=lambda r: order[r["path"]])
    segments = sorted((r for _, segs in results for r in segs), key=lambda r: order[r["path"]])  # stable
    if len(rows) != len(paths):
        raise RuntimeError(f"the cluster returned {len(rows)} rows for {len(paths)} files")
    return file_table(classes, rows), segment_table(classes, segments)


def compute_on_cluster(client: "Client", paths: list[str], fp: FeatureParams, clips_per_task: int,
                       tasks_ahead: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(log-Mel, functionals) of `paths`, in order, computed by the cluster's workers (LogMel.clip_features,
    the local run's code, so the same bytes). At most `tasks_ahead` tasks (default: two per
    worker thread) are submitted and not yet read, so the workers never hold more than those
    tasks' features, however many clips there are."""
    extractor = LogMel(fp)
    chunks = iter([paths[i : i + clips_per_task] for i in range(0, len(paths), clips_per_task)])
    ahead = tasks_ahead or max(2, 2 * sum(client.nthreads().values()))
    pending: deque = deque()

    def submit_next() -> None:
        chunk = next(chunks, None)
        if chunk is not None:
            pending.append(client.submit(_features_of, extractor, chunk, pure=False))

    for _ in range(ahead):
        submit_next()
    try:
        while pending:  # in order; the next tasks are computed meanwhile
            future = pending.popleft()
            submit_next()
            yield from future.result()
            future.release()
    finally:
        client.cancel(list(pending))


def _features_of(extractor: LogMel, paths: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [extractor.clip_features(p) for p in paths]
