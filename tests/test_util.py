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
