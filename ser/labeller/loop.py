"""The labelling loop: files in, one row per file and one per window out. Labels never come
from file names.

One row per input file, in path order; a file that cannot be labelled gets status `error`
and the reason instead of stopping the run. Decoding and features run in parallel worker
processes (ser.labeller.stream); inference is batched; memory is bounded by
max_queued_windows, however many files. Each file is heard relative to its speaker group
(ser.labeller.speakers), by the model adapted to that group when asked (ser.labeller.scoring).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from ser.calibration import soften
from ser.grouping import GroupStatistics
from ser.labeller.output import Table, file_table, segment_table
from ser.labeller.scoring import States, adapted_states, adapted_window_probabilities, group_models
from ser.labeller.settings import Settings
from ser.labeller.speakers import Statistics, first_pass, heard_as, speaker_setup
from ser.labeller.stream import FeatureStream

if TYPE_CHECKING:
    import pandas as pd

    from ser.trained import TrainedModel


def label_rows(paths: list[Path], trained: "TrainedModel", s: Settings,
               stream: FeatureStream | None = None, speakers: str = "none",
               calibration: GroupStatistics | None = None, groups: list[str] | None = None,
               heard: tuple[Statistics, States] | None = None) -> tuple[Table, Table]:
    """(one row per file, one row per window). Workers decode and compute features in
    parallel (`stream`, started by the caller or here); windows are batched for the model as
    they arrive, a long file's pieces included; a file's label averages its windows'
    probabilities, so only a bounded number of windows is ever held in memory.
    A speaker-normalised model hears each file relative to its speaker group (`speakers`,
    ser.grouping), whose statistics are gathered in a first pass; or relative to one
    speaker's `calibration` statistics (the page's "calibrate to my voice"); with neither,
    each window relative to its own. `heard`: each group's statistics and adaptation from a first
    pass elsewhere (hear_groups on a cluster's workers), so that a group's files can be labelled
    in several shards and each gets what the local run gives."""
    classes = trained.classes
    used, key_of, statistics, results, sample = speaker_setup(paths, trained, s, stream, speakers, calibration, groups,
                                                              None if heard is None else heard[0])
    models = group_models(trained, used, statistics, sample, s, None if heard is None else heard[1])
    prob_columns = [f"prob_{c}" for c in classes]
    rows: list[dict[str, Any]] = []
    sums: list[np.ndarray] = []  # per file: the sum of its windows' probabilities, and their count
    counts: list[int] = []
    segments: list[dict[str, Any]] = []
    pending: list[tuple[int, dict[str, Any]]] = []

    def flush() -> None:
        pieces = [r for _, r in pending]
        stats = [statistics.get(key_of.get(r["path"]), statistics.get(None)) for r in pieces]
        probs = adapted_window_probabilities(models, pieces, [key_of.get(r["path"]) for r in pieces], used, stats, s)
        if s.soften:  # honest on corpora never heard, not only on its training corpora's held-out speakers
            probs = soften(probs, trained.unseen_temperature)
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
                key = key_of.get(piece["path"])
                rows.append(new_row(piece, prob_columns, heard_as(used, key, statistics), key, models.adapted(key)))
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


def new_row(piece: dict[str, Any], prob_columns: list[str], used: str, key: str | None, adapted: bool
            ) -> dict[str, Any]:
    """A file's row before its windows are scored: an error until they are."""
    return {"path": piece["path"], "status": "error", "error": "", "emotion": None, "confidence": math.nan,
            **{c: math.nan for c in prob_columns},
            "duration_s": math.nan if piece["duration"] is None else piece["duration"],
            "normalised_by": used, "speaker_group": key or "", "adapted": adapted}


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


def label_files(paths: list[Path], trained: "TrainedModel", s: Settings, stream: FeatureStream | None = None,
                speakers: str = "none", calibration: GroupStatistics | None = None
                ) -> tuple["pd.DataFrame", "pd.DataFrame"]:
    """label_rows as DataFrames (one row per file, one row per window)."""
    files, segments = label_rows(paths, trained, s, stream, speakers, calibration)
    return files.to_frame(), segments.to_frame()


def hear_groups(sample: list[Path], keys: list[str], trained: "TrainedModel", s: Settings, cap: int, used: str,
                speakers: str) -> tuple[Statistics, States, Table, Table]:
    """The first pass of a grouped run on its own (a cluster worker's share of it): the statistics
    and adaptations of the groups of `sample` (a sample of each group's files, as
    grouping.statistics_sample draws it; `keys`: each file's group; `cap`: windows kept a group),
    and the sample's files labelled with them, as label_rows would (file rows, window rows): their
    features, computed for the statistics, serve the labels too (within s.max_queued_windows)."""
    stream = FeatureStream(sample, trained.extractor(s.precision), s, then=sample)
    statistics, window_sample = first_pass(sample, keys, stream, trained.feature_params, s, cap)
    states = adapted_states(trained, used, statistics, window_sample, s)
    pieces = stream.next_pieces()  # the sample again: the pieces the first pass kept, then the rest
    files, segments = label_rows(sample, trained, s, pieces, speakers, groups=keys,  # type: ignore[arg-type]
                                 heard=(statistics, states))
    return statistics, states, files, segments
