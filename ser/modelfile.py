"""A model file's class list and feature params, read without importing torch.

Importing torch takes 2-3 s on our 2-core machines, longer than computing the features of
a thousand clips. The batch labeller reads the feature params here, starts its feature
workers, and only then imports torch to load the weights (ser.models.load_checkpoint),
so the two overlap.
"""
from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ser.audio import FeatureParams


def _no_tensor(*args: Any, **kwargs: Any) -> None:
    return None


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles torch.save's data.pkl with every tensor replaced by None. Like
    torch.load(weights_only=True) it resolves only an allow-list of names, so a file
    cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _no_tensor
        if module == "torch" and name.endswith("Storage"):
            return None  # a storage type tag, only passed to persistent_load
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a model file")

    def persistent_load(self, pid: Any) -> None:
        return None


def is_fused(extra: dict[str, Any]) -> bool:
    """Whether a model file's extra record has a linear model that takes part (ser.fusion)."""
    return bool((extra.get("fusion") or {}).get("fusion_weight"))


def read_model_info(path: str | Path) -> dict[str, Any] | None:
    """{"classes", "feature_params", "normalisation", "fused", "population", "unseen_temperature"} of a
    model file written by ser.models.save_checkpoint (fused: it has a linear model on functionals, ser.fusion;
    population: it has the average training speaker's statistics), or None
    when it cannot be read this way (ser.models.load_checkpoint then says why)."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            with archive.open(name) as f:
                checkpoint = _MetadataUnpickler(f).load()
        extra = dict(checkpoint.get("extra") or {})
        return {"classes": list(checkpoint["classes"]),
                "feature_params": FeatureParams.from_dict(checkpoint["feature_params"]),
                "normalisation": extra.get("normalisation", "clip"), "fused": is_fused(extra),
                "population": extra.get("population") is not None,
                "unseen_temperature": float(extra.get("unseen_temperature") or 1.0)}
    except Exception:  # any problem: fall back to the full, checked load
        return None
