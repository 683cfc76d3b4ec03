"""Reading the labeller's inputs: the audio files under the given paths, and each file's
non-silent windows and their features (prepare, run in the feature workers), or the reason a
file cannot be labelled. A header's claims are checked before any window is read. No torch.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ser import encoder
from ser.audio import (AUDIO_EXTENSIONS, ONE_READ_ONLY, UNREADABLE_AUDIO_EXTENSIONS, AudioError, AudioFile, LogMel,
                       count_windows)
from ser.labeller.settings import Settings
from ser.util import UserError


# What a header may claim before it is believed. Sample rates above 768 kHz or more than 64
# channels are not speech recordings; a lossless or lossy codec stores at least a byte per
# few thousand samples (FLAC's best case, digital silence: ~300 samples a byte), so a header
# claiming more samples than MAX_SAMPLES_PER_BYTE times the file size is lying.
MAX_SAMPLE_RATE = 768_000
MAX_CHANNELS = 64
MAX_SAMPLES_PER_BYTE = 4096
MAX_WINDOW_SAMPLES = 1 << 25  # one window read from disk: 128 MB of float32 at most


def header_problem(audio: "AudioFile", size_bytes: int, s: Settings) -> str | None:
    """Why a file's header cannot be believed or is out of the labeller's bounds, or None.
    Checked before any window is read, so a header decides no allocation."""
    sr, channels, frames = audio.sample_rate, audio.channels, audio.frames
    if sr < s.min_sample_rate:
        return f"sample rate {sr} Hz is below the minimum of {s.min_sample_rate} Hz (predict.min_sample_rate)"
    if sr > MAX_SAMPLE_RATE or channels > MAX_CHANNELS:
        return f"implausible header ({sr} Hz, {channels} channels)"
    if frames * channels > size_bytes * MAX_SAMPLES_PER_BYTE:
        return f"implausible header: {frames} frames claimed in a file of {size_bytes} bytes"
    if audio.duration_s > s.max_duration_s:
        return f"too long ({audio.duration_s:.0f} s > {s.max_duration_s:g} s, predict.max_duration_s)"
    if min(audio.duration_s, s.segment_s) * sr * channels > MAX_WINDOW_SAMPLES:
        return f"a {s.segment_s:g} s window at {sr} Hz x {channels} channels is too large to read"
    if audio.format in ONE_READ_ONLY and audio.duration_s > s.segment_s:
        return (f"{audio.format} recordings longer than {s.segment_s:g} s are not read here (their decoder is not "
                f"exact when read in parts); convert it to WAV or FLAC first (e.g. ffmpeg -i "
                f"in{audio.path.suffix.lower()} out.wav)")
    return None


def prepare(path: Path, extractor: LogMel, s: Settings, first_window: int = 0,
            max_windows: int | None = None) -> dict[str, Any]:
    """Features of the non-silent windows of one file from window `first_window` on, at most
    `max_windows` windows read (None: all), or the reason the file cannot be labelled.
    `next_window` says where a file cut short by max_windows goes on (else None), `first`
    whether this is the file's first piece. With an extractor whose encoder runs elsewhere
    (encoder_device), `encoder_inputs` holds each window's input to it, and the functionals
    lack its summary until the caller adds it (FeatureStream does). A file with no non-silent
    window at all is reported by the caller, which sees all its pieces. Runs in a worker and
    raises only for what no file can be labelled without (ser.encoder.EncoderError)."""
    result: dict[str, Any] = {"path": str(path), "features": None, "functionals": None, "starts": [], "ends": [],
                              "duration": None,
                              "error": "", "first": first_window == 0, "next_window": None, "windows_read": 0}
    try:
        if path.is_symlink() and not path.exists():
            result["error"] = f"{path}: broken symbolic link"
        elif path.is_dir():
            result["error"] = f"{path}: is a directory, not an audio file"
        elif not os.access(path, os.R_OK):
            result["error"] = f"{path}: permission denied"
        elif (size := path.stat().st_size) == 0:
            result["error"] = f"{path}: empty file (0 bytes)"
        else:
            with AudioFile(path) as audio:
                result["duration"] = duration = audio.duration_s
                if first_window == 0:
                    problem = header_problem(audio, size, s)
                    if duration < s.min_duration_s:
                        problem = f"too short ({duration:.3f} s < {s.min_duration_s} s)"
                    if problem:
                        result["error"] = f"{path}: {problem}"
                        return result
                read_windows(audio, extractor, s, first_window, max_windows, result)
    except AudioError as e:
        result["error"] = str(e)
    except encoder.EncoderError:  # the encoder's weights, not this file: stop the run (exit 2), write nothing
        raise
    except Exception as e:  # one bad file must not stop a batch of thousands
        result["error"] = f"{path}: {type(e).__name__}: {e}"
    if result["error"]:
        result.update(features=None, functionals=None, starts=[], ends=[], next_window=None, encoder_inputs=[])
    return result


def read_windows(audio: AudioFile, extractor: LogMel, s: Settings, first_window: int, max_windows: int | None,
                 result: dict[str, Any]) -> None:
    """prepare()'s reading of an open file's windows into `result`: each non-silent window's
    features, where it starts and ends, how many were read and where the file goes on."""
    features, functionals, encoder_inputs = [], [], []
    deferred = extractor.encoder_device is not None
    for start, end, y in audio.windows(extractor.fp.sample_rate, s.segment_s, s.hop_s, first_window, max_windows):
        result["windows_read"] += 1
        if np.abs(y).max() >= s.silence_peak:
            if deferred:  # the encoder runs on the caller's device (FeatureStream)
                logmel, described, encoder_input = extractor.describe_deferred(y)
                encoder_inputs.append(encoder_input)
            else:
                logmel, described = extractor.describe(y)
            features.append(logmel)
            functionals.append(described)
            result["starts"].append(start)
            result["ends"].append(end)
    if first_window + result["windows_read"] < count_windows(audio.duration_s, s.segment_s, s.hop_s):
        result["next_window"] = first_window + result["windows_read"]
    if features:
        result["features"] = np.stack(features)
        result["functionals"] = np.stack(functionals) if extractor.functionals else None
        if deferred and encoder_inputs[0] is not None:
            result["encoder_inputs"] = encoder_inputs


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
