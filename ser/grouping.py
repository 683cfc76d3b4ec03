"""Which recordings share a speaker, at labelling time, and that speaker's statistics.

A speaker-normalised model (train.normalisation: speaker) hears each clip relative to its
speaker's mean and spread per mel band. The labeller learns who is who from the user:
- `file`: each file is one speaker (a long recording: its own windows are the group);
- `folder`: the files of one folder are one speaker (a sub-folder per speaker);
- a CSV or Parquet manifest with `path` and `speaker` columns (paths as given on the
  command line, or relative to the manifest's folder);
- `all` (the default): every file of the run is one group, as for a folder of recordings from
  one source: its statistics stand for the average voice and microphone of the set, which
  works whatever the folders are (a folder per emotion would normalise the emotion away);
- `none`: nobody is grouped.
The statistics are gathered in a first pass over the features of at most MAX_GROUP_FILES of
each group's files (sums per band, so memory does not grow with the number of files), then
the model labels every file in a second pass. A group of
fewer than MIN_GROUP_WINDOWS windows, and every file under `none`, is heard relative to the
average training speaker (the model file's population statistics): one clip's own statistics
carry its emotion, and normalising it by itself erased it (docs/decisions.md, "A flat folder is
one speaker group").
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ser.util import UserError, read_text_table

GROUPINGS = ("all", "none", "file", "folder")
# Measured on the calibration speakers (never trained on): random groups of one speaker's clips,
# normalised by themselves or by the average training speaker, cross over at about 10 clips.
MIN_GROUP_WINDOWS = 10
# The first pass reads at most this many files of a group (a seeded sample), so a big folder is
# not read twice; a sample this large labels nearly every file as all of the group's files would
# (docs/performance.md).
MAX_GROUP_FILES = 200
MANIFEST_SUFFIXES = (".csv", ".parquet")
# A group's functionals need this many windows for their spread to mean anything (their mean is
# used from one window on: the page's few seconds of calibration speech).
MIN_SPREAD_WINDOWS = 5


def _read_manifest(manifest: Path) -> dict[Path, str]:
    table = read_text_table(manifest, f"--speakers {manifest}")
    missing = [c for c in ("path", "speaker") if c not in table.columns]
    if missing:
        raise UserError(f"--speakers {manifest}: no column {', '.join(missing)} (needs path and speaker)")
    speakers: dict[Path, str] = {}
    for row, (path, speaker) in enumerate(zip(table["path"], table["speaker"]), start=2):
        if not path.strip():
            raise UserError(f"--speakers {manifest}, row {row}: the path is empty")
        if not speaker.strip():
            raise UserError(f"--speakers {manifest}, row {row} ({path}): the speaker is empty")
        resolved = (manifest.parent / path if not Path(path).is_absolute() else Path(path)).resolve()
        speakers[resolved] = speaker
    return speakers


def speaker_keys(paths: list[Path], grouping: str) -> list[str] | None:
    """Each path's speaker group under `grouping` (see the module), or None for none."""
    if grouping == "none":
        return None
    if grouping == "all":
        return ["all"] * len(paths)
    if grouping == "file":
        return [str(p) for p in paths]
    if grouping == "folder":
        return [str(p.parent) for p in paths]
    manifest = Path(grouping)
    if manifest.suffix.lower() not in MANIFEST_SUFFIXES:
        raise UserError(f"--speakers {grouping}: give all, none, file, folder or a .csv/.parquet manifest "
                        "with path and speaker columns")
    if not manifest.is_file():
        raise UserError(f"--speakers {grouping}: no such manifest")
    speakers = _read_manifest(manifest)
    keys = []
    for p in paths:
        key = speakers.get(p.resolve(), speakers.get(Path(p).absolute()))
        if key is None:
            raise UserError(f"--speakers {grouping}: {p} is not in the manifest (every input needs a speaker)")
        keys.append(key)
    return keys


def statistics_sample(paths: list[Path], keys: list[str], max_files: int = MAX_GROUP_FILES, seed: int = 0
                      ) -> list[Path]:
    """The files whose features give their groups' statistics: all of a group of up to
    `max_files` files, else a seeded random `max_files` of them; in the order of `paths`."""
    members: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    rng = np.random.default_rng(seed)
    chosen = []
    for indices in members.values():
        chosen.extend(indices if len(indices) <= max_files else rng.choice(indices, max_files, replace=False).tolist())
    return [paths[i] for i in sorted(chosen)]


@dataclass(frozen=True)
class GroupStatistics:
    """What one speaker group's windows are heard relative to: the (mean, std) per mel band,
    and of the windows' functionals when they were gathered (a model with a linear model,
    ser.fusion), from how many windows."""

    bands: tuple[np.ndarray, np.ndarray]
    functionals: tuple[np.ndarray, np.ndarray] | None = None
    windows: int = 0

    def functional_statistics(self, training: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The (mean, std) the group's functionals are standardised by: its own; the spread of
        `training` (the average training speaker's) when it has fewer than MIN_SPREAD_WINDOWS
        windows; all of `training` when it has none (e.g. the average speaker itself)."""
        if self.functionals is None:
            return training
        mean, std = self.functionals
        return mean, std if self.windows >= MIN_SPREAD_WINDOWS else training[1]


class SpeakerStatistics:
    """Running per-band sums of each group's sounding frames (frames above the features'
    floor: padding and digital silence are left out; a group with fewer than two sounding
    frames falls back to all its frames), as ser.models.speaker_statistics computes them;
    and of its windows' functionals (ser.prosody), as ser.fusion.group_statistics does."""

    def __init__(self, n_mels: int, floor_db: float) -> None:
        self.n_mels, self.floor_db = n_mels, floor_db
        self.sums: dict[str, np.ndarray] = {}  # key -> (2 kinds: sounding, all) x (count, sum, sumsq) x mels
        self.functional_sums: dict[str, np.ndarray] = {}  # key -> (count, sum, sumsq) x functionals
        self.windows: dict[str, int] = {}

    def add(self, key: str, features: np.ndarray, functionals: np.ndarray | None = None) -> None:
        """features: (windows, mels, frames) in dB; functionals: (windows, functionals)."""
        frames = features.transpose(0, 2, 1).reshape(-1, self.n_mels).astype(np.float64)
        sounding = frames[frames.max(axis=1) > self.floor_db + 1e-3]
        acc = self.sums.setdefault(key, np.zeros((2, 3, self.n_mels)))
        self.windows[key] = self.windows.get(key, 0) + len(features)
        for kind, chosen in enumerate((sounding, frames)):
            acc[kind] += [np.full(self.n_mels, len(chosen)), chosen.sum(axis=0), (chosen ** 2).sum(axis=0)]
        if functionals is not None:
            f = functionals.astype(np.float64)
            self.functional_sums.setdefault(key, np.zeros((3, f.shape[1])))[:] += [
                np.full(f.shape[1], len(f)), f.sum(axis=0), (f ** 2).sum(axis=0)]

    def finish(self, min_windows: int = 1) -> dict[str, GroupStatistics]:
        """key -> the group's statistics, for the groups of at least `min_windows` windows: per
        band float32, std unbiased and at least 1e-3; of the functionals (when added) float64,
        std as numpy's and at least ser.fusion.STD_FLOOR."""
        from ser.fusion import STD_FLOOR

        result = {}
        for key, acc in self.sums.items():
            if self.windows[key] < min_windows:
                continue
            n, total, squares = acc[0] if acc[0, 0, 0] >= 2 else acc[1]
            mean = total / n
            var = np.maximum(squares - n * mean ** 2, 0) / max(n[0] - 1, 1)
            bands = (mean.astype(np.float32), np.maximum(np.sqrt(var), 1e-3).astype(np.float32))
            functionals = None
            if key in self.functional_sums:
                count, f_total, f_squares = self.functional_sums[key]
                f_mean = f_total / count
                functionals = (f_mean, np.maximum(np.sqrt(np.maximum(f_squares / count - f_mean ** 2, 0)), STD_FLOOR))
            result[key] = GroupStatistics(bands, functionals, self.windows[key])
        return result
