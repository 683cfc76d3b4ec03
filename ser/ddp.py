"""Training on several processes with DistributedDataParallel, when started by torchrun:

    torchrun --nproc_per_node=2 stages/train.py ...     # gloo on CPU, NCCL on GPUs

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them (a plain `python stages/train.py`)
everything here is a no-op and training is the one-process loop. Each process takes its own
slice of every epoch's shuffled order (the order is drawn from the same seed on every rank),
DDP averages the gradients, so the processes hold the same weights after every step; the
global batch is batch_size x processes. Only rank 0 writes outputs.
"""
from __future__ import annotations

import os

import torch


def world() -> tuple[int, int]:
    """(this process's rank, number of processes): (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    """Whether this process writes outputs (rank 0, or the only process)."""
    return world()[0] == 0


def start(device: torch.device) -> torch.device:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA); return this
    rank's device (its own GPU: cuda:LOCAL_RANK)."""
    rank, size = world()
    if size == 1 or torch.distributed.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=size)
    return device


def stop() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model as DDP sees it (gradients averaged over the processes), or itself alone."""
    if world()[1] == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def seed_augmentation(seed: int) -> None:
    """A process's own random augmentation (rank k: seed + 1000 k); one process: unchanged."""
    rank, size = world()
    if size > 1:
        torch.manual_seed(seed + 1000 * rank)


def my_share(order: torch.Tensor) -> torch.Tensor:
    """This rank's slice of an epoch's order: every size-th clip from its rank on, the order
    padded by its own start to a multiple of the processes so that every rank takes as many
    steps (DistributedSampler's rule). One process: the order itself."""
    rank, size = world()
    if size == 1:
        return order
    padded = torch.cat([order, order[: (-len(order)) % size]])
    return padded[rank::size]


def sum_over_ranks(*values: float) -> list[float]:
    """Each value summed over the processes (the epoch's loss and accuracy of all clips)."""
    if world()[1] == 1:
        return list(values)
    total = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(total)
    return total.tolist()
