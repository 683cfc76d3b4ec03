"""A Dask cluster on 127.0.0.1 (started and stopped by the tests): connecting safely (TLS of the
cluster's own key, refusals, deadlines) and the features stage's clips computed there."""
from pathlib import Path

import distributed
import pandas as pd
import pytest

from ser.audio import LogMel
from ser.cluster import compute_on_cluster
from ser.corpora import EMOTIONS
from ser.features import compute_parallel
from ser.labeller.cli import main

PROBS = [f"prob_{c}" for c in EMOTIONS]


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
