"""Labelling and feature extraction on a Dask cluster (`ser label --cluster tls://host:8786`).

The cluster runs the same code as the local run: files are cut into shards, each worker
loads the model once (its bytes are sent to every worker, so workers need the audio at the
same paths but not the model file) and labels a shard with ser.labelling.label_rows, one
process decoding and inferring; the rows come back and are put in path order, so the output
has the local run's columns, error rows and order. A speaker group is never split between
shards, so speaker statistics are those of the local run.

A worker that dies mid-shard loses nothing: the scheduler runs its shard again on another
worker (Dask's `distributed.scheduler.allowed-failures`, 3 by default, before it gives up),
and each shard's rows are taken once, from its one result, so none is lost or doubled. When
the only worker dies the model's bytes die with it: the shards not done are sent again, with
the model, once a worker is back (RESUBMITS times at most).

Whoever reaches a Dask scheduler runs code on its workers. So beyond this machine only a
TLS scheduler is used, both ends showing a certificate of the cluster's own authority
(`ser cluster-certs DIR` makes one; dask then refuses anyone without it); plain tcp:// is
for 127.0.0.1, or for a network that is the user's alone when they say so (insecure=True).
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from ser.audio import FeatureParams, LogMel, Settings
from ser.util import UserError, is_loopback

if TYPE_CHECKING:
    from distributed import Client, Security

    from ser.labelling import Table

FILES_PER_SHARD = 64  # 0.2 s of one core's work for 3.7-s clips; the cluster path costs 0.4 ms a file
CONNECT_TIMEOUT_S = 30
WORKER_WAIT_S = 120  # how long a run with no worker left waits for one to come (back)
RESUBMITS = 3  # rounds of resending the shards not done after the model's bytes were lost
CERT_FILE, KEY_FILE = "cluster.pem", "cluster.key"  # what `ser cluster-certs DIR` writes
CERT_DAYS = 825
_models: dict[str, tuple[Any, dict[str, Any], Any]] = {}  # on a worker: model digest -> (model, meta, device)
_tuning: Any = None  # on a worker: its BLAS thread limit, held


def make_certificates(folder: str | Path) -> tuple[Path, Path]:
    """A private key and a self-signed certificate that is at once the cluster's authority and
    every member's certificate (as dask's Security.temporary, but in files to copy to each
    machine): whoever lacks the key cannot join or use the cluster. Refuses to overwrite."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = Path(folder)
    cert_path, key_path = folder / CERT_FILE, folder / KEY_FILE
    for path in (cert_path, key_path):
        if path.exists() or path.is_symlink():
            raise UserError(f"{path}: exists; refusing to replace a cluster's key (choose another folder)")
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ser-cluster")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("ser-cluster")]), critical=False)
            .sign(key, hashes.SHA256()))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def security_of(certs: str | Path) -> "Security":
    """dask's TLS settings from a folder that `ser cluster-certs` wrote (mutual TLS: the
    scheduler and workers check this client's certificate, and it theirs)."""
    from distributed import Security

    folder = Path(certs)
    cert, key = folder / CERT_FILE, folder / KEY_FILE
    for path in (cert, key):
        if not path.is_file():
            raise UserError(f"--cluster-certs {certs}: no {path.name} there (make them with `ser cluster-certs "
                            f"{certs}` and copy the folder to every machine of the cluster)")
    return Security(tls_ca_file=str(cert), tls_client_cert=str(cert), tls_client_key=str(key),
                    require_encryption=True)


def check_address(address: str, certs: str | Path | None = None, insecure: bool = False) -> tuple[str, str]:
    """(scheme, host) of a scheduler address that may be used: tls:// with the cluster's
    certificates; tcp:// only to this machine, or anywhere with insecure=True."""
    scheme, sep, rest = address.partition("://")
    host = rest.rsplit(":", 1)[0] if ":" in rest else rest
    if not sep or scheme not in ("tcp", "tls") or not host:
        raise UserError(f"--cluster {address}: give a Dask scheduler as tls://HOST:PORT (or tcp://127.0.0.1:PORT "
                        "on this machine)")
    if scheme == "tls" and certs is None:
        raise UserError(f"--cluster {address}: a TLS scheduler needs the cluster's certificates: --cluster-certs DIR "
                        "(made by `ser cluster-certs DIR`)")
    if scheme == "tcp" and not insecure and not is_loopback(host):
        raise UserError(f"--cluster {address}: a tcp:// scheduler beyond this machine lets anyone who reaches it run "
                        "code on its workers; use tls:// with --cluster-certs (README), or --insecure-cluster on a "
                        "network that is yours alone")
    return scheme, host


def connect(address: str, certs: str | Path | None = None, insecure: bool = False) -> "Client":
    """A client of the scheduler at `address` (check_address), or a clear error within about
    CONNECT_TIMEOUT_S, also when something there accepts the connection and never answers."""
    from distributed import Client

    check_address(address, certs, insecure)
    security = None if certs is None else security_of(certs)
    outcome: dict[str, Any] = {}

    def attempt() -> None:
        try:
            outcome["client"] = Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False, security=security)
        except BaseException as e:  # handed to the caller's thread
            outcome["error"] = e

    thread = threading.Thread(target=attempt, name="ser-cluster-connect", daemon=True)
    thread.start()
    thread.join(CONNECT_TIMEOUT_S + 5)
    if thread.is_alive():  # dask's own timeout does not cover a peer that never speaks
        raise UserError(f"--cluster {address}: something accepts connections there but no Dask scheduler answered in "
                        f"{CONNECT_TIMEOUT_S} s (a TLS scheduler is tls://, a plain one tcp://)")
    error = outcome.get("error")
    if error is None:
        return outcome["client"]
    if isinstance(error, (OSError, TimeoutError, ValueError)):
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"--cluster {address}: no Dask scheduler answers there, or it refused this client ({reason})")
    raise error


def shards_of(paths: list[Path], groups: list[str] | None, files_per_shard: int = FILES_PER_SHARD
              ) -> list[list[int]]:
    """Indices of `paths` cut into shards of about files_per_shard, in path order; with
    speaker `groups`, each group whole in one shard (a group bigger than a shard is one)."""
    if groups is None:
        return [list(range(i, min(i + files_per_shard, len(paths)))) for i in range(0, len(paths), files_per_shard)]
    members: dict[str, list[int]] = {}
    for i, key in enumerate(groups):
        members.setdefault(key, []).append(i)
    shards: list[list[int]] = [[]]
    for indices in members.values():
        if shards[-1] and len(shards[-1]) + len(indices) > files_per_shard:
            shards.append([])
        shards[-1].extend(indices)
    return [s for s in shards if s]


def _worker_model(model_bytes: bytes, digest: str, device_name: str, fuse: bool = True
                  ) -> tuple[Any, dict[str, Any], Any]:
    """The model, loaded once per worker process (kept by its digest); fuse: False keeps it
    trainable, to adapt to each speaker group (Settings.adapt)."""
    digest = f"{digest} {'fused' if fuse else 'trainable'}"
    if digest not in _models:
        import tempfile

        import torch

        from ser.labelling import one_core_worker
        from ser.models import load_checkpoint
        from ser.device import pick_device

        # One thread a worker, as the local labeller's feature workers: and glibc's heap kept,
        # which Dask's workers otherwise trim at 64 kB (MALLOC_TRIM_THRESHOLD_): 2x slower, measured.
        global _tuning
        _tuning = one_core_worker()
        torch.set_num_threads(1)
        device = pick_device(device_name)
        with tempfile.NamedTemporaryFile(suffix=".pt") as f:
            f.write(model_bytes)
            f.flush()
            model, meta = load_checkpoint(f.name, device, fuse=fuse)
        _models.clear()
        _models[digest] = (model, meta, device)
    return _models[digest]


def label_shard(paths: list[str], groups: list[str] | None, model_bytes: bytes, digest: str,
                settings: Settings, speakers: str, device_name: str) -> tuple[list[dict], list[dict]]:
    """On a worker: label_rows of one shard in this process (file rows, window rows)."""
    import dataclasses

    from ser.labelling import label_rows

    model, meta, device = _worker_model(model_bytes, digest, device_name, fuse=not (settings.adapt and groups))
    serial = dataclasses.replace(settings, n_jobs=1)  # the worker is the parallelism
    files, segments = label_rows([Path(p) for p in paths], model, meta, serial, device, None, speakers,
                                 groups=groups)
    return files.rows, segments.rows


def label_on_cluster(client: "Client", paths: list[Path], model_path: str | Path, classes: list[str],
                     settings: Settings, speakers: str = "none", groups: list[str] | None = None,
                     device_name: str = "auto", files_per_shard: int = FILES_PER_SHARD,
                     on_shard: Callable[[int, int], None] | None = None) -> tuple["Table", "Table"]:
    """label_rows of `paths` on the cluster: (file rows, window rows), in path order.
    on_shard(done, total) is called as each shard's rows arrive."""
    from distributed import as_completed

    from ser.labelling import file_table, segment_table

    model_bytes = Path(model_path).read_bytes()
    digest = hashlib.sha256(model_bytes).hexdigest()
    shards = shards_of(paths, groups, files_per_shard)
    results: list[tuple[list[dict], list[dict]] | None] = [None] * len(shards)
    done = 0
    for _ in range(RESUBMITS + 1):
        todo = [n for n, result in enumerate(results) if result is None]
        if not todo:
            break
        _wait_for_a_worker(client)
        [model_future] = client.scatter([model_bytes], broadcast=True, hash=False)
        futures = {client.submit(label_shard, [str(paths[i]) for i in shards[n]],
                                 None if groups is None else [groups[i] for i in shards[n]], model_future, digest,
                                 settings, speakers, device_name, pure=False): n for n in todo}
        try:
            for future in as_completed(list(futures), loop=client.loop):
                results[futures[future]] = _shard_result(future, [paths[i] for i in shards[futures[future]]])
                if results[futures[future]] is None:
                    continue  # the model's bytes died with the only worker: sent again next round
                done += 1
                if on_shard is not None:
                    on_shard(done, len(shards))
        except (OSError, TimeoutError) as e:  # distributed's CommClosedError is an OSError
            raise UserError(f"the cluster's scheduler was lost mid-run ({e}); nothing written") from None
        finally:
            client.cancel(list(futures) + [model_future])
    if any(result is None for result in results):
        raise UserError(f"the cluster lost its workers {RESUBMITS + 1} times; nothing written")
    order = {str(p): i for i, p in enumerate(paths)}
    rows = sorted((r for files, _ in results for r in files), key=lambda r: order[r["path"]])
    segments = sorted((r for _, segs in results for r in segs), key=lambda r: order[r["path"]])  # stable
    if len(rows) != len(paths):
        raise RuntimeError(f"the cluster returned {len(rows)} rows for {len(paths)} files")
    return file_table(classes, rows), segment_table(classes, segments)


def _wait_for_a_worker(client: "Client") -> None:
    if client.status != "running":
        raise UserError("the cluster's scheduler was lost mid-run; nothing written")
    try:
        client.wait_for_workers(1, timeout=WORKER_WAIT_S)
    except (OSError, TimeoutError):
        raise UserError(f"the cluster has no worker (waited {WORKER_WAIT_S} s); nothing written") from None


def _shard_result(future: Any, shard: list[Path]) -> Any:
    """A shard's rows, or None when its task was cancelled because the model's bytes were lost
    with a worker; a shard that killed every worker it ran on is a clear error."""
    from concurrent.futures import CancelledError

    from distributed.scheduler import KilledWorker

    if future.status in ("cancelled", "lost"):
        return None
    try:
        return future.result()
    except CancelledError:  # finished, then forgotten with the lost data before it was gathered
        return None
    except KilledWorker:
        raise UserError(f"the cluster's workers died each time they labelled the shard of {shard[0]} ... "
                        f"{shard[-1]} (a file there may crash its decoder: try it locally); nothing written") from None


def cluster_features(client: "Client", fp: FeatureParams, clips_per_task: int = 32
                     ) -> Callable[[list[str]], Iterator[tuple[np.ndarray, np.ndarray]]]:
    """What ser.features.build computes its clips with on the cluster (compute_on_cluster)."""
    from tqdm import tqdm

    def compute(paths: list[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        yield from tqdm(compute_on_cluster(client, paths, fp, clips_per_task), total=len(paths),
                        desc="features (cluster)", unit="clip")

    return compute


def compute_on_cluster(client: "Client", paths: list[str], fp: FeatureParams, clips_per_task: int,
                       tasks_ahead: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(log-Mel, functionals) of `paths`, in order, computed by the cluster's workers (LogMel.clip_features,
    the local run's code, so the same bytes). At most `tasks_ahead` tasks (default: two per
    worker thread) are submitted and not yet read, so the workers never hold more than those
    tasks' features, however many clips there are."""
    extractor = LogMel(fp)
    chunks = iter([paths[i : i + clips_per_task] for i in range(0, len(paths), clips_per_task)])
    ahead = tasks_ahead or max(2, 2 * sum(client.nthreads().values()))
    pending: deque = deque()

    def submit_next() -> None:
        chunk = next(chunks, None)
        if chunk is not None:
            pending.append(client.submit(_features_of, extractor, chunk, pure=False))

    for _ in range(ahead):
        submit_next()
    try:
        while pending:  # in order; the next tasks are computed meanwhile
            future = pending.popleft()
            submit_next()
            yield from future.result()
            future.release()
    finally:
        client.cancel(list(pending))


def _features_of(extractor: LogMel, paths: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [extractor.clip_features(p) for p in paths]
