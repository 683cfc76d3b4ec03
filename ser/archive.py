"""Fetch an archive (URL or local path), verify its md5, extract it safely.

Downloads stream into `<archive>.part` and resume with an HTTP Range request after an
interruption; the checksum is verified before the archive gets its final name. Extraction
refuses members that could escape the target and archives whose sizes are implausible."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm import tqdm

from ser.util import UserError, atomic_path

DISK_MARGIN_BYTES = 256 << 20  # left free after extracting, for everything else on the disk
MAX_MEMBER_DEPTH, MAX_MEMBER_NAME = 64, 1024  # past these a member's path is no corpus's (and breaks mkdir)
LOCAL_HINT = (
    "to use a local copy of the archive run: "
    "make repro ARCHIVE=path/to/archive.zip ARCHIVE_MD5=its_md5 "
    "(that is: dvc exp run -S download.archives.ravdess.url=... -S download.archives.ravdess.md5=...)"
)


def md5sum(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def _local_source(url: str) -> Path | None:
    """A local path for file:// URLs and plain paths; None for network URLs."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("http", "https"):
        return None
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # plain path (or a Windows drive letter)
        return Path(url)
    raise UserError(f"download.url: unsupported scheme '{parsed.scheme}' in {url}")


def _too_big(source: str, size: int, max_bytes: int) -> UserError:
    return UserError(f"{source}: {'declares' if size > 0 else 'sent'} more than download.max_extract_gb "
                     f"({max_bytes / 1e9:g} GB); refusing it (raise the limit if the archive is really that big)")


def _copy_local(src: Path, part: Path, chunk_bytes: int, max_bytes: int) -> None:
    """Copy `src` (a regular file: not a device or pipe that never ends) as it was when the
    copy began: a file that grows meanwhile is copied up to that size."""
    if not src.is_file():
        raise UserError(f"archive url: no such file {src}")
    done = part.stat().st_size if part.exists() else 0
    total = src.stat().st_size
    if total > max_bytes:
        raise _too_big(str(src), total, max_bytes)
    if done > total:
        part.unlink()
        done = 0
    with open(src, "rb") as fin, open(part, "ab") as fout, tqdm(
        total=total, initial=done, unit="B", unit_scale=True, desc=f"copy {src.name}"
    ) as bar:
        fin.seek(done)
        while done < total and (block := fin.read(min(chunk_bytes, total - done))):
            fout.write(block)
            done += len(block)
            bar.update(len(block))


def _http_once(url: str, part: Path, timeout_s: float, chunk_bytes: int, max_bytes: int) -> None:
    """One attempt: continue `part` from its current size (Range), or start over; at most
    max_bytes in all, whether the server says how many it sends or not."""
    done = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "ser-pipeline/1"})
    if done:
        request.add_header("Range", f"bytes={done}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as e:
        if e.code == 416 and done:  # nothing left to fetch: part is complete (checksum decides)
            return
        raise
    with response:
        if done and response.status != 206:  # server ignored Range: start again
            done = 0
        length = response.headers.get("Content-Length")
        total = done + int(length) if length and length.isdigit() else None
        if total is not None and total > max_bytes:
            raise _too_big(url, total, max_bytes)
        mode = "ab" if done else "wb"
        with open(part, mode) as fout, tqdm(
            total=total, initial=done, unit="B", unit_scale=True, desc="download"
        ) as bar:
            while block := response.read(chunk_bytes):
                done += len(block)
                if done > max_bytes:  # a server that sends no length, or more than it said
                    fout.close()
                    part.unlink()
                    raise _too_big(url, 0, max_bytes)
                fout.write(block)
                bar.update(len(block))
        if total is not None and part.stat().st_size < total:
            raise ConnectionError(f"connection closed at {part.stat().st_size} of {total} bytes")


def _retryable(e: Exception) -> bool:
    if isinstance(e, urllib.error.HTTPError):
        return e.code >= 500 or e.code in (408, 429)
    return isinstance(e, (urllib.error.URLError, ConnectionError, TimeoutError, OSError))


def fetch(url: str, archive: Path, md5: str | None, retries: int, backoff_s: float,
          timeout_s: float, chunk_bytes: int, max_bytes: int = 50 * 10**9) -> None:
    """Make `archive` a verified copy of `url`, of at most max_bytes; keep a partial download
    for resuming. md5 None (no published checksum): fetched afresh each time and not verified."""
    archive, md5 = Path(archive), None if md5 is None else normalise_md5(md5)
    archive.parent.mkdir(parents=True, exist_ok=True)
    if md5 is not None and archive.exists() and md5sum(archive) == md5:
        print(f"{archive}: already present, checksum ok")
        return
    part = archive.with_name(archive.name + ".part")
    if md5 is None:
        part.unlink(missing_ok=True)  # nothing to check a partial download against: start over
    source = _local_source(url)
    if source is not None:
        _copy_local(source, part, chunk_bytes, max_bytes)
    else:
        for attempt in range(retries + 1):
            try:
                _http_once(url, part, timeout_s, chunk_bytes, max_bytes)
                break
            except UserError:
                raise
            except Exception as e:
                if not _retryable(e) or attempt == retries:
                    reason = getattr(e, "reason", None) or e
                    raise UserError(f"cannot download {url} ({reason}); {LOCAL_HINT}") from None
                wait = backoff_s * 2 ** attempt
                print(f"download interrupted ({e}); retry {attempt + 1}/{retries} in {wait:.0f}s")
                time.sleep(wait)
    got = md5sum(part)
    if md5 is not None and got != md5:
        part.unlink()
        raise UserError(
            f"checksum mismatch for {url}: md5 {got}, expected {md5} (its md5 in download.archives); "
            f"the partial file was removed. If this is a different archive on purpose, "
            f"set its md5 in download.archives"
        )
    os.replace(part, archive)


def _unsafe_reason(info: zipfile.ZipInfo) -> str | None:
    name = info.filename
    if not name.strip("/"):
        return "empty name"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if ".." in parts:
        return "'..' in path"
    if len(parts) > MAX_MEMBER_DEPTH or len(name.encode("utf-8", "surrogateescape")) > MAX_MEMBER_NAME:
        return f"path over {MAX_MEMBER_DEPTH} folders deep or {MAX_MEMBER_NAME} bytes long"
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "symbolic link"
    return None


def check_sizes(archive: Path, members: list[zipfile.ZipInfo], out_dir: Path, max_total_bytes: int,
                max_ratio: float) -> int:
    """Refuse an archive before extracting anything when what its members declare is too
    big in all, expands too much (a zip bomb: kilobytes that declare gigabytes), or does not
    fit on the disk. Returns the declared total in bytes."""
    total = sum(info.file_size for info in members)
    packed = max(1, archive.stat().st_size)
    if total > max_total_bytes:
        raise UserError(f"{archive}: declares {total / 1e9:.1f} GB of files, over download.max_extract_gb "
                        f"({max_total_bytes / 1e9:g} GB); refusing to extract")
    if total / packed > max_ratio:
        raise UserError(f"{archive}: {packed} bytes would expand to {total} ({total / packed:.0f}x, over "
                        f"download.max_ratio {max_ratio:g}): a zip bomb or not an audio archive; refusing to extract")
    parent = out_dir.parent if out_dir.parent.exists() else Path(".")
    free = shutil.disk_usage(parent).free
    if total + DISK_MARGIN_BYTES > free:
        raise UserError(f"{archive}: needs {total / 1e9:.2f} GB to extract, {free / 1e9:.2f} GB free in {parent}")
    return total


def _copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, archive: Path) -> int:
    """Copy one member, counting its bytes against what it declared; a corrupt member gives
    one clear message."""
    written = 0
    try:
        with zf.open(info) as src, open(target, "wb") as dst:
            while block := src.read(1 << 20):
                written += len(block)
                if written > info.file_size:
                    raise UserError(f"{archive}: member '{info.filename}' holds more than the "
                                    f"{info.file_size} bytes it declares; refusing it")
                dst.write(block)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
        raise UserError(f"{archive}: member '{info.filename}' is corrupt ({e}); fetch the archive again") from None
    return written


def safe_extract(archive: Path, out_dir: Path, max_total_bytes: int = 50 * 10**9, max_ratio: float = 100.0) -> int:
    """Extract every member into out_dir, refusing the whole archive if any member could
    escape it (absolute path, '..', link) or if its sizes are implausible (check_sizes).
    Nothing reaches out_dir unless all of it extracted. Returns the number of files."""
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise UserError(f"{archive}: not a zip archive") from None
    with zf:
        members = zf.infolist()
        seen: set[str] = set()
        for info in members:
            reason = _unsafe_reason(info)
            if info.filename.rstrip("/") in seen:
                reason = "its name appears twice: one would replace the other"
            seen.add(info.filename.rstrip("/"))
            if reason:
                raise UserError(f"{archive}: refusing to extract member '{info.filename[:200]}' ({reason})")
        check_sizes(archive, members, out_dir, max_total_bytes, max_ratio)
        with atomic_path(out_dir) as tmp:
            tmp.mkdir()
            count = 0
            for info in tqdm(members, desc="extract", unit="file"):
                target = tmp / info.filename
                try:
                    if info.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    _copy_member(zf, info, target, archive)
                except OSError as e:  # a file and a folder of one name, a path too long, a full disk
                    raise UserError(f"{archive}: cannot extract member '{info.filename[:200]}' "
                                    f"({e.strerror or e}); nothing was extracted") from None
                count += 1
    return count


def normalise_md5(md5: Any) -> str:
    """An archive's md5 as lower-case hex text: upper case is the same checksum, and YAML reads
    an all-digit md5 as a number."""
    text = str(md5) if isinstance(md5, int) and not isinstance(md5, bool) else str(md5 or "").strip().lower()
    if not re.fullmatch(r"[0-9a-f]{32}", text):
        raise UserError(f"archive md5: {md5!r} is not an md5 checksum (32 hex digits); "
                        f"quote it in params.yaml: md5: \"<32 hex digits>\"")
    return text
