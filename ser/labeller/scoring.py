"""Scoring windows: each piece's windows normalised as the model hears them (by its speaker
group's statistics, or the average training speaker's), scored by the trained model or by its
adaptation to the piece's group (ser.adaptation), fused with the linear model.

torch is imported inside the functions: the labeller's feature workers start before it loads.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from ser.fusion import LinearHead, standardise
from ser.grouping import GroupStatistics
from ser.labeller.settings import Settings
from ser.labeller.speakers import Statistics

if TYPE_CHECKING:
    import torch

    from ser.adaptation import GroupModels
    from ser.trained import TrainedModel


States = dict[str, tuple[dict[str, Any], float]]  # group -> its adapted BatchNorm values, matched temperature


def group_models(trained: "TrainedModel", used: str, statistics: Statistics, window_sample: Any, s: Settings,
                 states: States | None = None) -> "GroupModels":
    """The model each group is heard by (ser.adaptation.GroupModels): with s.adapt, adapted to
    every group that has statistics of its own from its kept windows (normalised as the model
    hears them), else the trained one. `states`: the adaptations found elsewhere (a cluster's
    first pass) instead."""
    from ser.adaptation import GroupModels

    return GroupModels(trained, adapted_states(trained, used, statistics, window_sample, s) if states is None
                       else states)


def adapted_states(trained: "TrainedModel", used: str, statistics: Statistics, window_sample: Any, s: Settings
                   ) -> States:
    """Each group's adaptation (ser.adaptation.adapted_state) to its kept windows, for every group
    with statistics of its own and at least MIN_CLIPS windows kept. On one thread, whatever the
    machine: the backward passes' sums are split by thread, so a local run on all cores and a
    cluster worker on one would adapt a little apart (in bfloat16, enough to move a near tie)."""
    import torch

    from ser.adaptation import MIN_CLIPS, adapted_state

    states = {}
    keys = [] if window_sample is None else [k for k in window_sample.kept if k in statistics]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for key in tqdm(keys, desc="adapt to speakers", unit="group", disable=not keys):
            features, functionals = window_sample.windows(key)
            if len(features) < MIN_CLIPS:
                continue
            piece = {"features": features, "functionals": functionals}
            z = None if trained.head is None else functional_input([piece], [statistics[key]], trained.head)
            states[key] = adapted_state(trained, model_input([piece], used, [statistics[key]]), z, s.precision)
    finally:
        torch.set_num_threads(threads)
    return states


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


def adapted_window_probabilities(models: "GroupModels", pieces: list[dict[str, Any]], keys: list[str | None],
                                 used: str, stats: list[GroupStatistics | None], s: Settings) -> np.ndarray:
    """Class probabilities of the pieces' windows (the CNN's fused with the linear model's, each
    piece heard relative to its `stats`) by each piece's group's model (`models`; `keys`: each
    piece's group), in the pieces' order."""
    keys = [k if models.adapted(k) else None for k in keys]
    trained, by_piece = models.trained, [np.empty(0)] * len(pieces)
    for key in dict.fromkeys(keys):
        chosen = [i for i, k in enumerate(keys) if k == key]
        part, part_stats = [pieces[i] for i in chosen], [stats[i] for i in chosen]
        z = None if trained.head is None else functional_input(part, part_stats, trained.head)
        probs = trained.probabilities(model_input(part, used, part_stats), z, s.batch_size, s.precision,
                                      network=models.model_for(key))
        offsets = np.cumsum([0] + [len(piece["features"]) for piece in part])
        for j, i in enumerate(chosen):
            by_piece[i] = probs[offsets[j] : offsets[j + 1]]
    return np.concatenate(by_piece)
