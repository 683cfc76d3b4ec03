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
from ser.labeller import main
from ser.labelling import label_rows

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
    from ser.labelling import collect_inputs

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
    from ser.labelling import collect_inputs
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
    from ser.labelling import collect_inputs

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
    from ser.cluster import cluster_features, connect

    with connect(cluster.scheduler_address) as client:
        _, computed = build(paths, feature_params, tmp_path / "remote", n_jobs=1,
                            compute=cluster_features(client, feature_params, clips_per_task=4))
    assert computed == len(paths)
    assert (tmp_path / "local" / ARRAY_NAME).read_bytes() == (tmp_path / "remote" / ARRAY_NAME).read_bytes()


def test_a_bad_model_file_is_the_local_runs_clear_error(cluster, recordings, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    assert main([str(recordings), "-o", str(tmp_path / "o.csv"), "--model", str(bad), "--cluster",
                 cluster.scheduler_address]) == 2
    assert f"{bad}: not a loadable model file" in capsys.readouterr().err


def _tls_cluster(certs: Path, n_workers: int = 1):
    cert, key = str(certs / "cluster.pem"), str(certs / "cluster.key")
    security = distributed.Security(tls_ca_file=cert, tls_scheduler_cert=cert, tls_scheduler_key=key,
                                    tls_worker_cert=cert, tls_worker_key=key, tls_client_cert=cert,
                                    tls_client_key=key, require_encryption=True)
    return distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                                    protocol="tls", security=security, dashboard_address=None, silence_logs=40)


def test_a_tls_cluster_labels_with_its_certificates_and_refuses_everyone_else(recordings, tiny_checkpoint, tmp_path,
                                                                              capsys):
    from ser.cluster import make_certificates

    certs, other = tmp_path / "certs", tmp_path / "other"
    make_certificates(certs)
    make_certificates(other)  # another cluster's: signed by another authority
    assert (certs / "cluster.key").stat().st_mode & 0o777 == 0o600
    local, remote = tmp_path / "local.csv", tmp_path / "remote.csv"
    common = [str(recordings), "--model", str(tiny_checkpoint), "--precision", "float32", "--speakers", "folder"]
    assert main(common + ["-o", str(local), "--jobs", "1"]) == 1
    with _tls_cluster(certs) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tls://127.0.0.1:")
        assert main(common + ["-o", str(remote), "--cluster", address, "--cluster-certs", str(certs)]) == 1
        a, b = pd.read_csv(remote), pd.read_csv(local)
        pd.testing.assert_frame_equal(a.drop(columns=PROBS + ["confidence"]), b.drop(columns=PROBS + ["confidence"]))
        capsys.readouterr()
        refused = {"no certificates": ["--cluster", address],
                   "another cluster's": ["--cluster", address, "--cluster-certs", str(other)],
                   "plain tcp": ["--cluster", address.replace("tls://", "tcp://")]}
        for why, args in refused.items():
            out = tmp_path / "refused.csv"
            assert main(common + ["-o", str(out)] + args) == 2, why
            err = capsys.readouterr().err
            assert err.startswith("error: --cluster") and "Traceback" not in err and not out.exists(), (why, err)
        with pytest.raises(OSError):  # nor can a plain dask client in, to run code on the workers
            distributed.Client(address.replace("tls://", "tcp://"), timeout=5, set_as_default=False)


def test_certificates_are_never_overwritten(tmp_path):
    from ser.cluster import make_certificates
    from ser.util import UserError

    make_certificates(tmp_path)
    key = (tmp_path / "cluster.key").read_bytes()
    with pytest.raises(UserError, match="refusing to replace a cluster's key"):
        make_certificates(tmp_path)
    assert (tmp_path / "cluster.key").read_bytes() == key


def test_an_unauthenticated_scheduler_beyond_this_machine_is_refused_before_connecting(recordings, tiny_checkpoint,
                                                                                       tmp_path, capsys, monkeypatch):
    import socket

    from ser.cluster import check_address
    from ser.util import UserError

    common = [str(recordings), "-o", str(tmp_path / "o.csv"), "--model", str(tiny_checkpoint)]
    assert main(common + ["--cluster", "tcp://0.0.0.0:9"]) == 2  # every interface, not this machine's loopback
    assert "lets anyone who reaches it run code on its workers" in capsys.readouterr().err
    assert main(common + ["--cluster", "tcp://0.0.0.0:9", "--insecure-cluster"]) == 2  # allowed: then nobody answers
    assert "no Dask scheduler answers there" in capsys.readouterr().err
    # the name is resolved, not read: a name that looks local but is not
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: [(socket.AF_INET, socket.SOCK_STREAM, 6, "",
                        ("10.1.2.3", 0))] if host == "127.0.0.1.example" else real(host, *a, **k))
    with pytest.raises(UserError, match="beyond this machine"):
        check_address("tcp://127.0.0.1.example:8786")
    assert check_address("tcp://localhost:8786") == ("tcp", "localhost")


@pytest.mark.parametrize("address", ["foo://127.0.0.1:8786", "127.0.0.1:8786", "tcp://", "tls://127.0.0.1:8786"])
def test_an_address_that_is_not_a_usable_scheduler_is_one_line(recordings, tiny_checkpoint, tmp_path, capsys, address):
    assert main([str(recordings), "-o", str(tmp_path / "o.csv"), "--model", str(tiny_checkpoint), "--cluster",
                 address]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --cluster {address}: ") and "Traceback" not in err


def test_a_peer_that_accepts_and_never_answers_is_a_clear_error_in_time(recordings, tiny_checkpoint, tmp_path,
                                                                        capsys, monkeypatch):
    import socket
    import threading
    import time

    import ser.cluster

    monkeypatch.setattr(ser.cluster, "CONNECT_TIMEOUT_S", 2)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in range(8)], daemon=True).start()
    try:
        started = time.time()
        code = main([str(recordings), "-o", str(tmp_path / "o.csv"), "--model", str(tiny_checkpoint), "--cluster",
                     f"tcp://127.0.0.1:{server.getsockname()[1]}"])
        took = time.time() - started
    finally:
        for connection, _ in held:
            connection.close()
        server.close()
    assert code == 2 and took < 15, took
    assert "no Dask scheduler answered in 2 s" in capsys.readouterr().err


def test_the_only_worker_killed_mid_run_loses_no_row(recordings, tiny_checkpoint):
    from ser.labelling import collect_inputs

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
    from ser.labelling import collect_inputs
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
