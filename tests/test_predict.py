import os

import numpy as np
import pandas as pd
import soundfile as sf
import pytest

from conftest import write_tone
from stages.labels import EMOTIONS
from stages.predict import main, prepare


def _run(args):
    return main([str(a) for a in args])


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "in"
    write_tone(d / "good.wav", seconds=1.5)
    write_tone(d / "sub" / "stereo_44k.flac", seconds=1.0, sr=44100, channels=2)
    write_tone(d / "sub" / "ünïcødé 声音.wav", seconds=1.0)
    (d / "empty.wav").write_bytes(b"")
    (d / "text.wav").write_text("this is not audio\n")
    (d / "dir.wav").mkdir()
    os.symlink(d / "nowhere.wav", d / "broken.wav")
    sf.write(str(d / "silent.wav"), np.zeros(16000, dtype=np.int16), 16000)
    write_tone(d / "tiny.wav", seconds=0.05)
    truncated = write_tone(d / "truncated.wav", seconds=1.0).read_bytes()
    (d / "truncated.wav").write_bytes(truncated[:30])  # header cut short
    (d / "readme.txt").write_text("ignored: not an audio extension")
    return d


def test_every_file_gets_one_row_in_path_order_and_exit_code_1(folder, tiny_checkpoint, tmp_path):
    out = tmp_path / "out.csv"
    assert _run([folder, "-o", out, "--model", tiny_checkpoint, "--jobs", "2", "--batch-size", "2"]) == 1
    frame = pd.read_csv(out)
    names = [p.split("/in/")[1] for p in frame["path"]]
    assert names == sorted(names) and len(names) == 10
    assert list(frame.columns) == ["path", "status", "error", "emotion", "confidence",
                                   *[f"prob_{c}" for c in EMOTIONS], "duration_s"]
    by_name = dict(zip(names, frame.itertuples()))
    for ok in ("good.wav", "sub/stereo_44k.flac", "sub/ünïcødé 声音.wav"):
        row = by_name[ok]
        assert row.status == "ok" and row.emotion in EMOTIONS and pd.isna(row.error)
        probs = frame.loc[frame["path"] == row.path, [f"prob_{c}" for c in EMOTIONS]].to_numpy()
        assert probs.sum() == pytest.approx(1.0, abs=1e-3) and row.confidence == pytest.approx(probs.max(), abs=1e-4)
    expected = {"empty.wav": "empty file", "text.wav": "not readable audio", "dir.wav": "is a directory",
                "broken.wav": "broken symbolic link", "silent.wav": "silent", "tiny.wav": "too short",
                "truncated.wav": "not readable audio"}
    for name, reason in expected.items():
        row = by_name[name]
        assert row.status == "error" and reason in row.error and name in row.error and pd.isna(row.emotion)


def test_all_good_gives_exit_0_and_parquet_by_extension(tmp_path, tiny_checkpoint):
    write_tone(tmp_path / "a.wav")
    write_tone(tmp_path / "b.ogg", subtype="VORBIS")
    out = tmp_path / "out.parquet"
    assert _run([tmp_path / "a.wav", tmp_path / "b.ogg", "-o", out, "--model", tiny_checkpoint]) == 0
    frame = pd.read_parquet(out)
    assert frame["status"].tolist() == ["ok", "ok"]


def test_labels_do_not_come_from_file_names(tmp_path, tiny_checkpoint):
    """The same audio under two RAVDESS names with different emotions gets the same label."""
    write_tone(tmp_path / "03-01-05-01-01-01-01.wav", freq=300)
    write_tone(tmp_path / "03-01-04-01-01-01-01.wav", freq=300)
    out = tmp_path / "o.csv"
    _run([tmp_path, "-o", out, "--model", tiny_checkpoint])
    frame = pd.read_csv(out)
    probs = frame[[f"prob_{c}" for c in EMOTIONS]].to_numpy()
    assert (probs[0] == probs[1]).all()


def test_usage_errors_exit_2(tmp_path, tiny_checkpoint, capsys):
    assert _run([tmp_path / "missing", "-o", tmp_path / "o.csv", "--model", tiny_checkpoint]) == 2
    assert "input not found" in capsys.readouterr().err
    write_tone(tmp_path / "a.wav")
    assert _run([tmp_path / "a.wav", "-o", tmp_path / "o.csv", "--model", tmp_path / "nope.pt"]) == 2
    assert not (tmp_path / "o.csv").exists()


def test_permission_denied_is_an_error_row(tmp_path, feature_params, monkeypatch):
    from stages.audio import LogMel

    path = write_tone(tmp_path / "locked.wav")
    monkeypatch.setattr(os, "access", lambda p, mode: False)
    features, _, error = prepare(path, LogMel(feature_params), 0.1, 1e-4)
    assert features is None and error == f"{path}: permission denied"
