"""The feature stream: worker processes decode files and compute each window's features
(ser.labeller.reading.prepare), handed back in path order with bounded memory.
"""
from __future__ import annotations

import concurrent.futures
import signal
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from joblib import effective_n_jobs

from ser import encoder
from ser.audio import AudioFile, LogMel, count_windows
from ser.labeller.reading import prepare
from ser.labeller.settings import Settings
from ser.labeller.workers import die_with_parent, one_core_worker, worker_context


# Files per task sent to a worker: amortises inter-process overhead for short clips.
FILES_PER_TASK = 8


# Windows a task reads at most (a long file is cut into pieces of this many): ~3 MB of features.
WINDOWS_PER_TASK = 64


STOP_GRACE_S = 1.0  # on Ctrl-C, running tasks get this long to finish before their workers are killed


def kept_for_next_pass(first: list[Path], then: list[Path], s: Settings) -> set[str]:
    """The files of a first pass whose pieces are kept for the second pass (`then`) instead of
    computed again: those it reads too, in order, while their windows (as their headers tell)
    fit in s.max_queued_windows (the memory of the features held ahead of the model, again).
    Only regular files are opened (a FIFO would block); one that cannot be read is not kept."""
    wanted, keep, budget = {str(p) for p in then}, set(), s.max_queued_windows
    for path in first:
        if str(path) not in wanted or not path.is_file() or path.stat().st_size == 0:
            continue
        try:
            with AudioFile(path) as audio:
                windows = count_windows(audio.duration_s, s.segment_s, s.hop_s)
        except Exception:  # any problem: the next pass reads it again and says what it is
            continue
        if windows <= budget:
            keep.add(str(path))
            budget -= windows
    return keep


def _init_worker(extractor: LogMel, settings: Settings) -> None:
    global _worker_args, _blas_limit
    _worker_args = (extractor, settings)
    # Ctrl-C reaches the whole process group: only the parent handles it (it stops the
    # workers); a worker interrupted mid-task left the pool waiting on it for ever.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    _blas_limit = one_core_worker()


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
    when that is safe (see ser.labeller.workers.worker_context).
    `then`: the paths of a second pass (the labeller's grouped run: a sample of each group's
    files for the statistics, then every file), served by self.next_pieces() on the same workers,
    its tasks queued behind this pass's as soon as the bound allows: the workers go on to it
    while the caller loads torch, instead of waiting for it and for a fork server's start. The
    first pass's pieces of files the second reads too are kept for it (kept_for_next_pass), not
    computed twice; self.next_pass computes the others.
    An extractor whose encoder runs on a device (a GPU: LogMel.encoder_device) has the workers
    send the encoder's inputs, and the encoder runs here on batches of windows (ser.encoder.run_deferred)."""

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
            self.pool = ProcessPoolExecutor(self.workers, mp_context=worker_context(), initializer=_init_worker,
                                            initargs=(extractor, s))
        if self.pool is not None:  # both passes' tasks together within the bound
            self._refill(self.max_pending - (0 if after is None else len(after.pending)))
        self.then = then
        self.keep = set() if then is None else kept_for_next_pass(paths, then, s)  # read while the workers start
        self.kept: dict[str, list[dict[str, Any]]] = {}  # path -> its pieces, as this pass met them
        self.next_pass = None if then is None else FeatureStream(
            [p for p in then if str(p) not in self.keep], extractor, s, after=self)

    def _refill(self, limit: int | None = None) -> None:
        while len(self.pending) < (self.max_pending if limit is None else limit):
            group = next(self.groups, None)
            if group is None:
                return
            self.pending.append(self.pool.submit(_prepare_group, group, 0))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for piece in self._completed():
            if piece["path"] in self.keep:
                self.kept.setdefault(piece["path"], []).append(piece)
            yield piece

    def next_pieces(self) -> Iterator[dict[str, Any]]:
        """The second pass's pieces in the order of `then`: those this pass kept, and next_pass's."""
        position = {str(p): i for i, p in enumerate(self.then)}
        waiting = sorted(self.kept, key=position.__getitem__)
        done = 0
        for piece in self.next_pass:
            while done < len(waiting) and position[waiting[done]] < position[piece["path"]]:
                yield from self.kept.pop(waiting[done])
                done += 1
            yield piece
        for path in waiting[done:]:
            yield from self.kept.pop(path)

    def _completed(self) -> Iterator[dict[str, Any]]:
        e = self.extractor
        if e.encoder_device is None or e.fp.encoder is None or not e.functionals:
            yield from self._pieces()
            return
        # the encoder on a GPU: the workers sent its inputs; it runs here on many windows at once
        items = ((piece, piece.pop("encoder_inputs", [])) for piece in self._pieces())
        for piece, summaries in encoder.run_deferred(items, e.fp.encoder, e.encoder_device, e.encoder_precision,
                                                      e.fp.encoder_layers):
            if len(summaries):
                piece["functionals"] = np.concatenate([piece["functionals"], summaries], axis=1)
            yield piece

    def _pieces(self) -> Iterator[dict[str, Any]]:
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
