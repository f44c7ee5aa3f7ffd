"""torchrun / DistributedDataParallel plumbing: one process per GPU (nccl) or per CPU share (gloo).

``torchrun --standalone --nproc_per_node=N -m eva_api train ...`` sets RANK, LOCAL_RANK and WORLD_SIZE;
without them everything runs as a single process and these helpers are no-ops.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .errors import ConfigError
from .runtime import pick_device


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Join the process group when launched by torchrun; pick this rank's device.

    CUDA: backend nccl, one GPU per rank chosen by LOCAL_RANK. CPU: backend gloo. The timeout bounds
    how long surviving ranks wait in a collective when one rank has died (torchrun also stops the
    whole group as soon as any rank exits with an error).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if world_size <= 1 and "RANK" not in os.environ:  # a plain process; under torchrun even 1 rank joins a group
        return DistInfo(0, 0, 1, device)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"torchrun started more processes on this machine than it has GPUs "
                              f"({torch.cuda.device_count()}); use --nproc_per_node={torch.cuda.device_count()} or fewer")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "mps" and device_name != "auto":  # "auto" on a Mac: the ranks share the CPU (gloo) below
        raise ConfigError("torchrun cannot share MPS (Apple GPUs) between processes: no collective backend "
                          "runs on it; use --device cpu (gloo), or train without torchrun on mps")
    else:
        device = torch.device("cpu")
        backend = "gloo"
        # share the cores between the ranks instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, local_rank, world_size, device)


def cleanup_distributed() -> None:
    if dist_ready():
        torch.distributed.destroy_process_group()


def dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist_ready():
        torch.distributed.barrier()


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks (identity in a single process)."""
    if not dist_ready():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on at least one (so all ranks stop at the same step)."""
    if not dist_ready():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` in a single process)."""
    if not dist_ready():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out
