"""Who is who: each file's speaker group (ser.grouping), what the model's input is normalised
by, and each group's statistics (with a sample of its windows to adapt on), gathered in a first
pass over a sample of each group's files before the model's pass over every file.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from tqdm import tqdm

from ser.audio import FeatureParams
from ser.grouping import MIN_GROUP_WINDOWS, GroupStatistics, SpeakerStatistics, speaker_keys, statistics_sample
from ser.labeller.settings import Settings
from ser.labeller.stream import FeatureStream

if TYPE_CHECKING:
    from ser.trained import TrainedModel


# With --adapt, the model adapts to a seeded sample of at most ser.adaptation.SAMPLE_SIZE windows of
# each speaker group, and of ADAPT_MAX_WINDOWS in all (~50 kB each): bounded memory however many groups.
ADAPT_MAX_WINDOWS = 8192


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


def normalised_by(normalisation: str, has_population: bool, speakers: str) -> str:
    """What the model's input was standardised by: clip (a clip-normalised model: each clip
    itself), population (a speaker model with no grouping: the average training speaker;
    window for an old model file without those statistics) or the grouping (all, file, folder,
    manifest); a group too small for statistics of its own is heard as population (per row)."""
    if normalisation != "speaker":
        return "clip"
    if speakers == "none":
        return "population" if has_population else "window"
    return speakers if speakers in ("all", "file", "folder") else "manifest"


def first_pass_paths(paths: list[Path], normalisation: str | None, speakers: str, groups: list[str] | None,
                     s: Settings) -> list[Path] | None:
    """The files of the labeller's first pass: a speaker model's grouped run reads a sample of
    each group's files for the statistics (grouping.statistics_sample), then every file;
    None: no first pass, every file is read once."""
    if normalisation == "speaker" and groups is not None:
        return statistics_sample(paths, groups, s.max_group_files)
    return None


def adapt_sample_cap(n_groups: int) -> int:
    """Windows kept per group to adapt on: at most SAMPLE_SIZE, and ADAPT_MAX_WINDOWS in all."""
    from ser.adaptation import SAMPLE_SIZE

    return max(1, min(SAMPLE_SIZE, ADAPT_MAX_WINDOWS // max(1, n_groups)))


def first_pass(sample: list[Path], keys: list[str], stream: Iterable[dict[str, Any]], fp: FeatureParams, s: Settings,
               cap: int) -> tuple[Statistics, Any]:
    """(each group's statistics, the windows kept to adapt on or None) from the features of a
    sample of each group's files (`keys`: each sample file's group)."""
    window_sample = None
    if s.adapt:
        from ser.adaptation import WindowSample

        window_sample = WindowSample(cap)
    return gather_statistics(sample, keys, stream, fp, s.min_group_windows, window_sample), window_sample


def speaker_setup(paths: list[Path], trained: "TrainedModel", s: Settings, stream: FeatureStream | None,
                  speakers: str, calibration: GroupStatistics | None,
                  groups: list[str] | None = None, heard: Statistics | None = None
                  ) -> tuple[str, dict[str, str], Statistics, Iterable[dict[str, Any]], Any]:
    """(what the input is normalised by, each path's speaker group, each group's statistics,
    the stream the model's pass reads, the windows kept to adapt the model to each group or
    None): a grouping's statistics (and with s.adapt, a sample of its windows) come from a
    first pass over a sample of each group's files, and a stream over every file then serves the model.
    `stream`: None, or started by the caller over first_pass_paths() or every path (run() does, so the
    workers start before torch loads). `groups`: each path's speaker group already read from
    `speakers` (a cluster worker gets them, not the manifest). `heard`: each group's statistics
    found by a first pass elsewhere (a cluster's): no first pass here."""
    extractor = trained.extractor(s.precision)
    population = trained.population
    used, statistics = normalised_by(trained.normalisation, population is not None, speakers), {}
    if calibration is not None and used != "clip":
        used, statistics = "calibration", {"calibration": calibration}
        keys: list[str] | None = ["calibration"] * len(paths)
    else:
        keys = None if used in ("clip", "window", "population") else (
            groups if groups is not None else speaker_keys(paths, speakers))
    key_of = {} if keys is None else {str(p): k for p, k in zip(paths, keys)}
    window_sample = None
    if keys is not None and used != "calibration" and heard is not None:
        statistics = {k: v for k, v in heard.items() if k is not None}
    elif keys is not None and used != "calibration":
        sample = statistics_sample(paths, keys, s.max_group_files)
        if stream is not None and stream.paths != sample:
            raise ValueError("the caller's stream must be over first_pass_paths()")
        first = stream if stream is not None else FeatureStream(sample, extractor, s, then=paths)
        if first.then != paths:
            raise ValueError("the caller's second pass must be over every path")
        statistics, window_sample = first_pass(sample, [key_of[str(p)] for p in sample], first, extractor.fp, s,
                                               adapt_sample_cap(len(set(keys))))
        stream = first.next_pieces()  # every file, for the model's pass (begun on the same workers)
    results = stream if stream is not None else FeatureStream(paths, extractor, s)
    if population is not None and used not in ("clip", "calibration"):
        statistics[None] = population  # no group, or one too small for its own: the average speaker
    return used, key_of, statistics, results, window_sample


def heard_as(used: str, key: str | None, statistics: Statistics) -> str:
    """What one file was normalised by: the run's `used`, or for a group too small for
    statistics of its own the average training speaker (population; window for an old model)."""
    if used in ("clip", "window", "calibration") or (key is not None and key in statistics):
        return used
    return "population" if None in statistics else "window"
