from pathlib import Path
import os

import numpy as np
import pandas as pd
import soundfile as sf
import pytest

from bench.hostile import as_in_a_terminal, descendants, gone
from conftest import fused_model, write_tone
from ser.corpora import EMOTIONS
from ser.grouping import statistics_sample
from ser.audio import LogMel, window_bounds
from ser.labeller.cli import main
from ser.labeller.output import write_table
from ser.labeller.output import Table
from ser.labeller.reading import prepare
from ser.labeller.settings import Settings
from ser.labeller.stream import FILES_PER_TASK, WINDOWS_PER_TASK, FeatureStream
from ser.labeller.workers import worker_context

SETTINGS = Settings(batch_size=16, n_jobs=1, min_duration_s=0.1, silence_peak=1e-4, segment_s=6.0, hop_s=3.0,
                    max_queued_windows=256, precision="float32", adapt=False)


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
    assert list(frame.columns) == ["path", "status", "error", "emotion", "confidence", "uncertain",
                                   *[f"prob_{c}" for c in EMOTIONS], "duration_s",
                                   "normalised_by", "speaker_group", "adapted"]
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


def test_all_good_gives_exit_0_and_parquet_by_extension(tmp_path, tiny_checkpoint, monkeypatch):
    write_tone(tmp_path / "a.wav")
    write_tone(tmp_path / "b.ogg", subtype="VORBIS")
    out = tmp_path / "out.parquet"
    monkeypatch.chdir(tmp_path)  # a CLI run writes only what it is told: no segments file
    assert _run([tmp_path / "a.wav", tmp_path / "b.ogg", "-o", out, "--model", tiny_checkpoint]) == 0
    frame = pd.read_parquet(out)
    assert frame["status"].tolist() == ["ok", "ok"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "b.ogg", "model.pt", "out.parquet"]


def test_audio_that_cannot_be_read_gets_an_error_row_saying_how_to_convert_it(tmp_path, tiny_checkpoint):
    """A folder's MP3 and Opus files are labelled; an AAC (.m4a) file and an MP3 too long for one
    read (its decoder is not exact read in parts) get a row saying to convert them, not silence."""
    d = tmp_path / "in"
    write_tone(d / "short.mp3", seconds=2.0, sr=44100, subtype="MPEG_LAYER_III")
    write_tone(d / "long.mp3", seconds=8.0, sr=44100, subtype="MPEG_LAYER_III")
    write_tone(d / "note.opus", seconds=1.0, sr=48000, subtype="OPUS", format="OGG")
    (d / "voice.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(200))
    (d / "notes.txt").write_text("not audio: left alone")
    out = tmp_path / "out.csv"
    assert _run([d, "-o", out, "--model", tiny_checkpoint]) == 1
    frame = pd.read_csv(out)
    rows = {Path(path).name: row for path, row in zip(frame["path"], frame.itertuples())}
    assert sorted(rows) == ["long.mp3", "note.opus", "short.mp3", "voice.m4a"]
    assert rows["short.mp3"].status == "ok" and rows["note.opus"].status == "ok"
    assert rows["long.mp3"].status == "error" and "ffmpeg -i in.mp3 out.wav" in rows["long.mp3"].error
    assert rows["voice.m4a"].status == "error" and "ffmpeg -i in.m4a out.wav" in rows["voice.m4a"].error


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
    write_tone(tmp_path / "in.wav")
    with pytest.raises(SystemExit) as exit_info:  # inputs without -o
        _run([tmp_path / "in.wav", "--model", tiny_checkpoint])
    assert exit_info.value.code == 2
    assert _run([tmp_path / "missing", "-o", tmp_path / "o.csv", "--model", tiny_checkpoint]) == 2
    assert "input not found" in capsys.readouterr().err
    (tmp_path / "empty_dir").mkdir()
    assert _run([tmp_path / "empty_dir", "-o", tmp_path / "o.csv", "--model", tiny_checkpoint]) == 2
    assert "no audio files" in capsys.readouterr().err
    write_tone(tmp_path / "a.wav")
    assert _run([tmp_path / "a.wav", "-o", tmp_path / "o.csv", "--model", tmp_path / "nope.pt"]) == 2
    assert not (tmp_path / "o.csv").exists()


def test_permission_denied_is_an_error_row(tmp_path, feature_params, monkeypatch):
    path = write_tone(tmp_path / "locked.wav")
    monkeypatch.setattr(os, "access", lambda p, mode: False)
    result = prepare(path, LogMel(feature_params), SETTINGS)
    assert result["features"] is None and result["error"] == f"{path}: permission denied"


def test_the_workers_compute_the_functionals_only_for_a_model_that_fuses_them(tmp_path, feature_params):
    path = write_tone(tmp_path / "a.wav", seconds=8.0)
    fused, plain = (prepare(path, LogMel(feature_params, functionals=f), SETTINGS) for f in (True, False))
    assert fused["functionals"].shape[0] == len(fused["features"]) == 2 and plain["functionals"] is None
    np.testing.assert_array_equal(fused["features"], plain["features"])


def test_window_bounds():
    assert window_bounds(4.0, 6.0, 3.0) == [(0.0, 4.0)]
    assert window_bounds(13.0, 6.0, 3.0) == [(0.0, 6.0), (3.0, 9.0), (6.0, 12.0), (7.0, 13.0)]
    assert window_bounds(12.0, 6.0, 3.0) == [(0.0, 6.0), (3.0, 9.0), (6.0, 12.0)]


def test_long_recording_gets_a_timeline_and_one_file_label(tmp_path, tiny_checkpoint):
    write_tone(tmp_path / "call.wav", seconds=20.0, sr=8000)
    out, seg = tmp_path / "o.csv", tmp_path / "seg.csv"
    assert _run([tmp_path / "call.wav", "-o", out, "--segments", seg, "--model", tiny_checkpoint]) == 0
    frame, segments = pd.read_csv(out), pd.read_csv(seg)
    assert len(frame) == 1 and frame["duration_s"][0] == pytest.approx(20.0)
    assert segments["start_s"].tolist() == [0, 3, 6, 9, 12, 14]
    assert segments["end_s"].tolist() == [6, 9, 12, 15, 18, 20]
    probs = [f"prob_{c}" for c in EMOTIONS]
    # the file's probabilities are the mean over its windows
    assert frame[probs].to_numpy()[0] == pytest.approx(segments[probs].mean().to_numpy(), abs=1e-4)


def test_ten_minute_recording_is_read_window_by_window(tmp_path, feature_params):
    import tracemalloc

    path = tmp_path / "long.wav"
    rng = np.random.default_rng(0)
    with sf.SoundFile(str(path), "w", 48000, 2, "PCM_16") as f:  # 10 min, 48 kHz stereo: 110 MB
        for _ in range(60):
            f.write((0.1 * rng.standard_normal((480000, 2))).astype(np.float32))
    tracemalloc.start()
    result = prepare(path, LogMel(feature_params), SETTINGS)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert result["error"] == "" and len(result["features"]) == 199
    # decoding the whole file as float32 would take 230 MB; windows and features stay far below
    assert peak < 40e6, peak


def test_feature_stream_keeps_order_and_bounds_what_it_holds(tmp_path, feature_params):
    paths = [write_tone(tmp_path / f"{i:03d}.wav", seconds=0.5 + (i % 3) * 0.3, freq=200 + 10 * i) for i in range(40)]
    extractor = LogMel(feature_params)
    settings = Settings(**{**SETTINGS.__dict__, "n_jobs": 2, "max_queued_windows": 3 * FILES_PER_TASK})
    stream = FeatureStream(paths, extractor, settings)
    assert stream.workers == 2 and stream.pool is not None  # started before iteration
    results = []
    for result in stream:
        # never more than max_queued_windows // FILES_PER_TASK tasks handed out ahead
        assert len(stream.pending) <= 3
        results.append(result)
    assert stream.pool is None  # workers shut down at the end
    assert len(results) == len(paths)
    for path, result in zip(paths, results):
        np.testing.assert_array_equal(result["features"], prepare(path, extractor, settings)["features"])


def test_a_second_pass_runs_on_the_same_workers_within_the_same_bound(tmp_path, feature_params):
    paths = [write_tone(tmp_path / f"{i:03d}.wav", seconds=0.5, freq=200 + 10 * i) for i in range(40)]
    extractor = LogMel(feature_params)
    settings = Settings(**{**SETTINGS.__dict__, "n_jobs": 2, "max_queued_windows": 4 * WINDOWS_PER_TASK})
    first = FeatureStream(paths[:12], extractor, settings, then=paths)
    second = first.next_pass
    assert second.pool is first.pool is not None and second.paths == paths[12:]  # the first 12: kept, not read again
    assert len(first.pending) == 2 and len(second.pending) == 2  # 4 tasks in all, the first pass's first
    firsts = []
    for result in first:
        assert len(first.pending) + len(second.pending) <= 4
        firsts.append(result)
    assert first.pool is None and second.pool is not None  # the first pass leaves the workers running
    seconds = list(first.next_pieces())
    assert second.pool is None  # the last pass shuts them down
    assert [r["path"] for r in seconds] == [str(p) for p in paths] and seconds[:12] == firsts  # the same objects
    for path, result in zip(paths[:12] + paths, firsts + seconds):
        assert result["path"] == str(path)
        np.testing.assert_array_equal(result["features"], prepare(path, extractor, settings)["features"])
    crowded = FeatureStream(paths[:32], extractor, settings, then=paths)  # the first pass fills the bound
    assert len(crowded.next_pass.pending) == 0
    assert len(list(crowded)) == 32 and len(list(crowded.next_pieces())) == len(paths)
    stopped = FeatureStream(paths[:12], extractor, settings, then=paths)
    pool = stopped.pool
    stopped.close_passes(kill=True)  # an error before either pass is read: the workers stop
    assert stopped.pool is None and stopped.next_pass.pool is None and pool._shutdown_thread


def test_the_first_passs_pieces_are_reused_within_the_bound_and_the_second_pass_keeps_path_order(tmp_path,
                                                                                                  feature_params):
    """A sample spread over the folder: its files are not read again (the second pass computes
    the others), the merged pieces come in path order; a file whose windows would not fit the
    bound, and a FIFO (never opened here), are read by the second pass instead."""
    from ser.labeller.stream import kept_for_next_pass

    paths = [write_tone(tmp_path / f"{i:03d}.wav", seconds=0.5 + (20 if i == 9 else 0), freq=200 + 10 * i)
             for i in range(20)]
    os.mkfifo(tmp_path / "020.wav")
    paths.append(tmp_path / "020.wav")
    sample = paths[::3] + [paths[20]]  # 000 003 ... 018 and the FIFO; 009 is 20 s: 6 windows
    settings = Settings(**{**SETTINGS.__dict__, "n_jobs": 2, "max_queued_windows": 8})
    assert kept_for_next_pass(sample, paths, settings) == {str(p) for p in sample[:3] + sample[4:7]}
    extractor = LogMel(feature_params)
    first = FeatureStream(sample, extractor, settings, then=paths)
    assert [str(p) for p in first.next_pass.paths] == [str(p) for p in paths if str(p) not in first.keep]
    firsts = list(first)
    seconds = list(first.next_pieces())
    assert [r["path"] for r in seconds if r["first"]] == [str(p) for p in paths]
    assert first.kept == {}  # handed over
    assert len(seconds) == len(paths)  # one piece a file here
    for result in seconds[:-1]:
        np.testing.assert_array_equal(result["features"], prepare(Path(result["path"]), extractor, settings)["features"])
    assert sum(r is f for r in seconds for f in firsts) == 6  # the kept pieces themselves, not copies
    assert "020.wav" in seconds[-1]["path"] and "empty file" in seconds[-1]["error"]


def test_workers_fork_only_when_safe():
    import sys as _sys

    assert "torch" in _sys.modules  # pytest has loaded it: a fork server, not a plain fork
    assert worker_context().get_start_method() == "forkserver"


def test_csv_and_parquet_hold_the_same_table(tmp_path):
    """The CSV writer (no pandas) and the Parquet one (pandas) agree, missing values included;
    CSV floats have 5 decimals and awkward text is quoted."""
    rows = [{"path": 'a, "b".wav', "status": "ok", "error": "", "emotion": "calm", "confidence": 0.123456789,
             "duration_s": np.float32(1.5)},
            {"path": "ünï 声.wav", "status": "error", "error": "x: too short", "emotion": None,
             "confidence": float("nan"), "duration_s": float("nan")}]
    table = Table(["path", "status", "error", "emotion", "confidence", "duration_s"], rows)
    write_table(table, tmp_path / "t.csv")
    write_table(table, tmp_path / "t.parquet")
    text = (tmp_path / "t.csv").read_text(encoding="utf-8")
    assert text.splitlines()[1] == '"a, ""b"".wav",ok,,calm,0.12346,1.50000'
    assert text.splitlines()[2] == "ünï 声.wav,error,x: too short,,,"
    from_csv = pd.read_csv(tmp_path / "t.csv", keep_default_na=False, na_values=[""])
    from_parquet = pd.read_parquet(tmp_path / "t.parquet")
    assert from_csv["path"].tolist() == from_parquet["path"].tolist() == [r["path"] for r in rows]
    np.testing.assert_allclose(from_csv["confidence"], from_parquet["confidence"], atol=5e-6)
    assert from_parquet["emotion"].isna().tolist() == from_csv["emotion"].isna().tolist() == [False, True]


def test_openmp_threads_sleep_while_waiting_unless_the_user_says_otherwise():
    """Set before torch loads (libgomp reads it then), so torch's idle threads do not spin on
    the feature workers' cores; a user's own setting is kept."""
    import subprocess
    import sys as _sys

    from conftest import ROOT

    code = "import os, ser.labeller.cli, torch; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    for preset, expected in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        run_env = env if preset is None else {**env, "OMP_WAIT_POLICY": preset}
        done = subprocess.run([_sys.executable, "-c", code], cwd=ROOT, env=run_env, capture_output=True, text=True)
        assert done.stdout.strip() == expected, done.stderr


def test_command_line_with_worker_processes(folder, tiny_checkpoint, tmp_path):
    """The real entry point in a fresh process (workers by fork, torch loaded meanwhile)."""
    import subprocess
    import sys as _sys

    from conftest import ROOT

    out = tmp_path / "cli.csv"
    done = subprocess.run([_sys.executable, "-m", "ser", "label", str(folder), "-o", str(out),
                           "--model", str(tiny_checkpoint), "--jobs", "2"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    frame = pd.read_csv(out)
    assert len(frame) == 10 and (frame["status"] == "ok").sum() == 3
    # the process ends without interpreter teardown (exit_now): its buffered output still arrives
    assert f"predict: 3 of 10 files labelled -> {out}" in done.stdout
    assert done.stderr.count("  error: ") == 7


# ---- hostile inputs, outputs that must never destroy anything, interrupts ----------------

def test_hostile_headers_get_error_rows_not_allocations(tmp_path, tiny_checkpoint):
    """A 55 kB FLAC claiming 2^36 frames and a 12 kB WAV at 1 Hz are refused from their
    headers; a long (valid) recording over max_duration_s too. Peak memory is measured in a
    fresh process, against the same run on one ordinary clip."""
    from bench.hostile import make_hostile_folder, peak_rss_mb

    make_hostile_folder(tmp_path / "in", silence_s=600)
    write_tone(tmp_path / "ordinary" / "clip.wav", seconds=3.0)
    out = tmp_path / "o.csv"
    common = ["--model", str(tiny_checkpoint), "--max-duration-s", "300", "--jobs", "2"]
    hostile_mb, code, _ = peak_rss_mb(["label", str(tmp_path / "in"), "-o", str(out), *common])
    ordinary_mb, ordinary_code, _ = peak_rss_mb(["label", str(tmp_path / "ordinary"), "-o",
                                                 str(tmp_path / "ordinary.csv"), *common])
    assert (code, ordinary_code) == (1, 0)
    frame = pd.read_csv(out).set_index(pd.read_csv(out)["path"].map(lambda p: p.split("/")[-1]))
    assert "implausible header: 68719476735 frames claimed in a file of" in frame.loc["header_bomb.flac", "error"]
    assert "sample rate 1 Hz is below the minimum of 4000 Hz" in frame.loc["one_hertz.wav", "error"]
    assert "too long (600 s > 300 s" in frame.loc["long_silence.flac", "error"]
    assert (frame["status"] == "error").all()
    assert hostile_mb - ordinary_mb < 50, (hostile_mb, ordinary_mb)  # believed, the headers would cost gigabytes


def test_a_long_file_streams_in_pieces_with_the_same_labels(tmp_path, tiny_checkpoint, monkeypatch):
    """Windows of one file reach the model piece by piece (a task holds at most
    WINDOWS_PER_TASK of them): same file label and segments as in one piece."""
    from ser.labeller import stream
    from ser.labeller.loop import label_rows
    from ser.trained import TrainedModel

    paths = [write_tone(tmp_path / "a_long.wav", seconds=40.0, sr=8000, freq=300),
             write_tone(tmp_path / "b_short.wav", seconds=2.0), write_tone(tmp_path / "c_long.wav", seconds=31.0)]
    trained = TrainedModel.load(tiny_checkpoint)
    whole = label_rows(paths, trained, SETTINGS)
    monkeypatch.setattr(stream, "WINDOWS_PER_TASK", 3)
    pieces = list(stream.FeatureStream(paths, LogMel(trained.feature_params), SETTINGS))
    # 40 s: 13 windows (3+3+3+3+1); 2 s: 1 (the task's budget goes on); 31 s: 10 (1+3+3+3)
    assert [p["windows_read"] for p in pieces] == [3, 3, 3, 3, 1, 1, 1, 3, 3, 3]
    assert max(len(p["starts"]) for p in pieces) <= 3
    streamed = label_rows(paths, trained, SETTINGS)
    assert [r["path"] for r in streamed[0].rows] == [str(p) for p in paths]
    for a, b in zip(whole[0].rows, streamed[0].rows):
        assert a["emotion"] == b["emotion"] and a["confidence"] == pytest.approx(b["confidence"], abs=1e-6)
    assert [(s["path"], s["start_s"]) for s in whole[1].rows] == [(s["path"], s["start_s"]) for s in streamed[1].rows]


def test_a_model_file_with_absurd_feature_params_is_refused(tmp_path, feature_params):
    import dataclasses

    from ser.corpora import EMOTIONS
    from ser.models import build_model, save_checkpoint
    from conftest import TINY_ARCH

    write_tone(tmp_path / "a.wav")
    bad = dataclasses.replace(feature_params, duration_s=1e5)  # every clip would allocate 6 GiB
    save_checkpoint(tmp_path / "bad.pt", build_model(TINY_ARCH, bad.n_mels, 8), TINY_ARCH, EMOTIONS, bad, extra={})
    assert _run([tmp_path / "a.wav", "-o", tmp_path / "o.csv", "--model", tmp_path / "bad.pt"]) == 2
    assert not (tmp_path / "o.csv").exists()


@pytest.mark.parametrize("target", ["existing_dir", "dot", "parent", "input_file", "input_dir", "model", "audio_name"])
def test_an_output_that_would_destroy_something_is_refused_before_any_work(tmp_path, tiny_checkpoint, monkeypatch,
                                                                           capsys, target):
    work = tmp_path / "work"
    inputs = work / "in"
    song = write_tone(inputs / "song.wav")
    (work / "results").mkdir()
    (work / "results" / "mine.txt").write_text("keep me")
    monkeypatch.chdir(work)
    out = {"existing_dir": "results", "dot": ".", "parent": "..", "input_file": str(song), "input_dir": "in",
           "model": str(tiny_checkpoint), "audio_name": "labels.wav"}[target]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert _run([inputs, "-o", out, "--model", tiny_checkpoint]) == 2
    assert f"output {out}:" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing touched


def test_an_unwritable_output_is_found_before_labelling(tmp_path, tiny_checkpoint, capsys):
    write_tone(tmp_path / "a.wav")
    (tmp_path / "plain_file").write_text("x")
    for out in ("/proc/labels.csv", str(tmp_path / "plain_file" / "labels.csv")):
        assert _run([tmp_path / "a.wav", "-o", out, "--model", tiny_checkpoint]) == 2
        err = capsys.readouterr().err
        assert f"output {out}: cannot write in" in err and "files labelled" not in err


def _start_labelling(folder: Path, out: Path, model: Path):
    import subprocess
    import sys as _sys
    import time

    from conftest import ROOT

    proc = subprocess.Popen([_sys.executable, "-m", "ser", "label", str(folder), "-o", str(out), "--model",
                             str(model), "--jobs", "2"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=as_in_a_terminal)
    try:
        deadline = time.time() + 60
        while len(descendants(proc.pid)) < 2 and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(3)  # torch loaded, labelling under way
        workers = descendants(proc.pid)
        assert proc.poll() is None, proc.communicate()
        assert len(workers) >= 2
    except BaseException:  # never leave a labeller running behind a failed test
        os.killpg(proc.pid, 9)
        proc.communicate(timeout=30)
        raise
    return proc, workers


@pytest.fixture(scope="module")
def many_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("many")
    for i in range(400):
        write_tone(folder / f"{i:04d}.wav", seconds=30.0, sr=8000, freq=150 + i % 200)
    # 400 files alone took 3-5 s with a tiny model (2026-12-04), so the labeller could finish before
    # the interrupt; links, each labelled as a file, make it ~50 s without writing more audio
    for i in range(400, 4000):
        os.symlink(folder / f"{i % 400:04d}.wav", folder / f"{i:04d}.wav")
    return folder


def test_ctrl_c_stops_labelling_leaves_no_worker_and_keeps_the_old_output(many_files, tiny_checkpoint, tmp_path):
    import signal
    import time

    out = tmp_path / "labels.csv"
    out.write_text("the previous run's labels\n")
    for _ in range(3):
        proc, workers = _start_labelling(many_files, out, tiny_checkpoint)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
        sent = time.time()
        _, err = proc.communicate(timeout=30)
        stopped_s = time.time() - sent
        assert proc.returncode == 130, err
        assert "interrupted: nothing written" in err and "Traceback" not in err
        time.sleep(0.5)
        assert all(gone(pid) for pid in workers), workers
        assert out.read_text() == "the previous run's labels\n"
        assert stopped_s < 2, stopped_s  # measured 0.06-0.32 s (bench/bench_hostile.py)


def test_workers_die_with_a_killed_labeller(many_files, tiny_checkpoint, tmp_path):
    import signal
    import time

    proc, workers = _start_labelling(many_files, tmp_path / "labels.csv", tiny_checkpoint)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    deadline = time.time() + 10
    while not all(gone(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert all(gone(pid) for pid in workers), workers
    assert not (tmp_path / "labels.csv").exists()


def test_an_old_speaker_model_without_population_statistics_labels_each_window_by_itself(tmp_path, feature_params,
                                                                                           capsys):
    from conftest import TINY_ARCH
    from ser.models import build_model, save_checkpoint

    model = build_model({**TINY_ARCH, "utterance_norm": False}, feature_params.n_mels, len(EMOTIONS))
    save_checkpoint(tmp_path / "spk.pt", model, {**TINY_ARCH, "utterance_norm": False}, EMOTIONS, feature_params,
                    extra={"normalisation": "speaker"})
    quiet, loud = write_tone(tmp_path / "in" / "quiet.wav", amplitude=0.05), write_tone(tmp_path / "in" / "loud.wav")
    assert _run([tmp_path / "in", "-o", tmp_path / "o.csv", "--model", tmp_path / "spk.pt", "--speakers", "none"]) == 0
    assert "each window normalised by its own statistics" in capsys.readouterr().out
    frame = pd.read_csv(tmp_path / "o.csv")
    assert (frame["normalised_by"] == "window").all() and frame["speaker_group"].isna().all()
    probs = frame[[f"prob_{c}" for c in EMOTIONS]].to_numpy()
    np.testing.assert_allclose(probs[0], probs[1], atol=2e-3)  # the same tone at another gain: the same label
    # by default (all files one group) a group this small falls back the same way, file by file
    assert _run([tmp_path / "in", "-o", tmp_path / "d.csv", "--model", tmp_path / "spk.pt"]) == 0
    assert (pd.read_csv(tmp_path / "d.csv")["normalised_by"] == "window").all()


def _population_model(tmp_path, feature_params):
    """A speaker model whose file has the average training speaker's statistics."""
    import torch

    from conftest import TINY_ARCH
    from ser.models import build_model, save_checkpoint

    torch.manual_seed(2)
    arch = {**TINY_ARCH, "utterance_norm": False}
    rng = np.random.default_rng(0)
    population = [(-40 + 5 * rng.standard_normal(feature_params.n_mels)).tolist(),
                  (8 + rng.random(feature_params.n_mels)).tolist()]
    save_checkpoint(tmp_path / "pop.pt", build_model(arch, feature_params.n_mels, len(EMOTIONS)), arch, EMOTIONS,
                    feature_params, extra={"normalisation": "speaker", "population": population})
    return tmp_path / "pop.pt", population


def test_by_default_all_files_are_one_group_and_a_small_group_is_heard_as_the_average_speaker(
        tmp_path, feature_params, two_speakers, capsys):
    import torch

    from ser.labeller.reading import prepare
    from ser.models import infer, load_checkpoint

    model_path, (mean, std) = _population_model(tmp_path, feature_params)
    files = sorted(two_speakers[0] + two_speakers[1])
    # 7 windows in all: fewer than 10, so every file relative to the model's average speaker
    float32 = ["--precision", "float32"]  # as the hand computation
    assert _run([tmp_path / "in", "-o", tmp_path / "small.csv", "--model", model_path, *float32]) == 0
    assert "by the average training speaker" in capsys.readouterr().out
    small = pd.read_csv(tmp_path / "small.csv")
    assert (small["normalised_by"] == "population").all() and (small["speaker_group"] == "all").all()
    model, _ = load_checkpoint(model_path, torch.device("cpu"))
    for row, path in zip(small.itertuples(), files):
        x = torch.from_numpy(prepare(Path(path), LogMel(feature_params), SETTINGS)["features"])
        x = (x - torch.tensor(mean)[:, None]) / torch.tensor(std)[:, None]
        expected = infer(model, x, 16, torch.device("cpu")).softmax(1).numpy().mean(0)
        np.testing.assert_allclose([getattr(row, f"prob_{c}") for c in EMOTIONS], expected, atol=2e-4)
    # --speakers none: the same, whatever the group sizes
    assert _run([tmp_path / "in", "-o", tmp_path / "none.csv", "--model", model_path, "--speakers", "none", *float32]) == 0
    assert pd.read_csv(tmp_path / "none.csv")[[f"prob_{c}" for c in EMOTIONS]].equals(
        small[[f"prob_{c}" for c in EMOTIONS]])
    # groups allowed down to one window: all files' windows are one speaker's statistics
    assert _run([tmp_path / "in", "-o", tmp_path / "all.csv", "--model", model_path, "--min-group-windows", "1",
                 *float32]) == 0
    grouped = pd.read_csv(tmp_path / "all.csv")
    assert (grouped["normalised_by"] == "all").all()
    expected = _expected([files], model_path, feature_params)
    for row in grouped.itertuples():
        np.testing.assert_allclose([getattr(row, f"prob_{c}") for c in EMOTIONS], expected[row.path], atol=2e-4)


def test_a_crash_is_exit_3_with_the_traceback_and_writes_nothing(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    from ser.labeller import cli as labeller

    write_tone(tmp_path / "a.wav")

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(labeller, "label_rows", broken)
    assert _run([tmp_path / "a.wav", "-o", tmp_path / "o.csv", "--model", tiny_checkpoint]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: a bug" in err and "the labeller crashed (exit 3)" in err
    assert not (tmp_path / "o.csv").exists()


def _speaker_model(tmp_path, feature_params):
    import torch

    from conftest import TINY_ARCH
    from ser.models import build_model, save_checkpoint

    torch.manual_seed(1)
    arch = {**TINY_ARCH, "utterance_norm": False}
    save_checkpoint(tmp_path / "spk.pt", build_model(arch, feature_params.n_mels, len(EMOTIONS)), arch, EMOTIONS,
                    feature_params, extra={"normalisation": "speaker"})
    return tmp_path / "spk.pt"


def _expected(paths_by_speaker, model_path, feature_params):
    """Each file's probabilities computed by hand: the windows of every file of a speaker,
    standardised by the speaker's statistics (ser.models), through the model, averaged."""
    import torch

    from ser.labeller.reading import prepare
    from ser.models import infer, load_checkpoint, speaker_statistics

    model, _ = load_checkpoint(model_path, torch.device("cpu"))
    extractor, expected = LogMel(feature_params), {}
    for files in paths_by_speaker:
        windows = [prepare(Path(f), extractor, SETTINGS)["features"] for f in files]
        x = torch.from_numpy(np.concatenate(windows))
        mean, std = speaker_statistics(x, ["one"] * len(x))
        probs = infer(model, (x - mean[:, :, None]) / std[:, :, None], 16, torch.device("cpu")).softmax(1).numpy()
        bounds = np.cumsum([0] + [len(w) for w in windows])
        expected.update({str(f): probs[a:b].mean(0) for f, a, b in zip(files, bounds[:-1], bounds[1:])})
    return expected


@pytest.fixture
def two_speakers(tmp_path):
    """Two speakers, a folder each, two files each (one long enough for several windows)."""
    a = [write_tone(tmp_path / "in" / "anna" / "1.wav", freq=220), write_tone(tmp_path / "in" / "anna" / "2.wav",
                                                                              seconds=14, freq=330)]
    b = [write_tone(tmp_path / "in" / "bob" / "1.wav", freq=150, amplitude=0.1),
         write_tone(tmp_path / "in" / "bob" / "2.wav", freq=600, amplitude=0.1)]
    return a, b


def test_speakers_by_folder_normalise_each_file_by_its_folders_statistics(tmp_path, feature_params, two_speakers, capsys):
    model = _speaker_model(tmp_path, feature_params)
    out = tmp_path / "o.csv"
    assert _run([tmp_path / "in", "-o", out, "--model", model, "--speakers", "folder", "--jobs", "1",
                 "--min-group-windows", "1"]) == 0
    assert "each folder's files normalised as one speaker" in capsys.readouterr().out
    frame = pd.read_csv(out)
    assert (frame["normalised_by"] == "folder").all()
    assert frame["speaker_group"].tolist() == [str(two_speakers[0][0].parent)] * 2 + [str(two_speakers[1][0].parent)] * 2
    expected = _expected(two_speakers, model, feature_params)
    for row in frame.itertuples():
        np.testing.assert_allclose([getattr(row, f"prob_{c}") for c in EMOTIONS], expected[row.path], atol=2e-4)
    _run([tmp_path / "in", "-o", tmp_path / "w.csv", "--model", model, "--jobs", "1", "--speakers", "none"])
    by_window = pd.read_csv(tmp_path / "w.csv")[[f"prob_{c}" for c in EMOTIONS]].to_numpy()
    assert np.abs(by_window - frame[[f"prob_{c}" for c in EMOTIONS]].to_numpy()).max() > 1e-3  # grouping matters


def test_speakers_by_file_and_by_manifest(tmp_path, feature_params, two_speakers):
    model = _speaker_model(tmp_path, feature_params)
    assert _run([tmp_path / "in", "-o", tmp_path / "f.csv", "--model", model, "--speakers", "file", "--jobs", "2",
                 "--min-group-windows", "1"]) == 0
    frame = pd.read_csv(tmp_path / "f.csv")
    expected = _expected([[f] for f in two_speakers[0] + two_speakers[1]], model, feature_params)
    for row in frame.itertuples():
        assert row.normalised_by == "file" and row.speaker_group == row.path
        np.testing.assert_allclose([getattr(row, f"prob_{c}") for c in EMOTIONS], expected[row.path], atol=2e-4)
    # a manifest that puts anna's second file with bob: paths relative to the manifest's folder
    manifest = tmp_path / "in" / "who.csv"
    a, b = two_speakers
    manifest.write_text("path,speaker\n" + "".join(f"{p.relative_to(manifest.parent)},{s}\n" for p, s in
                                                    [(a[0], "x"), (a[1], "y"), (b[0], "y"), (b[1], "y")]))
    assert _run([tmp_path / "in", "-o", tmp_path / "m.csv", "--model", model, "--speakers", manifest,
                 "--min-group-windows", "1"]) == 0
    frame = pd.read_csv(tmp_path / "m.csv")
    assert frame["speaker_group"].tolist() == ["x", "y", "y", "y"] and (frame["normalised_by"] == "manifest").all()
    expected = _expected([[a[0]], [a[1], b[0], b[1]]], model, feature_params)
    for row in frame.itertuples():
        np.testing.assert_allclose([getattr(row, f"prob_{c}") for c in EMOTIONS], expected[row.path], atol=2e-4)


def test_a_speaker_named_population_is_its_own_group_and_a_big_group_is_sampled(tmp_path, feature_params,
                                                                                  two_speakers):
    model_path, _ = _population_model(tmp_path, feature_params)
    a, b = two_speakers
    manifest = tmp_path / "in" / "who.csv"  # a name the average training speaker once had in the labeller
    manifest.write_text("path,speaker\n" + "".join(f"{p.relative_to(manifest.parent)},population\n" for p in a + b))
    float32 = ["--precision", "float32", "--min-group-windows", "1"]
    assert _run([tmp_path / "in", "-o", tmp_path / "m.csv", "--model", model_path, "--speakers", manifest,
                 *float32]) == 0
    frame = pd.read_csv(tmp_path / "m.csv")
    assert (frame["normalised_by"] == "manifest").all() and (frame["speaker_group"] == "population").all()
    expected = _expected([a + b], model_path, feature_params)
    for row in frame.itertuples():
        np.testing.assert_allclose([getattr(row, f"prob_{c}") for c in EMOTIONS], expected[row.path], atol=2e-4)
    # at most 2 files of the group give its statistics: the seeded sample's, for every file
    assert _run([tmp_path / "in", "-o", tmp_path / "s.csv", "--model", model_path, "--speakers", manifest,
                 "--max-group-files", "2", *float32]) == 0
    sample = statistics_sample(sorted(a + b), ["population"] * 4, 2)
    assert len(sample) == 2
    expected = _expected([sample], model_path, feature_params)  # each sampled file's own probabilities
    sampled = pd.read_csv(tmp_path / "s.csv").set_index("path")
    for path in sample:
        np.testing.assert_allclose([sampled.loc[str(path), f"prob_{c}"] for c in EMOTIONS], expected[str(path)],
                                   atol=2e-4)
    assert not np.allclose(sampled[[f"prob_{c}" for c in EMOTIONS]].to_numpy(),
                           frame.set_index("path").loc[sampled.index, [f"prob_{c}" for c in EMOTIONS]].to_numpy(),
                           atol=1e-3)  # other statistics than all four files': the sample was used


@pytest.mark.parametrize("manifest_text,message", [
    ("path,who\nanna/1.wav,a\n", "no column speaker"),
    ("path,speaker\nanna/1.wav,a\n", "is not in the manifest"),
    ("path,speaker\nanna/1.wav,\n", "row 2 (anna/1.wav): the speaker is empty"),
])
def test_a_bad_speaker_manifest_stops_before_any_work_naming_the_problem(tmp_path, feature_params, two_speakers,
                                                                          capsys, manifest_text, message):
    model = _speaker_model(tmp_path, feature_params)
    (tmp_path / "in" / "who.csv").write_text(manifest_text)
    code = _run([tmp_path / "in", "-o", tmp_path / "m.csv", "--model", model, "--speakers", tmp_path / "in" / "who.csv"])
    assert code == 2 and message in capsys.readouterr().err and not (tmp_path / "m.csv").exists()
    assert _run([tmp_path / "in", "-o", tmp_path / "m.csv", "--model", model, "--speakers", "speaker"]) == 2
    assert "give all, none, file, folder or a .csv/.parquet manifest" in capsys.readouterr().err


def test_a_clip_normalised_model_ignores_the_grouping_and_says_so(tmp_path, tiny_checkpoint, two_speakers, capsys):
    assert _run([tmp_path / "in", "-o", tmp_path / "g.csv", "--model", tiny_checkpoint, "--speakers", "folder"]) == 0
    assert "a clip-normalised model; --speakers is not needed" in capsys.readouterr().out
    grouped = pd.read_csv(tmp_path / "g.csv")
    assert (grouped["normalised_by"] == "clip").all()
    _run([tmp_path / "in", "-o", tmp_path / "n.csv", "--model", tiny_checkpoint])
    pd.testing.assert_frame_equal(grouped, pd.read_csv(tmp_path / "n.csv"))


def test_labels_below_the_confidence_threshold_are_flagged_uncertain(tmp_path, tiny_checkpoint):
    for i, freq in enumerate((150, 300, 600)):
        write_tone(tmp_path / "in" / f"{i}.wav", freq=freq)
    (tmp_path / "in" / "bad.wav").write_text("not audio")
    flags = {}
    for threshold in ("1.0", "0", "0.17"):
        assert _run([tmp_path / "in", "-o", tmp_path / "o.csv", "--model", tiny_checkpoint,
                     "--uncertain-below", threshold]) == 1
        frame = pd.read_csv(tmp_path / "o.csv", keep_default_na=False)
        flags[threshold] = frame["uncertain"].tolist()
        ok = frame["status"] == "ok"
        assert (frame.loc[~ok, "uncertain"] == "").all()  # an error row has no label to doubt
    assert flags["1.0"] == ["True"] * 3 + [""] and flags["0"] == ["False"] * 3 + [""]
    confidence = pd.read_csv(tmp_path / "o.csv")["confidence"].tolist()[:3]
    assert flags["0.17"][:3] == [str(c < 0.17) for c in confidence] and len(set(flags["0.17"][:3])) == 2


def test_a_model_with_a_linear_model_hears_the_functionals_relative_to_the_same_groups(tmp_path, feature_params):
    from ser.fusion import log_softmax, standardise

    semitones = lambda hz: 12 * np.log2(hz / 27.5)  # noqa: E731
    model, head = fused_model(tmp_path, feature_params, semitones(250))
    low = [write_tone(tmp_path / "in" / who / "low.wav", freq=hz) for who, hz in (("deep", 110), ("high", 210))]
    high = [write_tone(tmp_path / "in" / who / "high.wav", freq=hz) for who, hz in (("deep", 160), ("high", 300))]
    # no grouping: every window relative to the average training speaker (250 Hz)
    assert _run([tmp_path / "in", "-o", tmp_path / "none.csv", "--model", model, "--speakers", "none"]) == 0
    none = pd.read_csv(tmp_path / "none.csv").set_index("path")
    assert [none.loc[str(p), "emotion"] for p in low + high] == ["sad", "sad", "sad", "angry"]
    # a folder per speaker: each relative to its own speaker's mean pitch (two windows: the spread is the
    # training speakers'), so each speaker's higher file is the angry one
    assert _run([tmp_path / "in", "-o", tmp_path / "f.csv", "--model", model, "--speakers", "folder",
                 "--min-group-windows", "1"]) == 0
    grouped = pd.read_csv(tmp_path / "f.csv").set_index("path")
    assert [grouped.loc[str(p), "emotion"] for p in low + high] == ["sad", "sad", "angry", "angry"]
    extractor = LogMel(feature_params)
    for pair in zip(low, high):
        f = np.concatenate([prepare(Path(p), extractor, SETTINGS)["functionals"] for p in pair])
        expected = np.exp(log_softmax(head.logits(standardise(f, f.mean(axis=0), head.population[1]))))
        for p, probs in zip(pair, expected):
            np.testing.assert_allclose(grouped.loc[str(p), [f"prob_{c}" for c in EMOTIONS]].to_numpy(float), probs,
                                       atol=2e-5)


def test_adapt_labels_each_group_by_the_model_adapted_to_its_windows(tmp_path, feature_params, capsys):
    """--adapt: a group with enough windows is heard by the model adapted to them (ser.adaptation),
    at its matched temperature, computed here by hand from the same windows in the same order; a
    group too small is not."""
    import torch

    from ser.adaptation import MIN_CLIPS, adapt_and_match
    from ser.labeller.reading import prepare
    from ser.models import infer, load_checkpoint, speaker_statistics

    anna = [write_tone(tmp_path / "in" / "anna" / "1.wav", seconds=30, freq=220),
            write_tone(tmp_path / "in" / "anna" / "2.wav", seconds=1, freq=330)]
    bob = [write_tone(tmp_path / "in" / "bob" / "1.wav", seconds=2, freq=150, amplitude=0.1)]
    model_path = _speaker_model(tmp_path, feature_params)
    args = [tmp_path / "in", "--model", model_path, "--speakers", "folder", "--jobs", "1", "--min-group-windows", "1",
            "--precision", "float32"]
    assert _run([*args, "-o", tmp_path / "a.csv", "--adapt"]) == 0
    assert "adapted to the speaker group of 2 files" in capsys.readouterr().out
    frame = pd.read_csv(tmp_path / "a.csv")
    assert frame["adapted"].tolist() == [True, True, False]  # bob: one window, fewer than MIN_CLIPS

    model, _ = load_checkpoint(model_path, torch.device("cpu"), fuse=False)
    windows = [prepare(Path(f), LogMel(feature_params), SETTINGS)["features"] for f in anna]
    x = torch.from_numpy(np.concatenate(windows))
    assert len(x) >= MIN_CLIPS
    mean, std = speaker_statistics(x, ["anna"] * len(x))
    x = (x - mean[:, :, None]) / std[:, :, None]
    adapted, temperature = adapt_and_match(model, None, 1.0, x, None)
    probs = (infer(adapted, x, 16, torch.device("cpu")) / temperature).softmax(1).numpy()
    by_path = frame.set_index("path")
    np.testing.assert_allclose(by_path.loc[str(anna[0]), [f"prob_{c}" for c in EMOTIONS]].to_numpy(float),
                               probs[: len(windows[0])].mean(0), atol=2e-4)
    assert _run([*args, "-o", tmp_path / "b.csv", "--adapt"]) == 0  # seeded: the same labels again
    assert pd.read_csv(tmp_path / "b.csv").equals(frame)
    assert _run([*args, "-o", tmp_path / "n.csv", "--no-adapt"]) == 0  # without it: the trained model
    plain = pd.read_csv(tmp_path / "n.csv")
    assert not plain["adapted"].any()
    assert np.allclose(plain.filter(like="prob_").iloc[2], frame.filter(like="prob_").iloc[2], atol=1e-6)  # bob
    assert np.abs(plain.filter(like="prob_").iloc[0] - frame.filter(like="prob_").iloc[0]).max() > 1e-3


def test_a_clusters_first_pass_labels_its_sample_from_the_features_it_read_once(tmp_path, feature_params,
                                                                                 monkeypatch):
    """hear_groups (a cluster worker's first pass): the group's statistics and adaptation, and its
    sampled files' rows as label_rows gives them, each file decoded once."""
    import ser.labeller.stream
    from ser.labeller.loop import hear_groups, label_rows
    from ser.labeller.speakers import adapt_sample_cap
    from ser.trained import TrainedModel

    files = [write_tone(tmp_path / "in" / f"{i}.wav", seconds=1 + 0.1 * i, freq=200 + 37 * i) for i in range(10)]
    trained = TrainedModel.load(fused_model(tmp_path, feature_params, pitch_st=0.0)[0])
    settings = Settings(**{**SETTINGS.__dict__, "adapt": True, "min_group_windows": 5})
    keys, read, prepare_pieces = ["all"] * len(files), [], ser.labeller.stream.prepare_pieces
    monkeypatch.setattr(ser.labeller.stream, "prepare_pieces", lambda paths, *a: read.extend(paths) or prepare_pieces(
        paths, *a))
    statistics, states, rows, segments = hear_groups(files, keys, trained, settings, adapt_sample_cap(1), "all", "all")
    assert sorted(read) == sorted(files)  # once each
    assert set(statistics) == {"all"} and set(states) == {"all"}
    expected_rows, expected_segments = label_rows(files, trained, settings, None, "all", groups=keys)
    pd.testing.assert_frame_equal(rows.to_frame(), expected_rows.to_frame())
    pd.testing.assert_frame_equal(segments.to_frame(), expected_segments.to_frame())
    assert rows.to_frame()["adapted"].all()


def test_adaptation_runs_on_one_thread_whatever_the_machine_and_gives_the_threads_back(monkeypatch):
    """A cluster worker has one thread, the local run all cores: the adaptation's backward sums
    split by thread would set them a little apart (a near tie's label in bfloat16)."""
    import types

    import torch

    import ser.adaptation
    from ser.grouping import GroupStatistics
    from ser.labeller.scoring import adapted_states

    seen = []
    monkeypatch.setattr(ser.adaptation, "adapted_state", lambda *a: seen.append(torch.get_num_threads()) or ({}, 1.0))
    windows = np.zeros((ser.adaptation.MIN_CLIPS, 4, 8), dtype=np.float32)
    sample = types.SimpleNamespace(kept={"anna": 1, "bob": 1}, windows=lambda key: (windows, None))
    statistics = {key: GroupStatistics((np.zeros(4), np.ones(4))) for key in ("anna", "bob")}
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        states = adapted_states(types.SimpleNamespace(head=None), "speaker", statistics, sample, SETTINGS)
        assert seen == [1, 1] and set(states) == {"anna", "bob"}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("flag", ["-o", "--segments"])
def test_the_speaker_manifest_is_never_an_output(tmp_path, tiny_checkpoint, capsys, flag):
    write_tone(tmp_path / "sp" / "a.wav")
    manifest = tmp_path / "sp" / "who.csv"
    manifest.write_text("path,speaker\na.wav,ann\n")
    outputs = {"-o": ["-o", manifest], "--segments": ["-o", tmp_path / "labels.csv", "--segments", manifest]}[flag]
    assert _run([tmp_path / "sp" / "a.wav", *outputs, "--model", tiny_checkpoint, "--speakers", manifest]) == 2
    assert "is the speaker manifest (--speakers)" in capsys.readouterr().err
    assert manifest.read_text() == "path,speaker\na.wav,ann\n" and not (tmp_path / "labels.csv").exists()


@pytest.mark.parametrize("kind", ["fifo", "link"])
def test_a_special_file_or_a_link_at_the_output_is_refused_not_replaced(tmp_path, tiny_checkpoint, capsys, kind):
    write_tone(tmp_path / "a.wav")
    out, target = tmp_path / "out.csv", tmp_path / "real.csv"
    if kind == "fifo":  # as /dev/null would be: renaming onto it replaces the device with a file
        os.mkfifo(out)
    else:
        target.write_text("the user's file\n")
        out.symlink_to(target)
    assert _run([tmp_path / "a.wav", "-o", out, "--model", tiny_checkpoint]) == 2
    err = capsys.readouterr().err
    assert ("is not a regular file" if kind == "fifo" else "is a symbolic link") in err
    assert out.is_fifo() if kind == "fifo" else (out.is_symlink() and target.read_text() == "the user's file\n")


def test_dev_null_and_dev_stdout_are_refused_without_touching_them(tiny_checkpoint, tmp_path):
    from ser.labeller.output import check_output
    from ser.util import UserError

    for out, reason in (("/dev/null", "not a regular file"), ("/dev/stdout", "symbolic link")):
        with pytest.raises(UserError, match=reason):
            check_output(out, [str(tmp_path)], tiny_checkpoint)
    assert Path("/dev/null").is_char_device() and Path("/dev/stdout").is_symlink()


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_file_name_that_is_not_utf8_is_labelled_and_written(tmp_path, feature_params, suffix):
    folder = tmp_path / "in"
    write_tone(folder / "good.wav")
    odd = folder / os.fsdecode(b"caf\xe9 \xff.wav")  # Latin-1 bytes, as an old Windows share names them
    write_tone(folder / "plain.wav").rename(odd)
    out = tmp_path / f"labels{suffix}"
    model = _speaker_model(tmp_path, feature_params)
    assert _run([folder, "-o", out, "--model", model, "--speakers", "file", "--min-group-windows", "1"]) == 0
    table = pd.read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
    assert len(table) == 2 and set(table["status"]) == {"ok"}
    assert str(folder / "caf\\xe9 \\xff.wav") in set(table["path"])  # shown as `ls -b` shows it
    assert str(folder / "caf\\xe9 \\xff.wav") in set(table["speaker_group"])


def test_cells_a_spreadsheet_would_run_as_formulas_are_quoted(tmp_path, feature_params, monkeypatch):
    import csv

    from ser.labeller.output import csv_safe

    monkeypatch.chdir(tmp_path)
    names = ["=HYPERLINK(1).wav", "+1.wav", "@SUM(2).wav", "-3.wav"]
    for name in names:
        write_tone(tmp_path / name)
    who = tmp_path / "who.csv"
    who.write_text("path,speaker\n" + "".join(f"{n},=cmd|' /C calc'!A0\n" for n in names))
    model = _speaker_model(tmp_path, feature_params)
    assert _run(["-o", "labels.csv", "--model", model, "--speakers", who, "--min-group-windows", "1", "--", *names]) == 0
    with open("labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows) == sorted("'" + n for n in names)
    assert {r["speaker_group"] for r in rows} == {"'=cmd|' /C calc'!A0"}
    assert csv_safe("anna/1.wav") == "anna/1.wav" and csv_safe("\tx") == "'\tx"
    assert float(rows[0]["confidence"]) > 0  # numbers stay numbers


def test_a_tampered_encoder_is_exit_2_and_keeps_the_previous_output(tmp_path, feature_params, monkeypatch, capsys):
    import torch

    from conftest import TINY_ARCH
    from ser import encoder
    from ser.audio import FeatureParams
    from ser.models import build_model, save_checkpoint

    fp = FeatureParams.from_dict({**feature_params.to_dict(), "encoder": "whisper-base"})
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "enc.pt", build_model(TINY_ARCH, fp.n_mels, 8), TINY_ARCH, EMOTIONS, fp,
                    extra={"fusion": {"fusion_weight": 0.5}})
    write_tone(tmp_path / "a.wav")
    out = tmp_path / "labels.csv"
    out.write_text("the previous run's labels\n")
    parts = encoder.ENCODERS["whisper-base"]
    monkeypatch.setitem(encoder.ENCODERS, "whisper-base", (*parts[:2], "f" * 64))  # the installed bytes now differ
    assert _run([tmp_path / "a.wav", "-o", out, "--model", tmp_path / "enc.pt", "--jobs", "2"]) == 2
    err = capsys.readouterr().err
    assert "sha256 is not the pinned" in err and "requirements-weights.txt" in err and "Traceback" not in err
    assert out.read_text() == "the previous run's labels\n"


def test_a_full_disk_is_one_line_exit_2_and_keeps_the_previous_output(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    import errno

    import ser.labeller.output

    write_tone(tmp_path / "a.wav")
    out = tmp_path / "labels.csv"
    out.write_text("the previous run's labels\n")
    real_open = open

    def full_disk(path, *args, **kwargs):
        if ".labels.csv." in str(path):  # atomic_path's temp file beside the output
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(ser.labeller.output, "open", full_disk, raising=False)
    assert _run([tmp_path / "a.wav", "-o", out, "--model", tiny_checkpoint]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "nothing half-written was kept" in err and "Traceback" not in err
    assert out.read_text() == "the previous run's labels\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".labels")] == []  # no temp left


def test_segments_to_the_same_file_as_the_labels_is_refused(tmp_path, tiny_checkpoint, capsys):
    write_tone(tmp_path / "a.wav")
    out = tmp_path / "labels.csv"
    out.write_text("the previous run's labels\n")
    assert _run([tmp_path / "a.wav", "-o", out, "--segments", tmp_path / "." / "labels.csv", "--model",
                 tiny_checkpoint]) == 2
    assert "is the same file as -o" in capsys.readouterr().err
    assert out.read_text() == "the previous run's labels\n"


def test_the_summary_says_how_many_labels_are_uncertain(tmp_path, tiny_checkpoint, capsys):
    for i in range(3):
        write_tone(tmp_path / "in" / f"{i}.wav", freq=200 + 100 * i)
    out = tmp_path / "labels.csv"
    assert _run([tmp_path / "in", "-o", out, "--model", tiny_checkpoint, "--uncertain-below", "0.9"]) == 0
    flagged = int(pd.read_csv(out)["uncertain"].sum())
    assert flagged == 3  # an untrained model of eight classes is sure of nothing
    assert f"predict: {flagged} of 3 labels flagged uncertain (confidence below 0.9; column uncertain)" in \
        capsys.readouterr().out


def _encoder_model(tmp_path, feature_params):
    """A speaker model fused with a linear model that hears the functionals and the encoder's
    summary (random weights: every value of the summary moves the probabilities)."""
    import torch

    from conftest import TINY_ARCH
    from ser import encoder
    from ser.audio import FeatureParams
    from ser.fusion import LinearHead
    from ser.models import build_model, save_checkpoint
    from ser.prosody import n_functionals

    # the encoder's first two layers: the model file's setting reaches the workers and the device alike
    fp = FeatureParams.from_dict({**feature_params.to_dict(), "encoder": "whisper-base", "encoder_layers": 2})
    d = n_functionals(fp.n_mels) + encoder.n_values("whisper-base")
    rng = np.random.default_rng(5)
    head = LinearHead(rng.normal(0, 0.3, (len(EMOTIONS), d)), np.zeros(len(EMOTIONS)), 0.5, 1.0,
                      (np.zeros(d), np.ones(d)))
    torch.manual_seed(3)
    arch = {**TINY_ARCH, "utterance_norm": False}
    population = [[-40.0] * fp.n_mels, [8.0] * fp.n_mels]
    save_checkpoint(tmp_path / "enc.pt", build_model(arch, fp.n_mels, len(EMOTIONS)), arch, EMOTIONS, fp,
                    extra={"normalisation": "speaker", "population": population, "fusion": head.to_record()})
    return tmp_path / "enc.pt"


def test_the_encoder_on_a_device_labels_as_the_encoder_in_the_workers(tmp_path, feature_params, monkeypatch):
    """The GPU path, run on the CPU: workers send the encoder's inputs and it runs in the main
    process on padded, masked batches of windows of different lengths (a long file's too); the
    first pass, the adaptation and the labels come out as with the encoder in each worker."""
    from ser.labeller.loop import label_files
    from ser.trained import TrainedModel

    paths = [write_tone(tmp_path / "in" / f"{k}.wav", seconds=s, freq=f)
             for k, (s, f) in enumerate([(1.2, 150), (0.4, 260), (7.5, 200), (2.3, 320), (0.9, 180), (1.6, 140),
                                         (0.7, 300), (3.1, 230), (1.0, 170)])]
    trained = TrainedModel.load(_encoder_model(tmp_path, feature_params))
    settings = Settings(**{**SETTINGS.__dict__, "adapt": True, "min_group_windows": 1, "batch_size": 4})
    in_workers, in_workers_segments = label_files(paths, trained, settings, speakers="all")
    made = []
    real_extractor = TrainedModel.extractor

    def on_a_device(self, precision="float32"):
        made.append(real_extractor(self, precision))
        made[-1].encoder_device = "cpu"  # what a GPU model's extractor says, with the CPU as the device
        return made[-1]

    monkeypatch.setattr(TrainedModel, "extractor", on_a_device)
    deferred, deferred_segments = label_files(paths, trained, settings, speakers="all")
    assert made and (in_workers["status"] == "ok").all() and (deferred["adapted"]).all()
    probs = [f"prob_{c}" for c in EMOTIONS]
    assert in_workers[probs].std().max() > 0.01  # the summary moves the probabilities
    np.testing.assert_allclose(deferred[probs].to_numpy(), in_workers[probs].to_numpy(), atol=2e-3)
    assert (deferred["emotion"] == in_workers["emotion"]).all()
    assert len(deferred_segments) == len(in_workers_segments) > len(paths)


def test_the_labels_are_softened_by_the_models_unseen_temperature_unless_asked_not_to(tmp_path, feature_params,
                                                                                        capsys):
    import torch

    from conftest import TINY_ARCH
    from ser.calibration import soften
    from ser.models import build_model, save_checkpoint

    torch.manual_seed(4)
    save_checkpoint(tmp_path / "m.pt", build_model(TINY_ARCH, feature_params.n_mels, len(EMOTIONS)), TINY_ARCH,
                    EMOTIONS, feature_params, extra={"temperature": 0.2, "unseen_temperature": 2.5})
    for k in range(3):
        write_tone(tmp_path / "in" / f"{k}.wav", seconds=1.0 + k, freq=150 + 90 * k)
    args = [tmp_path / "in", "--model", tmp_path / "m.pt", "--speakers", "none", "--no-adapt"]
    assert _run([*args, "-o", tmp_path / "soft.csv"]) == 0
    assert "softened for corpora the model never heard (temperature 2.50" in capsys.readouterr().out
    assert _run([*args, "-o", tmp_path / "plain.csv", "--no-soften"]) == 0
    assert "never heard" not in capsys.readouterr().out
    soft, plain = pd.read_csv(tmp_path / "soft.csv"), pd.read_csv(tmp_path / "plain.csv")
    probs = [f"prob_{c}" for c in EMOTIONS]
    assert (soft["emotion"] == plain["emotion"]).all() and (soft["confidence"] < plain["confidence"]).all()
    # each window softened, then a file's windows averaged (one window a file here)
    np.testing.assert_allclose(soft[probs].to_numpy(), soften(plain[probs].to_numpy(), 2.5), atol=2e-5)
