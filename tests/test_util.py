import json
import os

import pytest

from ser.util import OUTPUT_MARKER, UserError, atomic_path, remove_stale_temps, run_stage, write_json


def test_atomic_path_leaves_nothing_when_the_block_fails(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_path_replaces_a_directory_it_wrote_whole(tmp_path):
    target = tmp_path / "dir"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "stale").write_text("x")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "fresh").write_text("y")
    assert sorted(p.name for p in target.iterdir()) == [OUTPUT_MARKER, "fresh"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"]  # no temp left beside it


def test_atomic_path_never_deletes_a_directory_it_did_not_write(tmp_path):
    users = tmp_path / "photos"
    users.mkdir()
    (users / "holiday.jpg").write_text("precious")
    for make in (lambda tmp: tmp.write_text("csv"), lambda tmp: tmp.mkdir()):
        with pytest.raises(UserError, match="did not write"):
            with atomic_path(users) as tmp:
                make(tmp)
        assert (users / "holiday.jpg").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


def test_atomic_path_refuses_a_directory_that_appears_meanwhile(tmp_path):
    target = tmp_path / "out.csv"
    with pytest.raises(UserError, match="did not write"):
        with atomic_path(target) as tmp:
            tmp.write_text("csv")
            target.mkdir()
            (target / "keep").write_text("k")
    assert (target / "keep").read_text() == "k"


def test_atomic_path_refuses_a_file_onto_a_directory_it_wrote(tmp_path):
    target = tmp_path / "dir"
    with atomic_path(target) as tmp:
        tmp.mkdir()
    with pytest.raises(UserError, match="refusing to replace it with a file"):
        with atomic_path(target) as tmp:
            tmp.write_text("x")
    assert (target / OUTPUT_MARKER).is_file()


def test_stale_temps_of_dead_runs_are_removed_and_live_ones_kept(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".raw.{dead_pid}.abc.tmp"
    (stale / "Actor_01").mkdir(parents=True)
    (stale / "Actor_01" / "big.wav").write_bytes(b"0" * 1000)
    live = tmp_path / f".raw.{os.getpid()}.xyz.tmp"
    live.mkdir()
    other = tmp_path / ".raw.notapid.tmp"
    other.mkdir()
    assert remove_stale_temps(tmp_path / "raw") == [stale]
    assert not stale.exists() and live.exists() and other.exists()
    with atomic_path(tmp_path / "raw") as tmp:  # and atomic_path does it itself
        tmp.mkdir()
    assert live.exists()


def test_write_json_and_run_stage(tmp_path, capsys):
    write_json(tmp_path / "m.json", {"a": 1})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1}

    def failing() -> None:
        raise UserError("train.classes: unknown class set 'seven'")

    with pytest.raises(SystemExit) as stop:
        run_stage(failing)
    assert stop.value.code == 1 and capsys.readouterr().err == "error: train.classes: unknown class set 'seven'\n"


def test_atomic_path_never_replaces_a_device_or_pipe(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="is a device, pipe or socket"):
        with atomic_path(fifo) as tmp:
            tmp.write_text("x")
    assert fifo.is_fifo() and [p.name for p in tmp_path.iterdir()] == ["pipe"]


def test_a_full_disk_in_a_stage_is_one_line(capsys):
    import errno

    def stage():
        raise OSError(errno.ENOSPC, "No space left on device", "data/features/x.npy")

    with pytest.raises(SystemExit) as stopped:
        run_stage(stage)
    assert stopped.value.code == 1
    assert capsys.readouterr().err == ("error: data/features/x.npy: No space left on device; "
                                       "nothing half-written was kept\n")

    def bug():
        raise OSError(errno.EBADF, "Bad file descriptor")

    with pytest.raises(OSError):  # other OSErrors are bugs: their traceback is wanted
        run_stage(bug)


def test_a_text_table_reads_nulls_and_empty_cells_as_empty_text(tmp_path):
    import pandas as pd

    from ser.util import read_text_table

    pd.DataFrame({"a": ["x", None], "b": [1, 2]}).to_parquet(tmp_path / "t.parquet")
    (tmp_path / "t.csv").write_text("a,b\nx,1\n,2\n")
    for name in ("t.parquet", "t.csv"):
        table = read_text_table(tmp_path / name, name)
        assert table.to_dict("list") == {"a": ["x", ""], "b": ["1", "2"]}


def test_loopback_is_decided_on_every_resolved_address(monkeypatch):
    import socket

    from ser.util import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.9.9.9")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("no-such-host.invalid")
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0)),
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::1", 0, 0, 0))])
    assert not is_loopback("half-local.example")  # one address elsewhere is enough to be reachable
