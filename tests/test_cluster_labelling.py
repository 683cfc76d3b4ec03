"""Labelling on a real Dask cluster on 127.0.0.1 (a scheduler and worker processes over TCP,
started and stopped by the tests): the local run's rows, whatever dies."""
import dataclasses
import os
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import local_cluster
from ser.labeller.settings import Settings
from ser.labeller.cluster import label_on_cluster, shards_of
from ser.corpora import EMOTIONS
from ser.labeller.cli import main
from ser.labeller.loop import label_rows

distributed = pytest.importorskip("distributed")

SETTINGS = Settings(batch_size=16, n_jobs=1, min_duration_s=0.1, silence_peak=1e-4, segment_s=6.0, hop_s=3.0,
                    max_queued_windows=256, precision="float32", adapt=False)
PROBS = [f"prob_{c}" for c in EMOTIONS]


def _local(paths, model_path, speakers="none", groups=None, settings=None):
    from ser.trained import TrainedModel

    return label_rows(paths, TrainedModel.load(model_path), settings or SETTINGS, None, speakers, groups=groups)


def _same(cluster_table, local_table):
    a, b = cluster_table.to_frame(), local_table.to_frame()
    assert list(a.columns) == list(b.columns)
    assert a["path"].tolist() == b["path"].tolist()
    pd.testing.assert_frame_equal(a.drop(columns=PROBS + ["confidence"]), b.drop(columns=PROBS + ["confidence"]))
    np.testing.assert_allclose(a[PROBS].to_numpy(float), b[PROBS].to_numpy(float), atol=1e-5)


def test_shards_follow_path_order_and_keep_each_speaker_whole():
    paths = [Path(f"p{i}") for i in range(10)]
    assert shards_of(paths, None, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    groups = ["a", "a", "a", "b", "b", "c", "a", "c", "c", "c"]
    shards = shards_of(paths, groups, 4)
    assert sorted(i for s in shards for i in s) == list(range(10))
    for key in set(groups):
        assert sum(any(groups[i] == key for i in s) for s in shards) == 1  # each speaker in one shard
    assert shards_of(paths, ["x"] * 10, 4) == [list(range(10))]  # a speaker bigger than a shard is one


def test_the_cluster_gives_the_local_run_labels_rows_and_order(cluster, recordings, tiny_checkpoint):
    from ser.labeller.reading import collect_inputs

    paths = collect_inputs([str(recordings)])
    with distributed.Client(cluster) as client:
        files, segments = label_on_cluster(client, paths, tiny_checkpoint, EMOTIONS, SETTINGS, files_per_shard=3)
    local_files, local_segments = _local(paths, tiny_checkpoint)
    _same(files, local_files)
    assert len(segments.rows) == len(local_segments.rows) > len(paths) - 2  # the long file has several windows
    np.testing.assert_allclose(segments.to_frame()[PROBS].to_numpy(float),
                               local_segments.to_frame()[PROBS].to_numpy(float), atol=1e-5)
    statuses = files.to_frame().set_index("path")["status"]
    assert statuses[str(recordings / "empty.wav")] == "error" and (statuses == "ok").sum() == len(paths) - 2


def test_speaker_groups_on_the_cluster_match_the_local_run(cluster, recordings, tmp_path, feature_params):
    import torch

    from conftest import TINY_ARCH
    from ser.grouping import speaker_keys
    from ser.labeller.reading import collect_inputs
    from ser.models import build_model, save_checkpoint

    torch.manual_seed(1)
    arch = {**TINY_ARCH, "utterance_norm": False}
    model = tmp_path / "spk.pt"
    save_checkpoint(model, build_model(arch, feature_params.n_mels, len(EMOTIONS)), arch, EMOTIONS, feature_params,
                    extra={"normalisation": "speaker"})
    paths = collect_inputs([str(recordings)])
    groups = speaker_keys(paths, "folder")
    settings = dataclasses.replace(SETTINGS, min_group_windows=1)  # these folders hold a few windows each
    with distributed.Client(cluster) as client:
        files, _ = label_on_cluster(client, paths, model, EMOTIONS, settings, "folder", groups, files_per_shard=4)
    _same(files, _local(paths, model, "folder", groups, settings)[0])
    assert set(files.to_frame()["normalised_by"]) == {"folder"}


@pytest.mark.parametrize("speakers", ["all", "folder"])
def test_a_grouped_adapted_run_splits_groups_over_shards_and_gives_the_local_labels(
        cluster, recordings, tmp_path, feature_params, speakers):
    """The defaults (one flat folder as one group, the model adapted to it) and folders: the
    groups are heard once on the workers from a sample of their files (fewer than all here), which
    are labelled there and then; the others in shards of 3."""
    from conftest import fused_model
    from ser.grouping import speaker_keys, statistics_sample
    from ser.labeller.reading import collect_inputs

    model, _ = fused_model(tmp_path, feature_params, pitch_st=0.0)
    paths = collect_inputs([str(recordings)])
    groups = speaker_keys(paths, speakers)
    most = {"all": 12, "folder": 8}[speakers]  # of 21 files; of 9 a folder (8 windows or more adapt)
    settings = dataclasses.replace(SETTINGS, adapt=True, min_group_windows=5, max_group_files=most)
    with distributed.Client(cluster) as client, distributed.get_task_stream(client) as tasks:
        files, segments = label_on_cluster(client, paths, model, EMOTIONS, settings, speakers, groups,
                                           files_per_shard=3)
    ran = [str(task["key"]).split("-")[0] for task in tasks.data]
    rest = len(paths) - len(statistics_sample(paths, groups, most))
    assert rest >= 2 and ran.count("label_shard") == -(-rest // 3) and ran.count("hear_shard") >= 1  # groups split
    local_files, local_segments = _local(paths, model, speakers, groups, settings)
    _same(files, local_files)
    frame = files.to_frame()
    assert frame["adapted"].sum() >= 9 and set(frame["normalised_by"]) <= {speakers, "population"}
    assert frame.loc[frame["adapted"], "normalised_by"].eq(speakers).all()
    np.testing.assert_allclose(segments.to_frame()[PROBS].to_numpy(float),
                               local_segments.to_frame()[PROBS].to_numpy(float), atol=1e-5)


def test_the_command_on_a_cluster_with_default_options_writes_the_local_labels_and_says_so(
        cluster, recordings, tmp_path, feature_params, capsys):
    from conftest import fused_model

    model, _ = fused_model(tmp_path, feature_params, pitch_st=0.0)
    common = [str(recordings), "--model", str(model), "--precision", "float32"]
    assert main(common + ["-o", str(tmp_path / "local.csv"), "--jobs", "1"]) == 1
    local_said = capsys.readouterr().out
    assert main(common + ["-o", str(tmp_path / "cluster.csv"), "--cluster", cluster.scheduler_address]) == 1
    cluster_said = capsys.readouterr().out
    a, b = pd.read_csv(tmp_path / "cluster.csv"), pd.read_csv(tmp_path / "local.csv")
    pd.testing.assert_frame_equal(a.drop(columns=PROBS + ["confidence"]), b.drop(columns=PROBS + ["confidence"]))
    np.testing.assert_allclose(a[PROBS].to_numpy(float), b[PROBS].to_numpy(float), atol=2e-5)
    assert a["adapted"].any() and (a.loc[a["status"] == "ok", "normalised_by"] == "all").all()
    said = [line for line in cluster_said.splitlines() if line.startswith("predict:")]
    assert said[1:] == [line for line in local_said.splitlines() if line.startswith("predict:")][1:]
    assert "all files normalised as one group" in said[1] and "adapted to the speaker group" in said[2]


def test_a_worker_killed_mid_run_loses_no_row_and_doubles_none(recordings, tiny_checkpoint):
    from ser.labeller.reading import collect_inputs

    paths = collect_inputs([str(recordings)])
    killed = []
    with local_cluster() as cluster, distributed.Client(cluster) as client:
        def kill_a_busy_worker(done, total):
            if killed:
                return
            for worker in list(cluster.scheduler.workers.values()):
                if worker.processing:  # it holds a shard right now
                    killed.append(sorted(ts.key for ts in worker.processing))
                    os.kill(worker.pid, signal.SIGKILL)
                    return

        files, _ = label_on_cluster(client, paths, tiny_checkpoint, EMOTIONS, SETTINGS, files_per_shard=1,
                                    on_shard=kill_a_busy_worker)
    assert killed, "no worker was busy when the first shard came back"
    assert [r["path"] for r in files.rows] == [str(p) for p in paths]  # each file once, in order
    _same(files, _local(paths, tiny_checkpoint)[0])


def test_command_line_cluster_writes_the_local_output_and_exit_code(cluster, recordings, tiny_checkpoint, tmp_path):
    local, remote = tmp_path / "local.csv", tmp_path / "cluster.csv"
    common = [str(recordings), "--model", str(tiny_checkpoint), "--precision", "float32", "--segments"]
    assert main(common + [str(tmp_path / "ls.csv"), "-o", str(local), "--jobs", "1"]) == 1
    assert main(common + [str(tmp_path / "cs.csv"), "-o", str(remote), "--cluster", cluster.scheduler_address]) == 1
    a, b = pd.read_csv(remote), pd.read_csv(local)
    pd.testing.assert_frame_equal(a.drop(columns=PROBS + ["confidence"]), b.drop(columns=PROBS + ["confidence"]))
    np.testing.assert_allclose(a[PROBS].to_numpy(float), b[PROBS].to_numpy(float), atol=2e-5)
    assert len(pd.read_csv(tmp_path / "cs.csv")) == len(pd.read_csv(tmp_path / "ls.csv"))


def test_a_bad_model_file_is_the_local_runs_clear_error(cluster, recordings, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    assert main([str(recordings), "-o", str(tmp_path / "o.csv"), "--model", str(bad), "--cluster",
                 cluster.scheduler_address]) == 2
    assert f"{bad}: not a loadable model file" in capsys.readouterr().err


def test_the_only_worker_killed_mid_run_loses_no_row(recordings, tiny_checkpoint):
    from ser.labeller.reading import collect_inputs

    paths = collect_inputs([str(recordings)])
    killed = []
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None, silence_logs=50) as cluster, \
            distributed.Client(cluster) as client:
        def kill_the_worker(done, total):
            if not killed:  # the model's bytes, sent once, die with it
                [worker] = cluster.scheduler.workers.values()
                killed.append(worker.pid)
                os.kill(worker.pid, signal.SIGKILL)

        files, _ = label_on_cluster(client, paths, tiny_checkpoint, EMOTIONS, SETTINGS, files_per_shard=1,
                                    on_shard=kill_the_worker)
    assert killed
    assert [r["path"] for r in files.rows] == [str(p) for p in paths]  # each file once, in order
    _same(files, _local(paths, tiny_checkpoint)[0])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_scheduler_lost_mid_run_is_a_clear_error(recordings, tiny_checkpoint):
    import subprocess
    import sys

    from ser.cluster import connect
    from ser.labeller.reading import collect_inputs
    from ser.util import UserError

    port = _free_port()
    processes = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                   "--port", str(port), "--no-dashboard"], stderr=subprocess.DEVNULL)]
    try:
        processes.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker",
                                           f"tcp://127.0.0.1:{port}", "--nthreads", "1", "--no-dashboard",
                                           "--host", "127.0.0.1"], stderr=subprocess.DEVNULL))
        paths = collect_inputs([str(recordings)])
        with connect(f"tcp://127.0.0.1:{port}") as client:
            def kill_the_scheduler(done, total):
                processes[0].kill()

            with pytest.raises(UserError, match="scheduler was lost mid-run; nothing written"):
                label_on_cluster(client, paths, tiny_checkpoint, EMOTIONS, SETTINGS, files_per_shard=1,
                                 on_shard=kill_the_scheduler)
    finally:
        for process in processes:
            process.kill()
            process.wait(timeout=30)


@pytest.mark.parametrize("grouping", ["folder", "manifest"])
def test_the_cluster_adapts_to_each_group_as_the_local_run_does(cluster, recordings, tmp_path, feature_params,
                                                                grouping):
    import torch

    from conftest import TINY_ARCH
    from ser.models import build_model, save_checkpoint

    torch.manual_seed(1)
    arch = {**TINY_ARCH, "utterance_norm": False}
    model = tmp_path / "spk.pt"
    population = [[-40.0] * feature_params.n_mels, [8.0] * feature_params.n_mels]
    save_checkpoint(model, build_model(arch, feature_params.n_mels, len(EMOTIONS)), arch, EMOTIONS, feature_params,
                    extra={"normalisation": "speaker", "population": population})
    speakers = "folder"
    if grouping == "manifest":
        speakers = str(tmp_path / "who.csv")
        rows = [f"{p.relative_to(recordings)},{'one' if 'anna' in p.parts or 'long' in p.name else 'two'}"
                for p in sorted(recordings.rglob("*.wav"))]
        (tmp_path / "who.csv").write_text("path,speaker\n" + "\n".join(f"{recordings.name}/{r}" for r in rows) + "\n")
    local, remote = tmp_path / "local.csv", tmp_path / "remote.csv"
    common = [str(recordings), "--model", str(model), "--precision", "float32", "--speakers", speakers,
              "--min-group-windows", "1"]  # adaptation on: the default
    assert main(common + ["-o", str(local), "--jobs", "1"]) == 1
    assert main(common + ["-o", str(remote), "--cluster", cluster.scheduler_address]) == 1
    a, b = pd.read_csv(remote), pd.read_csv(local)
    assert a["adapted"].any() and a["adapted"].tolist() == b["adapted"].tolist()
    assert (a["emotion"].fillna("error") == b["emotion"].fillna("error")).mean() >= 0.99
    pd.testing.assert_frame_equal(a.drop(columns=PROBS + ["confidence"]), b.drop(columns=PROBS + ["confidence"]))
    np.testing.assert_allclose(a[PROBS].to_numpy(float), b[PROBS].to_numpy(float), atol=1e-4)
