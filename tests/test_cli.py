"""The `ser` command's dispatch and its small subcommands."""
import subprocess
import sys

from conftest import ROOT


def _ser(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ser", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cluster_certs_writes_a_private_key_and_prints_the_dask_options(tmp_path):
    done = _ser("cluster-certs", str(tmp_path / "certs"))
    assert done.returncode == 0, done.stderr
    cert, key = tmp_path / "certs" / "cluster.pem", tmp_path / "certs" / "cluster.key"
    assert cert.read_text().startswith("-----BEGIN CERTIFICATE-----") and key.stat().st_mode & 0o777 == 0o600
    assert f"--tls-ca-file {cert} --tls-cert {cert} --tls-key {key}" in done.stdout
    again = _ser("cluster-certs", str(tmp_path / "certs"))
    assert again.returncode == 2 and "refusing to replace a cluster's key" in again.stderr


def test_an_unknown_command_shows_the_usage_and_exits_2():
    done = _ser("nonsense")
    assert done.returncode == 2 and "ser label INPUT" in done.stderr and "ser cluster-certs DIR" in done.stderr
