"""How the labeller's processes are tuned: one BLAS thread and a kept heap in each feature
worker (and each cluster worker), workers that die with their parent, how they are started.
Importing this module tells torch's OpenMP threads not to spin (set before torch loads).
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time

import threadpoolctl

# After each parallel region torch's OpenMP threads spin-wait by default; in the labeller
# they would spin on the cores the feature workers need. libgomp reads this when torch
# loads, so it is set before that; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

PR_SET_PDEATHSIG = 1  # prctl(2)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt() parameters (malloc.h)


def one_core_worker() -> threadpoolctl.threadpool_limits:
    """Tune this process as one of several feature workers (also a cluster worker's): one
    BLAS thread (OpenBLAS's default, all cores, in every worker made the mel products spin
    against each other and halved throughput on 2 cores), and freed memory kept for reuse.
    Keep the returned limiter: it holds the BLAS limit."""
    keep_freed_memory()
    os.environ["OMP_NUM_THREADS"] = "1"  # torch reads it when imported (the encoder's, ser.encoder)
    return threadpoolctl.threadpool_limits(1)


def die_with_parent() -> None:
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
    (arrays of some hundred kB) land on fresh pages that fault on first touch, a noticeable share
    of a worker's CPU. Keep such blocks for reuse instead (a worker holds a few MB at a time).
    Elsewhere than glibc this does nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, 16 << 20)  # blocks below 16 MB come from the heap...
    libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)  # ...which is trimmed only past 64 MB free


def worker_context() -> multiprocessing.context.BaseContext:
    """fork when safe (no other threads, torch not loaded; the CLI's case): workers start at
    once and share this process's imports. Else a fork server, which starts a clean process
    once (about a second) and forks the workers from it."""
    if threading.active_count() == 1 and "torch" not in sys.modules:
        return multiprocessing.get_context("fork")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["ser.labeller.stream"])
    return context
