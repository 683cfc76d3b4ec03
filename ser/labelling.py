"""Labelling audio files with a trained model: the work below the command line (ser.labeller),
the page (ser.app) and the cluster's workers (ser.cluster). Labels never come from file names.

One row per input file, in path order; a file that cannot be labelled gets status `error`
and the reason instead of stopping the run. Decoding and features run in parallel worker
processes (FeatureStream); inference is batched; memory is bounded by max_queued_windows,
however many files. Each file is heard relative to its speaker group (ser.grouping), and the
model adapted to each group (ser.adaptation) when asked.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np
import threadpoolctl
from joblib import effective_n_jobs
from tqdm import tqdm

# This module does not import torch at the top: the feature workers start first and torch
# (2-3 s to import) loads while they work. Settings and prepare live in ser.audio so
# that the workers never import torch either.
from ser.audio import AUDIO_EXTENSIONS, UNREADABLE_AUDIO_EXTENSIONS, FeatureParams, LogMel, Settings, prepare
from ser.calibration import UNCERTAIN_BELOW
from ser.fusion import LinearHead, fused_log_probs, standardise
from ser.grouping import (MAX_GROUP_FILES, MIN_GROUP_WINDOWS, GroupStatistics, SpeakerStatistics, speaker_keys,
                          statistics_sample)
from ser.modelfile import is_fused
from ser.util import UserError

if TYPE_CHECKING:
    import pandas as pd
    import torch

# After each parallel region torch's OpenMP threads spin-wait by default; in the labeller
# they would spin on the cores the feature workers need (measured with 1,200 clips on 2
# cores: 2-3 s less CPU in the main process, runs 1-4 s faster). libgomp reads this when
# torch loads, so it is set before that; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The command line's defaults (the DVC stage passes params.yaml's `predict` section instead).
DEFAULTS = Settings(batch_size=64, n_jobs=-1, min_duration_s=0.1, silence_peak=1e-4, segment_s=6.0, hop_s=3.0,
                    max_queued_windows=4096, precision="auto", max_duration_s=14400.0, min_sample_rate=4000,
                    uncertain_below=UNCERTAIN_BELOW, min_group_windows=MIN_GROUP_WINDOWS,
                    max_group_files=MAX_GROUP_FILES, adapt=True)
DEFAULT_MODEL = "data/model/model.pt"
# With --adapt, the model adapts to a seeded sample of at most ser.adaptation.SAMPLE_SIZE windows of
# each speaker group, and of ADAPT_MAX_WINDOWS in all (~50 kB each): bounded memory however many groups.
ADAPT_MAX_WINDOWS = 8192
# Files per task sent to a worker: amortises inter-process overhead for short clips.
FILES_PER_TASK = 8
# Windows a task reads at most (a long file is cut into pieces of this many): ~3 MB of features.
WINDOWS_PER_TASK = 64
STOP_GRACE_S = 1.0  # on Ctrl-C, running tasks get this long to finish before their workers are killed
PR_SET_PDEATHSIG = 1  # prctl(2)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt() parameters (malloc.h)


def _init_worker(extractor: LogMel, settings: Settings) -> None:
    global _worker_args, _blas_limit
    _worker_args = (extractor, settings)
    # Ctrl-C reaches the whole process group: only the parent handles it (it stops the
    # workers); a worker interrupted mid-task left the pool waiting on it for ever.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    _blas_limit = one_core_worker()


def one_core_worker() -> threadpoolctl.threadpool_limits:
    """Tune this process as one of several feature workers (also a cluster worker's): one
    BLAS thread (OpenBLAS's default, all cores, in every worker made the mel products spin
    against each other and halved throughput on 2 cores), and freed memory kept for reuse.
    Keep the returned limiter: it holds the BLAS limit."""
    keep_freed_memory()
    os.environ["OMP_NUM_THREADS"] = "1"  # torch reads it when imported (the encoder's, ser.encoder)
    return threadpoolctl.threadpool_limits(1)


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when its parent dies (even by kill -9), so no
    orphan goes on decoding. (Under a fork server the parent is the server, which exits when
    the labeller does.) Elsewhere a thread watches the parent instead."""
    parent = os.getppid()
    try:
        if ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            raise OSError
    except (OSError, AttributeError):
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # the parent died before the kernel was asked
        os._exit(1)


def keep_freed_memory() -> None:
    """glibc hands every freed block over 128 kB back to the OS, so each clip's spectra
    (~0.4 MB arrays) land on fresh pages that fault on first touch: ~9% of a worker's CPU,
    measured. Keep such blocks for reuse instead (a worker holds a few MB at a time).
    Elsewhere than glibc this does nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, 16 << 20)  # blocks below 16 MB come from the heap...
    libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)  # ...which is trimmed only past 64 MB free


def _worker_context() -> multiprocessing.context.BaseContext:
    """fork when safe (no other threads, torch not loaded; the CLI's case): workers start at
    once and share this process's imports. Else a fork server, which starts a clean process
    once (about a second) and forks the workers from it."""
    if threading.active_count() == 1 and "torch" not in sys.modules:
        return multiprocessing.get_context("fork")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["ser.labelling"])
    return context


Continuation = tuple[list[Path], int]  # files still to do, and the window the first one goes on at


def prepare_pieces(paths: list[Path], first_window: int, extractor: LogMel, s: Settings
                   ) -> tuple[list[dict[str, Any]], Continuation | None]:
    """prepare() of `paths` from window `first_window` of the first one, reading at most
    WINDOWS_PER_TASK windows in all; plus where to go on, or None when all are done. A long
    file thus comes in pieces, and no task holds more than WINDOWS_PER_TASK windows."""
    results, budget = [], WINDOWS_PER_TASK
    for i, path in enumerate(paths):
        result = prepare(path, extractor, s, first_window if i == 0 else 0, budget)
        results.append(result)
        budget -= result["windows_read"]
        if result["next_window"] is not None:
            return results, (paths[i:], result["next_window"])
        if budget <= 0 and i + 1 < len(paths):
            return results, (paths[i + 1:], 0)
    return results, None


def _prepare_group(paths: list[Path], first_window: int) -> tuple[list[dict[str, Any]], Continuation | None]:
    return prepare_pieces(paths, first_window, *_worker_args)


class FeatureStream:
    """prepare() pieces of every path, yielded in path order (a file's pieces one after the
    other). With n_jobs != 1, worker processes start on construction (not on first use), so
    they work while the caller loads torch. Memory is bounded whatever the files: at most
    max_pending tasks are handed out and unconsumed at once, each holding at most
    WINDOWS_PER_TASK windows, so max_queued_windows bounds the windows held (joblib's
    generator has no such bound: it buffers every finished result). Workers start by fork
    when that is safe (see _worker_context).
    `then`: the paths of a second pass (the labeller's grouped run: a sample of each group's
    files for the statistics, then every file), served by self.next_pass on the same workers,
    its tasks queued behind this pass's as soon as the bound allows: the workers go on to it
    while the caller loads torch, instead of waiting for it and for a fork server's start."""

    def __init__(self, paths: list[Path], extractor: LogMel, s: Settings, then: list[Path] | None = None,
                 after: "FeatureStream | None" = None) -> None:
        self.extractor, self.settings, self.paths = extractor, s, paths
        self.groups = iter([paths[i : i + FILES_PER_TASK] for i in range(0, len(paths), FILES_PER_TASK)])
        self.pool: ProcessPoolExecutor | None = None
        self.owns_pool = True  # shuts the workers down when closed (the last pass's stream)
        self.pending: deque[Future] = deque()
        if after is not None:  # the pass after `after`: its workers, which this stream now shuts down
            self.workers, self.pool, after.owns_pool = after.workers, after.pool, False
        else:
            files = len(paths) + len(then or [])
            self.workers = min(effective_n_jobs(s.n_jobs), max(1, files // FILES_PER_TASK))
        self.max_pending = max(self.workers + 1, s.max_queued_windows // WINDOWS_PER_TASK)
        if self.workers > 1 and after is None:
            self.pool = ProcessPoolExecutor(self.workers, mp_context=_worker_context(), initializer=_init_worker,
                                            initargs=(extractor, s))
        if self.pool is not None:  # both passes' tasks together within the bound
            self._refill(self.max_pending - (0 if after is None else len(after.pending)))
        self.next_pass = None if then is None else FeatureStream(then, extractor, s, after=self)

    def _refill(self, limit: int | None = None) -> None:
        while len(self.pending) < (self.max_pending if limit is None else limit):
            group = next(self.groups, None)
            if group is None:
                return
            self.pending.append(self.pool.submit(_prepare_group, group, 0))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.pool is None:
            for group in self.groups:
                continuation: Continuation | None = (group, 0)
                while continuation is not None:
                    results, continuation = prepare_pieces(*continuation, self.extractor, self.settings)
                    yield from results
            return
        try:
            self._refill()  # a second pass may have had no room while the first was read
            while self.pending:
                results, continuation = self.pending.popleft().result()
                if continuation is not None:  # the rest of this task's files come next, before later tasks
                    self.pending.appendleft(self.pool.submit(_prepare_group, *continuation))
                self._refill(self.max_pending - (0 if self.next_pass is None else len(self.next_pass.pending)))
                yield from results
        except BaseException:
            self.close(kill=True)
            raise
        finally:
            self.close()

    def close_passes(self, kill: bool = False) -> None:
        """close() this pass and the next, if any (whose stream shuts the workers down)."""
        self.close(kill)
        if self.next_pass is not None:
            self.next_pass.close(kill)

    def close(self, kill: bool = False) -> None:
        """Shut the workers down. kill=True (an interrupt, an error): tasks not started are
        dropped, running ones get STOP_GRACE_S to finish (a task is at most WINDOWS_PER_TASK
        windows), and workers still busy then are killed. A pool whose worker was killed is
        not waited for: killed while sending a result, a worker leaves the pool's reader
        thread waiting for the rest of it for ever."""
        if self.pool is None:
            return
        pool, self.pool = self.pool, None
        if kill:
            for future in self.pending:
                future.cancel()
        if not self.owns_pool:  # the next pass's stream shuts the workers down
            return
        if kill:
            _, running = concurrent.futures.wait(self.pending, timeout=STOP_GRACE_S)
            if running:  # ProcessPoolExecutor has no public way to stop running tasks before 3.14
                for process in list((getattr(pool, "_processes", None) or {}).values()):
                    process.kill()
                pool.shutdown(wait=False, cancel_futures=True)
                return
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class Table:
    """Rows (dicts) under named columns: what the labeller writes; pandas only on request."""
    columns: list[str]
    rows: list[dict[str, Any]]

    def to_frame(self) -> "pd.DataFrame":
        import pandas as pd

        return pd.DataFrame(self.rows, columns=self.columns)


def collect_inputs(inputs: list[str]) -> list[Path]:
    """Audio files under the given files/folders, sorted and unique. Folder entries are
    taken by extension, including broken links, folders with an audio extension and audio
    in a format that cannot be read (.m4a...), so that each gets an error row rather than
    vanishing."""
    found: set[Path] = set()
    wanted = AUDIO_EXTENSIONS + UNREADABLE_AUDIO_EXTENSIONS
    for item in inputs:
        path = Path(item)
        if path.is_dir() and path.suffix.lower() not in AUDIO_EXTENSIONS:
            found.update(p for p in path.rglob("*") if p.suffix.lower() in wanted)
        elif path.exists() or path.is_symlink():
            found.add(path)
        else:
            raise UserError(f"input not found: {item}")
    if not found:
        raise UserError(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) under {', '.join(inputs)}")
    return sorted(found, key=lambda p: str(p))


NORMALISED_BY = {
    "clip": "each clip normalised by itself (a clip-normalised model; --speakers is not needed)",
    "window": "a speaker-normalised model with no speaker grouping: each window normalised by its own "
              "statistics (an old model file without population statistics; say who is who with --speakers)",
    "population": "no group of --min-group-windows windows or more: normalised by the average training speaker (say who is "
                  "who with --speakers for better labels)",
    "all": "all files normalised as one group (--speakers all, the default; a group of fewer than "
           "--min-group-windows windows by the average training speaker)",
    "file": "each file normalised as one speaker (--speakers file)",
    "folder": "each folder's files normalised as one speaker (--speakers folder)",
    "manifest": "files normalised by the speakers of the manifest (--speakers)",
    "calibration": "normalised by the statistics of the speaker's calibration recording",
}
# speaker group -> its statistics; the key None (no group's name can be None): the average
# training speaker, for files in no group or in one too small for statistics
Statistics = dict[str | None, GroupStatistics]


def gather_statistics(paths: list[Path], keys: list[str], stream: Iterable[dict[str, Any]],
                      fp: FeatureParams, min_windows: int = MIN_GROUP_WINDOWS, sample: Any = None) -> Statistics:
    """Each speaker group's statistics over its files' windows (prepare() pieces of `paths`,
    e.g. a FeatureStream: the first of two passes; `keys`: each path's group); `sample`: a
    ser.adaptation.WindowSample that keeps some of each group's windows too."""
    key_of = {str(p): k for p, k in zip(paths, keys)}
    running = SpeakerStatistics(fp.n_mels, fp.floor_db)
    with tqdm(total=len(paths), desc="speaker statistics", unit="file") as progress:
        for piece in stream:
            progress.update(int(piece["first"]))
            if piece["features"] is not None:
                running.add(key_of[piece["path"]], piece["features"], piece.get("functionals"))
                if sample is not None:
                    sample.add(key_of[piece["path"]], piece["features"], piece.get("functionals"))
    return running.finish(min_windows)


def normalised_by(meta: dict[str, Any], speakers: str) -> str:
    """What the model's input was standardised by: clip (a clip-normalised model: each clip
    itself), population (a speaker model with no grouping: the average training speaker;
    window for an old model file without those statistics) or the grouping (all, file, folder,
    manifest); a group too small for statistics of its own is heard as population (per row)."""
    if meta["extra"].get("normalisation") != "speaker":
        return "clip"
    if speakers == "none":
        return "population" if "population" in meta["extra"] else "window"
    return speakers if speakers in ("all", "file", "folder") else "manifest"


def population_of(meta: dict[str, Any]) -> GroupStatistics | None:
    """The average training speaker's (mean, std) per band from the model file, if it has them
    (its functionals' are the linear model's own, LinearHead.population)."""
    population = meta["extra"].get("population")
    if population is None:
        return None
    mean, std = (np.asarray(v, dtype=np.float32) for v in population)
    return GroupStatistics((mean, std))


def first_pass_paths(paths: list[Path], normalisation: str | None, speakers: str, groups: list[str] | None,
                     s: Settings) -> list[Path] | None:
    """The files of the labeller's first pass: a speaker model's grouped run reads a sample of
    each group's files for the statistics (grouping.statistics_sample), then every file;
    None: no first pass, every file is read once."""
    if normalisation == "speaker" and groups is not None:
        return statistics_sample(paths, groups, s.max_group_files)
    return None


def speaker_setup(paths: list[Path], meta: dict[str, Any], s: Settings, stream: FeatureStream | None,
                  speakers: str, calibration: GroupStatistics | None,
                  groups: list[str] | None = None
                  ) -> tuple[str, dict[str, str], Statistics, FeatureStream, Any]:
    """(what the input is normalised by, each path's speaker group, each group's statistics,
    the stream the model's pass reads, the windows kept to adapt the model to each group or
    None): a grouping's statistics (and with s.adapt, a sample of its windows) come from a
    first pass over a sample of each group's files, and a stream over every file then serves the model.
    `stream`: None, or started by the caller over first_pass_paths() or every path (run() does, so the
    workers start before torch loads). `groups`: each path's speaker group already read from
    `speakers` (a cluster worker gets them, not the manifest)."""
    # the functionals only for a model that fuses a linear model on them (ser.fusion)
    extractor = LogMel(meta["feature_params"], functionals=is_fused(meta["extra"]), encoder_precision=s.precision)
    used, statistics = normalised_by(meta, speakers), {}
    if calibration is not None and used != "clip":
        used, statistics = "calibration", {"calibration": calibration}
        keys: list[str] | None = ["calibration"] * len(paths)
    else:
        keys = None if used in ("clip", "window", "population") else (
            groups if groups is not None else speaker_keys(paths, speakers))
    key_of = {} if keys is None else {str(p): k for p, k in zip(paths, keys)}
    window_sample = None
    if keys is not None and used != "calibration":
        if s.adapt:
            from ser.adaptation import SAMPLE_SIZE, WindowSample

            window_sample = WindowSample(max(1, min(SAMPLE_SIZE, ADAPT_MAX_WINDOWS // len(set(keys)))))
        sample = statistics_sample(paths, keys, s.max_group_files)
        if stream is not None and stream.paths != sample:
            raise ValueError("the caller's stream must be over first_pass_paths()")
        first = stream if stream is not None else FeatureStream(sample, extractor, s, then=paths)
        statistics = gather_statistics(sample, [key_of[str(p)] for p in sample], first, extractor.fp,
                                       s.min_group_windows, window_sample)
        stream = first.next_pass  # every file, for the model's pass (begun on the same workers)
        if stream is not None and stream.paths != paths:
            raise ValueError("the caller's second pass must be over every path")
    results = stream if stream is not None else FeatureStream(paths, extractor, s)
    population = population_of(meta)
    if population is not None and used not in ("clip", "calibration"):
        statistics[None] = population  # no group, or one too small for its own: the average speaker
    return used, key_of, statistics, results, window_sample


def group_models(model: "torch.nn.Module", head: LinearHead | None, used: str, statistics: Statistics,
                 window_sample: Any, s: Settings) -> Any:
    """The model each group is heard by (ser.adaptation.GroupModels): with s.adapt, adapted to
    every group that has statistics of its own from its kept windows (normalised as the model
    hears them), else the trained one. `model`: loaded unfused when s.adapt, else ready as is."""
    from ser.adaptation import MIN_CLIPS, GroupModels, adapted_state

    states = {}
    keys = [] if window_sample is None else [k for k in window_sample.kept if k in statistics]
    for key in tqdm(keys, desc="adapt to speakers", unit="group", disable=not keys):
        features, functionals = window_sample.windows(key)
        if len(features) < MIN_CLIPS:
            continue
        piece = {"features": features, "functionals": functionals}
        z = None if head is None else functional_input([piece], [statistics[key]], head)
        states[key] = adapted_state(model, head, model_input([piece], used, [statistics[key]]), z, s.precision)
    return GroupModels(model, states)


def model_input(pieces: list[dict[str, Any]], used: str, stats: list[GroupStatistics | None]) -> "torch.Tensor":
    """The pieces' windows as one batch, normalised as `used` says: by nothing (a clip model
    does it itself), or each piece by its `stats` (its group's, or the average training
    speaker's); a piece with none (an old model file) has each window by itself."""
    import torch

    from ser.models import speaker_normalise

    if used == "clip":
        return torch.from_numpy(np.concatenate([r["features"] for r in pieces]))
    parts = []
    for r, st in zip(pieces, stats):
        x = torch.from_numpy(r["features"])
        if st is None:
            parts.append(speaker_normalise(x, np.arange(len(x))))
            continue
        mean, std = (torch.from_numpy(v.astype(np.float32))[:, None] for v in st.bands)
        parts.append((x - mean) / std)
    return torch.cat(parts)


def functional_input(pieces: list[dict[str, Any]], stats: list[GroupStatistics | None], head: LinearHead
                     ) -> np.ndarray:
    """The pieces' windows' functionals standardised by their group's statistics
    (GroupStatistics.functional_statistics), or by the average training speaker's (no group,
    a clip model)."""
    parts = []
    for r, st in zip(pieces, stats):
        mean, std = head.population if st is None else st.functional_statistics(head.population)
        parts.append(standardise(r["functionals"], mean, std))
    return np.concatenate(parts)


def window_probabilities(model: "torch.nn.Module", head: LinearHead | None, pieces: list[dict[str, Any]], used: str,
                         stats: list[GroupStatistics | None], s: Settings, device: "torch.device"
                         ) -> np.ndarray:
    """Class probabilities of the pieces' windows: the CNN's, fused with the linear model's
    (ser.fusion) when the model file has one, each piece heard relative to its `stats`."""
    from ser.models import infer

    logits = infer(model, model_input(pieces, used, stats), s.batch_size, device, s.precision)
    z = None if head is None else functional_input(pieces, stats, head)
    return fused_log_probs(logits, z, head).exp().numpy()


def adapted_window_probabilities(models: Any, head: LinearHead | None, pieces: list[dict[str, Any]],
                                 keys: list[str | None], used: str, stats: list[GroupStatistics | None], s: Settings,
                                 device: "torch.device") -> np.ndarray:
    """window_probabilities with each piece heard by its group's model (`models`: ser.adaptation.
    GroupModels; `keys`: each piece's group), in the pieces' order."""
    keys = [k if models.adapted(k) else None for k in keys]
    by_piece: list[np.ndarray] = [np.empty(0)] * len(pieces)
    for key in dict.fromkeys(keys):
        chosen = [i for i, k in enumerate(keys) if k == key]
        part = window_probabilities(models.model_for(key), head, [pieces[i] for i in chosen], used,
                                    [stats[i] for i in chosen], s, device)
        offsets = np.cumsum([0] + [len(pieces[i]["features"]) for i in chosen])
        for j, i in enumerate(chosen):
            by_piece[i] = part[offsets[j] : offsets[j + 1]]
    return np.concatenate(by_piece)


def heard_as(used: str, key: str | None, statistics: Statistics) -> str:
    """What one file was normalised by: the run's `used`, or for a group too small for
    statistics of its own the average training speaker (population; window for an old model)."""
    if used in ("clip", "window", "calibration") or (key is not None and key in statistics):
        return used
    return "population" if None in statistics else "window"


def label_rows(paths: list[Path], model: "torch.nn.Module", meta: dict[str, Any], s: Settings,
               device: "torch.device", stream: FeatureStream | None = None, speakers: str = "none",
               calibration: GroupStatistics | None = None, groups: list[str] | None = None
               ) -> tuple[Table, Table]:
    """(one row per file, one row per window). Workers decode and compute features in
    parallel (`stream`, started by the caller or here); windows are batched for the model as
    they arrive, a long file's pieces included; a file's label averages its windows'
    probabilities, so only a bounded number of windows is ever held in memory.
    A speaker-normalised model hears each file relative to its speaker group (`speakers`,
    ser.grouping), whose statistics are gathered in a first pass; or relative to one
    speaker's `calibration` statistics (the page's "calibrate to my voice"); with neither,
    each window relative to its own."""
    classes, head = meta["classes"], LinearHead.from_record(meta["extra"].get("fusion"))
    used, key_of, statistics, results, sample = speaker_setup(paths, meta, s, stream, speakers, calibration, groups)
    models = group_models(model, head, used, statistics, sample, s)
    prob_columns = [f"prob_{c}" for c in classes]
    rows: list[dict[str, Any]] = []
    sums: list[np.ndarray] = []  # per file: the sum of its windows' probabilities, and their count
    counts: list[int] = []
    segments: list[dict[str, Any]] = []
    pending: list[tuple[int, dict[str, Any]]] = []

    def flush() -> None:
        pieces = [r for _, r in pending]
        stats = [statistics.get(key_of.get(r["path"]), statistics.get(None)) for r in pieces]
        probs = adapted_window_probabilities(models, head, pieces, [key_of.get(r["path"]) for r in pieces],
                                             used, stats, s, device)
        offset = 0
        for row_index, r in pending:
            window_probs = probs[offset : offset + len(r["features"])]
            offset += len(r["features"])
            sums[row_index] += window_probs.sum(axis=0, dtype=np.float64)
            counts[row_index] += len(window_probs)
            for start, end, p in zip(r["starts"], r["ends"], window_probs):
                segments.append({"path": rows[row_index]["path"], "start_s": start, "end_s": end,
                                 "emotion": classes[int(p.argmax())], "confidence": float(p.max()),
                                 **dict(zip(prob_columns, p.tolist()))})
        pending.clear()

    with tqdm(total=len(paths), desc="predict", unit="file") as progress:
        for piece in results:
            if piece["first"]:  # a new file's row; its later pieces add windows (or an error)
                rows.append({"path": piece["path"], "status": "error", "error": "", "emotion": None,
                             "confidence": math.nan, **{c: math.nan for c in prob_columns},
                             "duration_s": math.nan if piece["duration"] is None else piece["duration"],
                             "normalised_by": heard_as(used, key_of.get(piece["path"]), statistics),
                             "speaker_group": key_of.get(piece["path"], ""),
                             "adapted": models.adapted(key_of.get(piece["path"]))})
                sums.append(np.zeros(len(classes)))
                counts.append(0)
                progress.update(1)
            rows[-1]["error"] = rows[-1]["error"] or piece["error"]
            if piece["features"] is not None:
                pending.append((len(rows) - 1, piece))
                if sum(len(r["features"]) for _, r in pending) >= s.batch_size:
                    flush()
        if pending:
            flush()
    return finish_rows(rows, sums, counts, segments, classes, s)


def finish_rows(rows: list[dict[str, Any]], sums: list[np.ndarray], counts: list[int],
                segments: list[dict[str, Any]], classes: list[str], s: Settings) -> tuple[Table, Table]:
    """Each file's label from the sum and count of its windows' probabilities (the mean);
    a file with no non-silent window is an error row, and an error row keeps no segments."""
    prob_columns = [f"prob_{c}" for c in classes]
    for row, total, count in zip(rows, sums, counts):
        if not row["error"] and count == 0:
            row["error"] = f"{row['path']}: silent (peak below {s.silence_peak})"
        if not row["error"]:
            mean = total / count  # file label: average over its windows
            best = int(mean.argmax())
            row.update(status="ok", emotion=classes[best], confidence=float(mean[best]),
                       uncertain=bool(mean[best] < s.uncertain_below), **dict(zip(prob_columns, mean.tolist())))
    failed = {row["path"] for row in rows if row["error"]}  # e.g. a read error in a later piece
    segments = [seg for seg in segments if seg["path"] not in failed]
    return file_table(classes, rows), segment_table(classes, segments)


def file_table(classes: list[str], rows: list[dict[str, Any]]) -> Table:
    """The labeller's output columns: one row per file."""
    return Table(["path", "status", "error", "emotion", "confidence", "uncertain", *[f"prob_{c}" for c in classes],
                  "duration_s", "normalised_by", "speaker_group", "adapted"], rows)


def segment_table(classes: list[str], rows: list[dict[str, Any]]) -> Table:
    """The --segments columns: one row per window."""
    return Table(["path", "start_s", "end_s", "emotion", "confidence", *[f"prob_{c}" for c in classes]], rows)


def label_files(paths: list[Path], model: "torch.nn.Module", meta: dict[str, Any], s: Settings,
                device: "torch.device", stream: FeatureStream | None = None, speakers: str = "none",
                calibration: GroupStatistics | None = None) -> tuple["pd.DataFrame", "pd.DataFrame"]:
    """label_rows as DataFrames (one row per file, one row per window)."""
    files, segments = label_rows(paths, model, meta, s, device, stream, speakers, calibration)
    return files.to_frame(), segments.to_frame()
