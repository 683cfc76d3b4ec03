"""A Dask cluster: connecting to it safely, and the features stage's clips computed on it
(labelling on it: ser.cluster_labelling).

Whoever reaches a Dask scheduler runs code on its workers. So beyond this machine only a
TLS scheduler is used, both ends showing a certificate of the cluster's own authority
(`ser cluster-certs DIR` makes one; dask then refuses anyone without it); plain tcp:// is
for 127.0.0.1, or for a network that is the user's alone when they say so (insecure=True).
"""
from __future__ import annotations

import os
import threading
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from ser.audio import FeatureParams, LogMel
from ser.util import UserError, is_loopback

if TYPE_CHECKING:
    from distributed import Client, Security

CONNECT_TIMEOUT_S = 30
CERT_FILE, KEY_FILE = "cluster.pem", "cluster.key"  # what `ser cluster-certs DIR` writes
CERT_DAYS = 825


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
