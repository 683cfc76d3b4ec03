"""Cluster labelling and features against a real Dask cluster on 127.0.0.1 (a scheduler and
two worker processes over TCP, started and stopped by the tests)."""
import dataclasses
import os
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import write_tone
from ser.audio import LogMel, Settings
from ser.cluster import compute_on_cluster, label_on_cluster, shards_of
from ser.corpora import EMOTIONS
from ser.features import compute_parallel
from ser.labeller import label_rows, main

distributed = pytest.importorskip("distributed")

SETTINGS = Settings(batch_size=16, n_jobs=1, min_duration_s=0.1, silence_peak=1e-4, segment_s=6.0, hop_s=3.0,
                    max_queued_windows=256, precision="float32")
PROBS = [f"prob_{c}" for c in EMOTIONS]


def _cluster():
    return distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                    dashboard_address="127.0.0.1:0", silence_logs=40)


@pytest.fixture(scope="module")
def cluster():
    with _cluster() as c:
        yield c


@pytest.fixture
def recordings(tmp_path):
    """Two speakers' folders of short clips, a long recording, and files that cannot be labelled."""
    d = tmp_path / "in"
    for speaker, freq in (("anna", 200), ("bob", 500)):
        for i in range(9):
            write_tone(d / speaker / f"{i}.wav", seconds=1.0 + 0.1 * i, freq=freq + 37 * i)
    write_tone(d / "long.wav", seconds=14, freq=330)
    (d / "empty.wav").write_bytes(b"")
    (d / "text.wav").write_text("not audio")
    return d


def _local(paths, model_path, speakers="none", groups=None, settings=None):
    import torch

    from ser.models import load_checkpoint

    model, meta = load_checkpoint(model_path, torch.device("cpu"))
    return label_rows(paths, model, meta, settings or SETTINGS, torch.device("cpu"), None, speakers, groups=groups)


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
    from ser.labeller import collect_inputs

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
    from ser.labeller import collect_inputs
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


def test_a_worker_killed_mid_run_loses_no_row_and_doubles_none(recordings, tiny_checkpoint):
    from ser.labeller import collect_inputs

    paths = collect_inputs([str(recordings)])
    killed = []
    with _cluster() as cluster, distributed.Client(cluster) as client:
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


def test_no_scheduler_at_the_address_is_a_clear_error_and_writes_nothing(recordings, tiny_checkpoint, tmp_path,
                                                                          capsys, monkeypatch):
    import ser.cluster

    monkeypatch.setattr(ser.cluster, "CONNECT_TIMEOUT_S", 2)
    out = tmp_path / "o.csv"
    assert main([str(recordings), "-o", str(out), "--model", str(tiny_checkpoint), "--cluster",
                 "tcp://127.0.0.1:9"]) == 2
    assert "--cluster tcp://127.0.0.1:9: no Dask scheduler answers there" in capsys.readouterr().err
    assert not out.exists()


def test_features_on_the_cluster_are_the_local_bytes(cluster, recordings, feature_params):
    paths = [str(p) for p in sorted(recordings.rglob("*.wav")) if p.name not in ("empty.wav", "text.wav")]
    local = list(compute_parallel(paths, feature_params, n_jobs=1))
    with distributed.Client(cluster) as client:
        remote = list(compute_on_cluster(client, paths, feature_params, clips_per_task=4))
    assert len(remote) == len(local) == len(paths)
    for (logmel, functionals), (local_logmel, local_functionals) in zip(remote, local):  # both features
        assert logmel.tobytes() == local_logmel.tobytes() and functionals.tobytes() == local_functionals.tobytes()
    # a sliding window of tasks: never more than tasks_ahead submitted and unread
    with distributed.Client(cluster) as client:
        submitted, submit = [], client.submit
        client.submit = lambda *a, **k: submitted.append(submit(*a, **k)) or submitted[-1]
        stream = compute_on_cluster(client, paths, feature_params, clips_per_task=1, tasks_ahead=2)
        read = [next(stream)]
        assert len(submitted) == 3  # two ahead, then one more as the first was taken
        read += list(stream)
        assert len(submitted) == len(paths) and [a[0].tobytes() for a in read] == [b[0].tobytes() for b in local]
    assert LogMel(feature_params).from_file(paths[0]).tobytes() == remote[0][0].tobytes()


def test_the_features_store_built_on_the_cluster_is_the_local_one(cluster, recordings, feature_params, tmp_path):
    from ser.features import ARRAY_NAME, build

    paths = [str(p) for p in sorted(recordings.rglob("*.wav")) if p.name not in ("empty.wav", "text.wav")]
    build(paths, feature_params, tmp_path / "local", n_jobs=1)
    _, computed = build(paths, feature_params, tmp_path / "remote", n_jobs=1, cluster=cluster.scheduler_address)
    assert computed == len(paths)
    assert (tmp_path / "local" / ARRAY_NAME).read_bytes() == (tmp_path / "remote" / ARRAY_NAME).read_bytes()


def test_a_bad_model_file_is_the_local_runs_clear_error(cluster, recordings, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    assert main([str(recordings), "-o", str(tmp_path / "o.csv"), "--model", str(bad), "--cluster",
                 cluster.scheduler_address]) == 2
    assert f"{bad}: not a loadable model file" in capsys.readouterr().err
