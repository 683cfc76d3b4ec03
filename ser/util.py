"""Small helpers of the whole library: atomic writes, seeding, device choice, user errors, tables, hosts."""
from __future__ import annotations

import errno
import ipaddress
import json
import os
import random
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

if TYPE_CHECKING:
    import pandas as pd


class UserError(Exception):
    """A problem the user can fix (bad input, missing file); printed as one line, no traceback."""


# An output directory that atomic_path wrote carries this file: only such a directory is ever
# replaced. Anything else at an output path (a user's folder, `-o .`) is refused, not deleted.
OUTPUT_MARKER = ".written-by-ser"


def _temp_prefix(target: Path) -> str:
    return f".{target.name}."


def remove_stale_temps(target: str | os.PathLike) -> list[Path]:
    """Remove temp files and folders that atomic_path left beside `target` in a run that was
    killed (its process id is in the name and no longer alive). Returns what was removed."""
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for leftover in target.parent.glob(f"{_temp_prefix(target)}*.tmp"):
        pid = leftover.name[len(_temp_prefix(target)):].split(".", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            removed.append(leftover)
    return removed


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def check_replaceable(target: str | os.PathLike) -> None:
    """Raise UserError unless `target` is absent, a file or link, or a directory that
    atomic_path wrote: a directory of the user's, or a device (/dev/null), is never replaced."""
    target = Path(target)
    if target.is_dir() and not target.is_symlink() and not (target / OUTPUT_MARKER).is_file():
        raise UserError(f"{target}: is an existing directory that this pipeline did not write; "
                        "refusing to replace it (choose another output path)")
    if target.exists() and not target.is_symlink() and not target.is_dir() and not target.is_file():
        raise UserError(f"{target}: is a device, pipe or socket; refusing to replace it (choose another output path)")


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `target`; rename it onto `target` only if the block succeeds.

    Works for files and directories: a half-written output never carries the final name.
    A directory written here gets OUTPUT_MARKER; an existing directory at `target` is
    replaced only if it has one (else UserError, before and after the block), so nothing
    of the user's is ever deleted. Temps of killed earlier runs are removed first.
    """
    target = Path(target)
    check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    fd, tmp = tempfile.mkstemp(prefix=f"{_temp_prefix(target)}{os.getpid()}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    os.unlink(tmp)  # the caller creates a file or a directory there
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if not tmp_path.exists():
            raise FileNotFoundError(f"{target}: nothing was written")
        check_replaceable(target)  # it may have appeared meanwhile
        if tmp_path.is_dir():
            (tmp_path / OUTPUT_MARKER).write_text("written by the ser pipeline; safe to replace\n")
        if target.is_dir() and not target.is_symlink():
            if not tmp_path.is_dir():
                raise UserError(f"{target}: is a directory; refusing to replace it with a file")
            old = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(target)}{os.getpid()}.", suffix=".tmp",
                                        dir=target.parent))
            os.replace(target, old / "old")  # out of the way first: the new one lands whole
            os.replace(tmp_path, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_path, target)
    finally:
        if tmp_path.is_dir() and not tmp_path.is_symlink():
            shutil.rmtree(tmp_path, ignore_errors=True)
        elif tmp_path.exists() or tmp_path.is_symlink():
            tmp_path.unlink()


def is_loopback(host: str) -> bool:
    """Whether every address `host` resolves to is this machine's loopback (127.0.0.0/8, ::1);
    decided on the resolved addresses, not the name's text. An unresolvable host is not."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), None)
    except (OSError, UnicodeError):
        return False
    addresses = {info[4][0].split("%")[0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """JSON, indented, written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def read_text_table(path: str | os.PathLike, what: str) -> "pd.DataFrame":
    """A CSV (UTF-8) or, by extension, Parquet table with every cell as text: an empty cell
    and a Parquet null are both "" (never the text "None"). A file that is not such a table
    is a UserError that starts with `what` (how the user named it, e.g. "--speakers x.csv")."""
    import pandas as pd

    path = Path(path)
    try:
        table = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(
            path, dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError:
        raw = path.read_bytes()
        try:
            raw.decode("utf-8")
            where = "somewhere"
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            where = f"line {line}, byte {e.start}"
        raise UserError(f"{what}: not UTF-8 text ({where}); save it as UTF-8") from None
    except (OSError, ValueError) as e:  # pandas' and pyarrow's parse errors are ValueErrors
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{what}: cannot be read as a table ({reason})") from None
    return table.astype(object).where(table.notna(), "").astype(str)


def seed_everything(seed: int) -> None:
    """Same params, same numbers: seed Python, NumPy and torch, and ask torch for determinism."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


# OSErrors that are the machine's state, not a bug: one line, not a traceback
MACHINE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); user errors (and a full or read-only disk) become one clear line
    and exit code 1."""
    import sys

    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        if e.errno not in MACHINE_ERRNOS:
            raise
        print(f"error: {e.filename or 'a write'}: {e.strerror}; nothing half-written was kept", file=sys.stderr)
        sys.exit(1)
