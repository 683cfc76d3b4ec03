"""A trained model as one object: loaded once from a model file, it carries everything that
decides its probabilities (feature settings, normalisation and the average training
speaker's statistics, temperature, the linear model fused with the CNN) and gives the fused
class probabilities of windows. The labeller, the page, the cluster's workers, evaluate and
cross-validation all hear audio through it; adaptation (ser.adaptation) tunes a copy of its
network's BatchNorm.

Like a torchaudio pipeline bundle, it is the one thing a model file becomes: nothing above
this module rebuilds a model from a file's record.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ser.audio import FeatureParams, LogMel
from ser.fusion import LinearHead, fused_log_probs
from ser.grouping import GroupStatistics
from ser.modelfile import is_fused
from ser.models import TemperatureScaled, fused_copy, infer, load_checkpoint


class TrainedModel:
    """`network`: the CNN (or ensemble) without its temperature, unfused, so that adaptation
    can tune it; `extra`: the model file's record (temperature, fusion, normalisation,
    population, recipe...). `inference` is the network fused for speed, made on first use."""

    def __init__(self, network: torch.nn.Module, classes: list[str], feature_params: FeatureParams,
                 extra: dict[str, Any], arch: dict[str, Any] | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.network, self.classes, self.feature_params = network.eval(), list(classes), feature_params
        self.extra, self.arch, self.device = dict(extra), dict(arch or {}), torch.device(device)
        self.temperature: float | None = self.extra.get("temperature")  # None: probabilities uncalibrated
        # the labels' probabilities softened by this for recordings from corpora never heard (ser.calibration)
        self.unseen_temperature = float(self.extra.get("unseen_temperature") or 1.0)
        self.head = LinearHead.from_record(self.extra.get("fusion"))
        self.normalisation: str = self.extra.get("normalisation", "clip")
        self._inference: torch.nn.Module | None = None

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> "TrainedModel":
        """The model of a file written by ser.models.save_checkpoint; ModelFileError says why not."""
        model, meta = load_checkpoint(path, device, fuse=False)
        network = model.model if isinstance(model, TemperatureScaled) else model
        return cls(network, meta["classes"], meta["feature_params"], meta["extra"], meta["arch"], device)

    def scaled(self) -> torch.nn.Module:
        """The trainable network with its temperature applied to its logits."""
        return TemperatureScaled(self.network, self.temperature) if self.temperature else self.network

    @property
    def inference(self) -> torch.nn.Module:
        """scaled(), fused for inference (ser.models.EmotionCNN.fuse_for_inference): the same
        labels, faster; the network itself stays trainable."""
        if self._inference is None:
            self._inference = fused_copy(self.scaled())
        return self._inference

    @property
    def uses_functionals(self) -> bool:
        """Whether a linear model on the functionals takes part (ser.fusion)."""
        return is_fused(self.extra)

    @property
    def by_speaker(self) -> bool:
        """Whether the model hears each clip relative to its speaker's statistics."""
        return self.normalisation == "speaker"

    @property
    def population(self) -> GroupStatistics | None:
        """The average training speaker's (mean, std) per band, if the file has them (its
        functionals' are the linear model's own, LinearHead.population)."""
        population = self.extra.get("population")
        if population is None:
            return None
        mean, std = (np.asarray(v, dtype=np.float32) for v in population)
        return GroupStatistics((mean, std))

    def extractor(self, precision: str = "float32") -> LogMel:
        """The features this model hears (the functionals only when its linear model takes part);
        on a GPU the encoder runs there, batched, and the CPU workers compute the rest."""
        return LogMel(self.feature_params, functionals=self.uses_functionals, encoder_precision=precision,
                      encoder_device=str(self.device) if self.device.type == "cuda" else None)

    def probabilities(self, x: torch.Tensor, z: np.ndarray | None, batch_size: int,
                      precision: str = "float32", network: torch.nn.Module | None = None) -> np.ndarray:
        """Class probabilities of windows: the CNN's on x (normalised as the model hears them),
        fused with the linear model's on standardised functionals z. `network`: another
        (e.g. adapted) version of scaled() to use instead of `inference`."""
        logits = infer(self.inference if network is None else network, x, batch_size, self.device, precision)
        return fused_log_probs(logits, z, self.head).exp().numpy()


def scored_probs(model: torch.nn.Module, head: LinearHead | None, x: torch.Tensor, z: np.ndarray | None,
                 batch_size: int, device: torch.device, temperature: float = 1.0) -> torch.Tensor:
    """The fused log-probabilities (ser.fusion) of the CNN on input x (its logits divided by
    `temperature`) and the linear model on standardised functionals z."""
    return fused_log_probs(infer(model, x, batch_size, device) / temperature, z, head)
