"""The labeller's outputs: the tables (one row per file, one per window), an output path
checked before any work so that nothing of the user's is overwritten, and the writing (whole
or not at all; text made writable and safe to open in a spreadsheet).
"""
from __future__ import annotations

import csv
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ser.audio import AUDIO_EXTENSIONS
from ser.util import UserError, atomic_path

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class Table:
    """Rows (dicts) under named columns: what the labeller writes; pandas only on request."""
    columns: list[str]
    rows: list[dict[str, Any]]

    def to_frame(self) -> "pd.DataFrame":
        import pandas as pd

        return pd.DataFrame(self.rows, columns=self.columns)


def file_table(classes: list[str], rows: list[dict[str, Any]]) -> Table:
    """The labeller's output columns: one row per file."""
    return Table(["path", "status", "error", "emotion", "confidence", "uncertain", *[f"prob_{c}" for c in classes],
                  "duration_s", "normalised_by", "speaker_group", "adapted"], rows)


def segment_table(classes: list[str], rows: list[dict[str, Any]]) -> Table:
    """The --segments columns: one row per window."""
    return Table(["path", "start_s", "end_s", "emotion", "confidence", *[f"prob_{c}" for c in classes]], rows)


def write_table(table: Table, out: str | Path) -> None:
    """CSV (floats to 5 decimals, missing values empty) or, by extension, Parquet. CSV is
    written without pandas, whose import costs the labeller ~0.5 s of its critical path.
    Text is made writable first (printable_text); CSV cells are also kept from reading as
    spreadsheet formulas (csv_safe)."""
    out = Path(out)
    with atomic_path(out) as tmp:
        if out.suffix.lower() == ".parquet":
            rows = [{c: printable_text(v) if isinstance(v, str) else v for c, v in row.items()} for row in table.rows]
            Table(table.columns, rows).to_frame().to_parquet(tmp, index=False)
            return
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow([csv_safe(c) for c in table.columns])
            writer.writerows([_csv_cell(row.get(c)) for c in table.columns] for row in table.rows)


# A spreadsheet reads a cell that starts with one of these as a formula (OWASP: CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def printable_text(text: str) -> str:
    """`text` as valid UTF-8: bytes of a file name that are not UTF-8 (Python keeps them as
    surrogates) become \\xNN, as `ls -b` shows them, instead of failing the whole write."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no file name produces
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def csv_safe(text: str) -> str:
    """printable_text, with a leading ' where a spreadsheet would run the cell as a formula."""
    text = printable_text(text)
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def _csv_cell(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        return "" if math.isnan(value) else f"{value:.5f}"
    if isinstance(value, str):
        return csv_safe(value)
    return "" if value is None else value


def check_output(out: str | Path, inputs: list[str], model_path: str | Path,
                 keep: list[str | Path] = ()) -> None:
    """Refuse, before any work, an output path that would destroy something: an existing
    directory, the current folder or a parent of it, an input, the model, a file named in
    `keep` (a speaker manifest), a name with an audio extension, a link or a special file
    (the rename would replace /dev/null or the link itself); and one that cannot be written
    (checked by creating a temp file there)."""
    path = Path(out)
    resolved, here = path.resolve(), Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise UserError(f"output {out}: is the current folder or a parent of it; give a file name such as labels.csv")
    if path.is_dir():
        raise UserError(f"output {out}: is an existing directory; give a file name such as {path / 'labels.csv'}")
    if any(resolved == Path(item).resolve() for item in inputs):
        raise UserError(f"output {out}: is one of the inputs; give another file name")
    if resolved == Path(model_path).resolve():
        raise UserError(f"output {out}: is the model file; give another file name")
    if any(resolved == Path(item).resolve() for item in keep):
        raise UserError(f"output {out}: is the speaker manifest (--speakers); give another file name")
    if path.suffix.lower() in AUDIO_EXTENSIONS:
        raise UserError(f"output {out}: has an audio extension; labels are written as .csv or .parquet")
    if path.is_symlink():
        raise UserError(f"output {out}: is a symbolic link; the output would replace the link, not write "
                        f"through it: give the file's own path ({resolved})")
    if path.exists() and not path.is_file():
        raise UserError(f"output {out}: exists and is not a regular file (a device, pipe or socket); "
                        "give a file name such as labels.csv")
    try:
        resolved.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=resolved.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"output {out}: cannot write in {resolved.parent} ({e.strerror or e})") from None
