"""Several processes under ``torchrun``: NCCL on GPUs, gloo on CPU; one process without it.

Gradients are averaged over processes explicitly after each backward pass (one flat all-reduce),
so every process applies the same update and ``P`` processes × ``b`` samples equal one process ×
``P·b`` samples. Only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def start(device_name: str) -> Processes:
    """Join the process group when started by ``torchrun`` (WORLD_SIZE > 1)."""
    from ..validation import resolve_device

    device = resolve_device(device_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes(0, 1, device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), device)


def stop(processes: Processes) -> None:
    if processes.active and dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(parameters, processes: Processes) -> None:
    """Replace each gradient by its mean over the processes (parameters without a gradient are
    skipped: every process takes the same code path)."""
    if not processes.active:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= processes.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def all_sum(values: torch.Tensor, processes: Processes) -> torch.Tensor:
    """Element-wise sum of ``values`` over the processes (a copy)."""
    values = values.clone()
    if processes.active:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier(processes: Processes) -> None:
    if processes.active:
        dist.barrier()
