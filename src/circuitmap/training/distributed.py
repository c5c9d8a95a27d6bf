"""The process group of a distributed run (torchrun sets the environment), or a single process.

Gloo serves CPU runs and NCCL GPU runs. Reductions are no-ops for a single process, so the trainer is one
code path whatever the world size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from circuitmap.errors import CircuitmapError


def world_size() -> int:
    """The number of processes of the run torchrun started (1 outside one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Whether this process writes files and reports (rank 0, or the only process)."""
    return int(os.environ.get("RANK", "0")) == 0


def process_device(device: str | None) -> str | None:
    """The device of this process: under torchrun on GPUs, the GPU of its local rank; else ``device``."""
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is None or world_size() == 1:
        return device
    if device in (None, "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank}"
    return device


@dataclass
class ProcessGroup:
    """This process's rank and the world size; ``main`` is the process that writes files."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: torch.device) -> ProcessGroup:
        """Join the run torchrun started (``WORLD_SIZE`` > 1), or stand alone."""
        world = world_size()
        if world == 1:
            return cls()
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            try:
                dist.init_process_group(backend=backend)
            except (RuntimeError, ValueError) as error:
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise CircuitmapError(f"cannot join the distributed run ({backend}): {first}") from None
        return cls(rank=dist.get_rank(), world=dist.get_world_size())

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over processes (in place)."""
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def min_int(self, value: int) -> int:
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return int(tensor.item())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
