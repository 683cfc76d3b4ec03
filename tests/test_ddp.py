"""Training with DistributedDataParallel on 2 CPU processes (gloo over 127.0.0.1)."""
import os
import socket
import subprocess
import sys

import torch
import yaml

from conftest import ROOT, synthetic_dataset, train_params
from ser import ddp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, size, port, features, metadata, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from ser.features import load
    from ser.training import fit, load_raw

    device = ddp.start(torch.device("cpu"))
    torch.set_num_threads(1)
    x, y, _ = load_raw(str(features), str(metadata), ["angry", "sad"], split="train")
    model, history = fit(train_params(epochs=3), x, y, load(features)[2], 2, device)
    torch.save({"state": model.state_dict(), "history": history}, results / f"rank{rank}.pt")
    ddp.stop()


def test_two_processes_share_the_epoch_and_end_with_the_same_weights(tmp_path, feature_params):
    features, metadata = synthetic_dataset(tmp_path, feature_params)
    torch.multiprocessing.spawn(_rank, args=(2, _free_port(), features, metadata, tmp_path), nprocs=2)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name, value in a["state"].items():
        assert torch.equal(value, b["state"][name]), name  # DDP: gradients averaged, the same steps
    assert a["history"] == b["history"]  # loss and accuracy over both processes' clips
    assert len(a["history"]) == 3


def test_each_rank_takes_a_disjoint_share_of_the_epoch(monkeypatch):
    order = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    shares = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        shares.append(ddp.my_share(order))
    assert len(shares[0]) == len(shares[1]) == 6  # padded so both take as many steps
    assert set(shares[0].tolist()) | set(shares[1].tolist()) == set(range(11))
    assert set(shares[0][:5].tolist()).isdisjoint(shares[1][:5].tolist())
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert torch.equal(ddp.my_share(order), order)  # one process: the loop as it always was


def test_torchrun_trains_with_two_processes_and_rank_0_alone_writes(tmp_path, feature_params):
    from ser.models import load_checkpoint
    from ser.training import load_clips

    features, metadata = synthetic_dataset(tmp_path, feature_params)
    params = {"train": train_params(epochs=6), "confidence": {"unseen_temperature": 1.0}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={_free_port()}", str(ROOT / "stages" / "train.py"), "--features", str(features),
         "--metadata", str(metadata), "--model", str(out / "model.pt"), "--history", str(out / "history.csv"),
         "--metrics", str(out / "train.json")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("train: 1 model(s)") == 1 and "x 2 processes" in result.stdout
    assert result.stdout.count("epoch   6") == 1  # rank 0 reports the epoch of both
    model, meta = load_checkpoint(out / "model.pt", torch.device("cpu"))
    x, y, _ = load_clips(str(features), str(metadata), meta["classes"], split="test")
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy >= 0.9, accuracy  # it learnt the two classes of the actor it never heard

