"""Labelling on a Dask cluster (`ser label --cluster tls://host:8786`; the connection and its
security: ser.cluster).

The cluster runs the same code as the local run, in the same two passes: each worker loads the
model once (its bytes are sent to every worker, so workers need the audio at the same paths but
not the model file). A speaker-normalised model's grouped run first hears each group on the
workers (ser.labeller.loop.hear_groups: the statistics and adaptation of a sample of its files,
the sample the local run draws, a group whole in one task, which labels the sample from the
features it read); then every other file is labelled in shards by label_rows with what was heard,
so a big group (a flat folder is one) is labelled by every worker and each file gets the local
run's label. The rows come back and are put in path order:
the output has the local run's columns, error rows and order.

A worker that dies mid-shard loses nothing: the scheduler runs its shard again on another
worker (Dask's `distributed.scheduler.allowed-failures`, 3 by default, before it gives up),
and each shard's rows are taken once, from its one result, so none is lost or doubled. When
the only worker dies the model's bytes die with it: the shards not done are sent again, with
the model, once a worker is back (RESUBMITS times at most).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from tqdm import tqdm

from ser.labeller.output import Table, file_table, segment_table
from ser.labeller.settings import Settings
from ser.grouping import statistics_sample
from ser.labeller.speakers import adapt_sample_cap, normalised_by
from ser.modelfile import read_model_info
from ser.util import UserError

if TYPE_CHECKING:
    from distributed import Client

    from ser.trained import TrainedModel

FILES_PER_SHARD = 64  # enough work per task that the cluster's overhead per file is small
WORKER_WAIT_S = 120  # how long a run with no worker left waits for one to come (back)
RESUBMITS = 3  # rounds of resending the shards not done after the model's bytes were lost
_models: dict[str, "TrainedModel"] = {}  # on a worker: model digest and device -> the model
_tuning: Any = None  # on a worker: its BLAS thread limit, held


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


def _worker_model(model_bytes: bytes, digest: str, device_name: str) -> "TrainedModel":
    """The model, loaded once per worker process (kept by its digest)."""
    digest = f"{digest} {device_name}"
    if digest not in _models:
        import tempfile

        import torch

        from ser.device import pick_device
        from ser.labeller.workers import one_core_worker
        from ser.trained import TrainedModel

        # One thread a worker, as the local labeller's feature workers: and glibc's heap kept,
        # which Dask's workers otherwise trim at 64 kB (MALLOC_TRIM_THRESHOLD_), much slower.
        global _tuning
        _tuning = one_core_worker()
        torch.set_num_threads(1)
        device = pick_device(device_name)
        with tempfile.NamedTemporaryFile(suffix=".pt") as f:
            f.write(model_bytes)
            f.flush()
            trained = TrainedModel.load(f.name, device)
        _models.clear()
        _models[digest] = trained
    return _models[digest]


def label_shard(paths: list[str], groups: list[str] | None, model_bytes: bytes, digest: str, settings: Settings,
                speakers: str, device_name: str, heard: Any = None) -> tuple[list[dict], list[dict]]:
    """On a worker: label_rows of one shard in this process (file rows, window rows); `heard`:
    the groups' statistics and adaptations from the first pass (hear_shard)."""
    import dataclasses

    from ser.labeller.loop import label_rows

    trained = _worker_model(model_bytes, digest, device_name)
    serial = dataclasses.replace(settings, n_jobs=1)  # the worker is the parallelism
    files, segments = label_rows([Path(p) for p in paths], trained, serial, None, speakers, groups=groups,
                                 heard=heard)
    return files.rows, segments.rows


def hear_shard(paths: list[str], keys: list[str], model_bytes: bytes, digest: str, settings: Settings,
               device_name: str, cap: int, used: str, speakers: str) -> tuple[dict, dict, list[dict], list[dict]]:
    """On a worker: the first pass of some whole groups, their sampled files labelled with what it
    heard (ser.labeller.loop.hear_groups): (statistics, adaptations, file rows, window rows)."""
    import dataclasses

    from ser.labeller.loop import hear_groups

    trained = _worker_model(model_bytes, digest, device_name)
    serial = dataclasses.replace(settings, n_jobs=1)
    statistics, states, files, segments = hear_groups([Path(p) for p in paths], keys, trained, serial, cap, used,
                                                      speakers)
    return statistics, states, files.rows, segments.rows


def label_on_cluster(client: "Client", paths: list[Path], model_path: str | Path, classes: list[str],
                     settings: Settings, speakers: str = "none", groups: list[str] | None = None,
                     device_name: str = "auto", files_per_shard: int = FILES_PER_SHARD,
                     on_shard: Callable[[int, int], None] | None = None) -> tuple["Table", "Table"]:
    """label_rows of `paths` on the cluster: (file rows, window rows), in path order, as the
    local run labels them. on_shard(files labelled, files in all) is called as each shard's rows
    arrive (a grouped run's sampled files come with the first pass)."""
    model_bytes = Path(model_path).read_bytes()
    digest = hashlib.sha256(model_bytes).hexdigest()
    run = (client, model_bytes, digest, settings, device_name)
    first = _hear_groups(run, paths, model_path, speakers, groups, files_per_shard)
    heard = None if first is None else first[:2]
    results = [] if first is None else [first[2:]]  # the sampled files, labelled in the first pass
    done = {r["path"] for files, _ in results for r in files}
    rest = [i for i, p in enumerate(paths) if str(p) not in done]
    whole = None if heard is not None or groups is None else [groups[i] for i in rest]  # no first pass: groups whole
    shards = [[rest[i] for i in s] for s in shards_of([paths[i] for i in rest], whole, files_per_shard)]

    def task(n: int, model: Any, shared: Any) -> tuple:
        return (label_shard, [str(paths[i]) for i in shards[n]], None if groups is None else [groups[i] for i in shards[n]],
                model, digest, settings, speakers, device_name, shared)

    labelled = len(done)
    if done and on_shard is not None:
        on_shard(labelled, len(paths))

    def shard_done(n: int) -> None:
        nonlocal labelled
        labelled += len(shards[n])
        if on_shard is not None:
            on_shard(labelled, len(paths))

    results += _run_rounds(run, len(shards), task, [[paths[i] for i in s] for s in shards], heard, shard_done)
    order = {str(p): i for i, p in enumerate(paths)}
    rows = sorted((r for files, _ in results for r in files), key=lambda r: order[r["path"]])
    segments = sorted((r for _, segs in results for r in segs), key=lambda r: order[r["path"]])  # stable
    if len(rows) != len(paths):
        raise RuntimeError(f"the cluster returned {len(rows)} rows for {len(paths)} files")
    return file_table(classes, rows), segment_table(classes, segments)


def _hear_groups(run: tuple, paths: list[Path], model_path: str | Path, speakers: str, groups: list[str] | None,
                 files_per_shard: int) -> tuple[dict, dict, list[dict], list[dict]] | None:
    """The first pass of a speaker model's grouped run, on the workers: (each group's statistics,
    each group's adaptation, the sampled files' rows, their window rows); None when the local run
    would make no first pass either."""
    info = read_model_info(model_path)
    settings = run[3]
    if groups is None or info is None or info["normalisation"] != "speaker":
        return None
    key_of = {str(p): k for p, k in zip(paths, groups)}
    sample = statistics_sample(paths, groups, settings.max_group_files)
    keys = [key_of[str(p)] for p in sample]
    tasks = shards_of(sample, keys, files_per_shard)
    cap, used = adapt_sample_cap(len(set(groups))), normalised_by("speaker", info["population"], speakers)

    def task(n: int, model: Any, shared: Any) -> tuple:
        return (hear_shard, [str(sample[i]) for i in tasks[n]], [keys[i] for i in tasks[n]], model, run[2],
                settings, run[4], cap, used, speakers)

    statistics: dict = {}
    states: dict = {}
    files: list[dict] = []
    segments: list[dict] = []
    for part in _run_rounds(run, len(tasks), task, [[sample[i] for i in s] for s in tasks]):
        statistics.update(part[0])
        states.update(part[1])
        files += part[2]
        segments += part[3]
    return statistics, states, files, segments


def _run_rounds(run: tuple, n_tasks: int, task: Callable[[int, Any, Any], tuple], files: list[list[Path]],
                shared: Any = None, on_done: Callable[[int], None] | None = None) -> list[Any]:
    """Each task's result, in task order; on_done(task) as each arrives. The model's bytes (and
    `shared`) are sent to every worker each round; a round that lost them with the only worker
    sends its tasks again."""
    from distributed import as_completed

    client, model_bytes = run[0], run[1]
    results: list[Any] = [None] * n_tasks
    for _ in range(RESUBMITS + 1):
        todo = [n for n, result in enumerate(results) if result is None]
        if not todo:
            break
        _wait_for_a_worker(client)
        [model_future] = client.scatter([model_bytes], broadcast=True, hash=False)
        scattered = [] if shared is None else client.scatter([shared], broadcast=True, hash=False)
        futures = {client.submit(*task(n, model_future, scattered[0] if scattered else None), pure=False): n
                   for n in todo}
        try:
            for future in as_completed(list(futures), loop=client.loop):
                results[futures[future]] = _shard_result(future, files[futures[future]])
                if results[futures[future]] is None:
                    continue  # the model's bytes died with the only worker: sent again next round
                if on_done is not None:
                    on_done(futures[future])
        except (OSError, TimeoutError):  # distributed's CommClosedError is an OSError
            raise UserError("the cluster's scheduler was lost mid-run; nothing written") from None
        finally:
            client.cancel(list(futures) + [model_future] + scattered)
    if any(result is None for result in results):
        raise UserError(f"the cluster lost its workers {RESUBMITS + 1} times; nothing written")
    return results


def _wait_for_a_worker(client: "Client") -> None:
    if client.status != "running":
        raise UserError("the cluster's scheduler was lost mid-run; nothing written")
    try:
        client.wait_for_workers(1, timeout=WORKER_WAIT_S)
    except (OSError, TimeoutError):
        raise UserError(f"the cluster has no worker (waited {WORKER_WAIT_S} s); nothing written") from None


def _shard_result(future: Any, shard: list[Path]) -> Any:
    """A shard's rows, or None when its task was cancelled because the model's bytes were lost
    with a worker; a shard that killed every worker it ran on is a clear error."""
    from concurrent.futures import CancelledError

    from distributed.scheduler import KilledWorker

    if future.status in ("cancelled", "lost"):
        return None
    try:
        return future.result()
    except CancelledError:  # finished, then forgotten with the lost data before it was gathered
        return None
    except KilledWorker:
        raise UserError(f"the cluster's workers died each time they labelled the shard of {shard[0]} ... "
                        f"{shard[-1]} (a file there may crash its decoder: try it locally); nothing written") from None


def label_files_on_cluster(paths: list[Path], model_path: str, settings: Settings, device_name: str,
                           speakers: str, groups: list[str] | None, address: str, certs: str | None = None,
                           insecure: bool = False) -> tuple[Table, Table, str]:
    """(file rows, window rows, what the input was normalised by) of `paths` labelled on the Dask
    cluster at `address` (ser.cluster: the connection and its security). The model file is read
    here without torch (2-3 s to import; the workers load the weights), and a file that will not
    load is the local run's clear error."""
    import logging

    from ser.cluster import connect

    # dask logs each failed reconnection with a traceback; the run's own message says what happened
    logging.getLogger("distributed.client").setLevel(logging.CRITICAL)
    info = read_model_info(model_path)
    try:
        if info is None:  # the checked load says why
            from ser.trained import TrainedModel

            TrainedModel.load(model_path)
            raise UserError(f"{model_path}: not a model file")
        with connect(address, certs, insecure) as client, \
                tqdm(total=len(paths), desc="predict (cluster)", unit="file") as progress:
            files, segments = label_on_cluster(client, paths, model_path, info["classes"], settings, speakers, groups,
                                               device_name, on_shard=lambda done, _: progress.update(done - progress.n))
    except Exception as e:
        if type(e).__name__ == "ModelFileError":  # raised on a worker too; ser.models imports torch
            raise UserError(str(e)) from None
        raise
    return files, segments, normalised_by(info["normalisation"], info["population"], speakers)
