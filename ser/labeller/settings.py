"""The labeller's settings, defined once: the command line's defaults, what params.yaml's
`predict` section may set (Settings.from_dict names any key it does not know), and the checks."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ser.calibration import UNCERTAIN_BELOW
from ser.device import PRECISIONS
from ser.grouping import MAX_GROUP_FILES, MIN_GROUP_WINDOWS
from ser.util import UserError

DEFAULT_MODEL = "data/model/model.pt"  # what `make repro` trains


@dataclass(frozen=True)
class Settings:
    batch_size: int = 64  # windows per forward pass
    n_jobs: int = -1  # decoding/feature worker processes (-1: all cores)
    min_duration_s: float = 0.1  # shorter files are refused
    silence_peak: float = 1e-4  # a window whose peak is below this is silent
    segment_s: float = 6.0  # recordings longer than this are cut into windows of this length
    hop_s: float = 3.0  # step between windows
    max_queued_windows: int = 4096  # features computed ahead of the model, at most (bounds memory)
    precision: str = "auto"  # float32 | bfloat16 | int8 (the encoder's) | auto (ser.device.encoder_precision)
    max_duration_s: float = 14400.0  # longer files are refused from their header (bounds the work per file)
    min_sample_rate: int = 4000  # files below this rate are refused (a 1 Hz header makes thousands of windows)
    uncertain_below: float = UNCERTAIN_BELOW  # a less confident file label is flagged uncertain (ser.calibration)
    min_group_windows: int = MIN_GROUP_WINDOWS  # a smaller speaker group is heard as the average speaker
    max_group_files: int = MAX_GROUP_FILES  # a group's statistics come from at most this many of its files
    adapt: bool = True  # the model adapted to each speaker group's windows before labelling them (ser.adaptation)
    soften: bool = True  # probabilities softened for corpora the model never heard (ser.calibration.soften)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Settings":
        """Settings from a mapping such as params.yaml's `predict` section without its run
        options; a key that is not a setting is an error, a missing one takes its default."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"unknown labeller setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**d).checked()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def checked(self) -> "Settings":
        """These settings, or a UserError naming the first that cannot work."""
        for name in ("batch_size", "segment_s", "hop_s", "max_duration_s", "max_group_files", "max_queued_windows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise UserError(f"{name} must be a positive number, not {value!r}")
        if self.precision not in PRECISIONS:
            raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        for name in ("adapt", "soften"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name} must be true or false, not {getattr(self, name)!r}")
        return self


DEFAULTS = Settings()
