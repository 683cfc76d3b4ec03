import hashlib
import io
import stat
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from ser.archive import fetch, safe_extract
from ser.util import UserError

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()


class LocalServer:
    """An HTTP server on 127.0.0.1 in a thread, for one handler; close() stops it."""

    def serve(self, handler) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/archive.zip"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class RangeServer(LocalServer):
    """A local HTTP server for PAYLOAD that honours Range and can drop the connection
    part-way through the first response, to force a resume."""

    def __init__(self, cut_first_at: int | None = None, fail_first: int = 0) -> None:
        self.requests: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append(self.headers.get("Range"))
                if len(server.requests) <= fail_first:
                    self.send_error(503)
                    return
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
                else:
                    self.send_response(200)
                body = PAYLOAD[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if cut_first_at is not None and len(server.requests) == 1:
                    self.wfile.write(body[:cut_first_at])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # drop mid-body
                    return
                self.wfile.write(body)

        self.serve(Handler)


def _fetch(url, archive, md5=PAYLOAD_MD5, retries=3):
    fetch(url, archive, md5, retries=retries, backoff_s=0.01, timeout_s=5, chunk_bytes=65536)


def test_interrupted_download_resumes_with_range(tmp_path):
    server = RangeServer(cut_first_at=300_000)
    try:
        _fetch(server.url, tmp_path / "a.zip")
    finally:
        server.close()
    assert (tmp_path / "a.zip").read_bytes() == PAYLOAD
    assert server.requests[0] is None
    assert server.requests[1].startswith("bytes=") and int(server.requests[1][6:-1]) > 0
    assert not (tmp_path / "a.zip.part").exists()


def test_leftover_part_file_is_continued(tmp_path):
    (tmp_path / "a.zip.part").write_bytes(PAYLOAD[:1000])
    server = RangeServer()
    try:
        _fetch(server.url, tmp_path / "a.zip")
    finally:
        server.close()
    assert server.requests == ["bytes=1000-"]
    assert (tmp_path / "a.zip").read_bytes() == PAYLOAD


def test_server_errors_are_retried(tmp_path):
    server = RangeServer(fail_first=2)
    try:
        _fetch(server.url, tmp_path / "a.zip")
    finally:
        server.close()
    assert len(server.requests) == 3
    assert (tmp_path / "a.zip").read_bytes() == PAYLOAD


def test_wrong_checksum_leaves_nothing(tmp_path):
    server = RangeServer()
    try:
        with pytest.raises(UserError, match="checksum mismatch.*its md5 in download.archives"):
            _fetch(server.url, tmp_path / "a.zip", md5="0" * 32)
    finally:
        server.close()
    assert list(tmp_path.iterdir()) == []


def test_offline_gives_one_line_with_the_local_hint(tmp_path):
    # Port 9 on loopback: nothing listens, the connection is refused at once.
    with pytest.raises(UserError) as err:
        _fetch("http://127.0.0.1:9/archive.zip", tmp_path / "a.zip", retries=1)
    message = str(err.value)
    assert "cannot download" in message and "download.archives.ravdess.url=" in message and "\n" not in message
    assert not (tmp_path / "a.zip").exists()


def test_local_path_and_file_url(tmp_path):
    source = tmp_path / "src.zip"
    source.write_bytes(PAYLOAD)
    _fetch(str(source), tmp_path / "a.zip")
    assert (tmp_path / "a.zip").read_bytes() == PAYLOAD
    _fetch(source.as_uri(), tmp_path / "b.zip")
    assert (tmp_path / "b.zip").read_bytes() == PAYLOAD
    with pytest.raises(UserError, match="no such file"):
        _fetch(str(tmp_path / "missing.zip"), tmp_path / "c.zip")


def _zip(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


def test_safe_extract_extracts_the_tree(tmp_path):
    archive = _zip(tmp_path / "ok.zip", [("Actor_01/x.wav", b"1"), ("Actor_02/y.wav", b"2")])
    assert safe_extract(archive, tmp_path / "out") == 2
    assert (tmp_path / "out" / "Actor_02" / "y.wav").read_bytes() == b"2"


@pytest.mark.parametrize("name, reason", [
    ("../evil.wav", "'..' in path"),
    ("Actor_01/../../evil.wav", "'..' in path"),
    ("/etc/evil.wav", "absolute path"),
])
def test_safe_extract_refuses_escaping_members(tmp_path, name, reason):
    archive = _zip(tmp_path / "bad.zip", [("Actor_01/x.wav", b"1"), (name, b"evil")])
    with pytest.raises(UserError, match=f"refusing to extract member '{name}' \\({reason}\\)"):
        safe_extract(archive, tmp_path / "out" / "raw")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    assert not (tmp_path / "evil.wav").exists()


def test_safe_extract_refuses_symlinks(tmp_path):
    info = zipfile.ZipInfo("Actor_01/link.wav")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(info, "/etc/passwd")
    (tmp_path / "link.zip").write_bytes(buffer.getvalue())
    with pytest.raises(UserError, match="link.wav' \\(symbolic link\\)"):
        safe_extract(tmp_path / "link.zip", tmp_path / "out")


def test_not_a_zip_is_refused(tmp_path):
    (tmp_path / "x.zip").write_bytes(b"nope")
    with pytest.raises(UserError, match="not a zip archive"):
        safe_extract(tmp_path / "x.zip", tmp_path / "out")


def _bomb(path, declared_mb: int):
    """A zip of zeros: a few kB that declare declared_mb MB (deflate's best case is ~1000x)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("Actor_01/zeros.wav", "w", force_zip64=True) as f:
            for _ in range(declared_mb):
                f.write(bytes(1 << 20))
    return path


def test_a_zip_bomb_is_refused_before_anything_is_written(tmp_path):
    archive = _bomb(tmp_path / "bomb.zip", 64)
    assert archive.stat().st_size < 1 << 20
    with pytest.raises(UserError, match="would expand to .* over download.max_ratio 100"):
        safe_extract(archive, tmp_path / "out" / "raw")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.zip"]  # not even a temp folder


def test_declared_total_and_free_disk_are_checked_first(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    archive = _zip(tmp_path / "ok.zip", [("Actor_01/x.wav", bytes(3000)), ("Actor_02/y.wav", bytes(3000))])
    with pytest.raises(UserError, match="declares 0.0 GB of files, over download.max_extract_gb"):
        safe_extract(archive, tmp_path / "out", max_total_bytes=5000)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    with pytest.raises(UserError, match="needs 0.00 GB to extract, 0.00 GB free"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_member_that_holds_more_than_it_declares_is_refused(tmp_path):
    archive = _zip(tmp_path / "lie.zip", [("Actor_01/x.wav", b"a" * 5000)])
    data = bytearray(archive.read_bytes())
    # lower the declared size in both headers (local at 22, central directory at +24)
    central = data.rfind(b"PK\x01\x02")
    for offset in (22, central + 24):
        data[offset : offset + 4] = (100).to_bytes(4, "little")
    archive.write_bytes(bytes(data))
    with pytest.raises(UserError, match="(holds more than the 100 bytes it declares|is corrupt)"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_corrupt_member_gives_one_clear_message(tmp_path):
    archive = tmp_path / "corrupt.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("Actor_01/x.wav", np.random.default_rng(0).integers(0, 256, 40000, dtype=np.uint8).tobytes())
    data = bytearray(archive.read_bytes())
    start = 30 + len("Actor_01/x.wav")  # the member's compressed bytes
    data[start + 10 : start + 60] = bytes(50)
    archive.write_bytes(bytes(data))
    with pytest.raises(UserError, match="member 'Actor_01/x.wav' is corrupt \\(.*\\); fetch the archive again"):
        safe_extract(archive, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.zip"]


def test_md5_is_compared_as_lower_case_text(tmp_path):
    from ser.archive import normalise_md5

    source = tmp_path / "src.zip"
    source.write_bytes(PAYLOAD)
    _fetch(str(source), tmp_path / "a.zip", md5=PAYLOAD_MD5.upper())  # upper case: the same checksum
    assert (tmp_path / "a.zip").read_bytes() == PAYLOAD
    digits = "12345678901234567890123456789012"
    import yaml

    assert normalise_md5(yaml.safe_load(f"md5: {digits}")["md5"]) == digits  # YAML made it a number
    for bad in ("abc", None, "g" * 32, True):
        with pytest.raises(UserError, match="is not an md5 checksum"):
            normalise_md5(bad)


class EndlessServer(LocalServer):
    """A local HTTP server that sends bytes for ever, with no length (or a false, huge one)."""

    def __init__(self, declared: int | None = None) -> None:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.send_response(200)
                if declared is not None:
                    self.send_header("Content-Length", str(declared))
                self.end_headers()
                block = b"\0" * 65536
                try:
                    for _ in range(100_000):  # 6.5 GB at most: bounded even if the client never stops
                        self.wfile.write(block)
                except OSError:  # the client hung up: what it should do
                    pass

        self.serve(Handler)


@pytest.mark.parametrize("declared", [None, 10**12])
def test_a_download_is_bounded_whatever_the_server_sends(tmp_path, declared):
    server = EndlessServer(declared)
    try:
        with pytest.raises(UserError, match="more than download.max_extract_gb"):
            fetch(server.url, tmp_path / "a.zip", None, retries=2, backoff_s=0.01, timeout_s=5, chunk_bytes=65536,
                  max_bytes=2 << 20)
    finally:
        server.close()
    assert list(tmp_path.iterdir()) == []  # neither the archive nor a partial file


def test_a_local_archive_over_the_bound_is_refused(tmp_path):
    (tmp_path / "big.zip").write_bytes(b"\0" * (3 << 20))
    with pytest.raises(UserError, match="more than download.max_extract_gb"):
        fetch(str(tmp_path / "big.zip"), tmp_path / "a.zip", None, retries=0, backoff_s=0.01, timeout_s=5,
              chunk_bytes=65536, max_bytes=2 << 20)
    assert not (tmp_path / "a.zip").exists()


def _raw_zip(path, members):
    """A zip of (name, data) written as given: names zipfile itself would refuse to write twice."""
    import warnings

    with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as zf:
        warnings.simplefilter("ignore")  # "Duplicate name"
        for name, data in members:
            info = zipfile.ZipInfo(name)
            if name.endswith("/"):
                info.external_attr = (stat.S_IFDIR | 0o755) << 16 | 0x10
            zf.writestr(info, data)
    return path


@pytest.mark.parametrize("members, message", [
    ([("a.wav", b"1"), ("", b"2")], "refusing to extract member '' (empty name)"),
    ([("a.wav", b"1"), ("a.wav", b"2")], "refusing to extract member 'a.wav' (its name appears twice"),
    ([("x", b"1"), ("x/", b"")], "refusing to extract member 'x/' (its name appears twice"),
    ([("x", b"1"), ("x/y.wav", b"2")], "cannot extract member 'x/y.wav' (File exists)"),
    ([("/".join(["d"] * 2000) + "/a.wav", b"1")], "refusing to extract member 'd/d/d"),
])
def test_odd_members_are_one_clear_message_and_nothing_is_extracted(tmp_path, members, message):
    archive = _raw_zip(tmp_path / "odd.zip", members)
    with pytest.raises(UserError) as raised:
        safe_extract(archive, tmp_path / "out")
    assert message in str(raised.value) and len(str(raised.value)) < 600
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["odd.zip"]  # no temp folder left either
