"""Small helpers every stage uses: params, atomic writes, seeding, device choice."""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import yaml

PARAMS_FILE = Path("params.yaml")


class UserError(Exception):
    """A problem the user can fix (bad input, missing file); printed as one line, no traceback."""


def load_params(section: str, path: Path = PARAMS_FILE) -> dict[str, Any]:
    """Return one section of params.yaml; each stage reads only its own."""
    with open(path, encoding="utf-8") as f:
        params = yaml.safe_load(f)
    if section not in params:
        raise UserError(f"{path}: no '{section}' section")
    return params[section]


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `target`; rename it onto `target` only if the block succeeds.

    Works for files and directories: a half-written output never carries the final name.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    os.unlink(tmp)  # the caller creates a file or a directory there
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.is_dir():
            shutil.rmtree(tmp_path, ignore_errors=True)
        elif tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def seed_everything(seed: int) -> None:
    """Same params, same numbers: seed Python, NumPy and torch, and ask torch for determinism."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def pick_device(preference: str = "auto") -> "torch.device":
    """CUDA when present (or asked for), else CPU."""
    import torch

    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{preference}' requested but CUDA is not available")
    return torch.device(preference)


def run_main(main) -> None:
    """Run a stage's main(); user errors become one clear line and exit code 1."""
    import sys

    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
