"""Hostile inputs found by trying to break the labeller (issue: a header must not decide the
memory bill). Made here, by the tests and by bench_hostile.py alike."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

STREAMINFO = 8  # byte offset of FLAC's STREAMINFO block, after "fLaC" and its block header


def header_bomb_flac(path: Path) -> Path:
    """A 55 kB FLAC (2 s of noise at 16 kHz) whose header claims 2^36 - 1 frames (50 days)."""
    rng = np.random.default_rng(0)
    sf.write(str(path), (rng.standard_normal(32000) * 3000).astype(np.int16), 16000)
    data = bytearray(path.read_bytes())
    assert data[:4] == b"fLaC"
    data[STREAMINFO + 13] |= 0x0F  # total samples: 36 bits, the low 4 bits of byte 13 ...
    data[STREAMINFO + 14 : STREAMINFO + 18] = b"\xff\xff\xff\xff"  # ... and bytes 14-17
    path.write_bytes(bytes(data))
    return path


def one_hertz_wav(path: Path) -> Path:
    """A 12 kB WAV at 1 Hz: 6,000 s of 'audio', 2,000 windows of 6 s at 16 kHz if believed."""
    rng = np.random.default_rng(1)
    sf.write(str(path), (0.3 * rng.standard_normal(6000)).astype(np.float32), 1, subtype="PCM_16")
    return path


def long_silence_flac(path: Path, seconds: float, sample_rate: int = 8000) -> Path:
    """A real, valid FLAC of `seconds` of digital silence (a few hundred samples a byte)."""
    block = np.zeros(sample_rate * 60, dtype=np.int16)
    with sf.SoundFile(str(path), "w", sample_rate, 1, "PCM_16", format="FLAC") as f:
        for _ in range(int(seconds // 60)):
            f.write(block)
    return path


def make_hostile_folder(folder: Path, silence_s: float = 3 * 3600) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [header_bomb_flac(folder / "header_bomb.flac"), one_hertz_wav(folder / "one_hertz.wav"),
            long_silence_flac(folder / "long_silence.flac", silence_s)]


def descendants(pid: int) -> set[int]:
    """Process ids below `pid` (children, their children ...), from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def gone(pid: int) -> bool:
    """The process has exited (a zombie counts: it runs no more)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def as_in_a_terminal() -> None:
    """preexec_fn: the child gets its own process group (a terminal's Ctrl-C goes to the whole
    group) and the default SIGINT even where this run has it ignored (a shell starts
    background jobs so, and Python then keeps ignoring it)."""
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def peak_rss_mb(args: list[str], module: str = "ser") -> tuple[float, int, float]:
    """(peak RSS in MB of the largest process of `python -m module *args`, exit code, seconds),
    measured in a fresh child: no earlier work's peak counts."""
    code = ("import resource, subprocess, sys, time; t = time.time(); "
            "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, rc, time.time() - t)")
    done = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", module, *args],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, check=True)
    rss, rc, seconds = done.stdout.split()
    return float(rss), int(rc), float(seconds)
