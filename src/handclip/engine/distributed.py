"""Multi-GPU training with ``torchrun``: the process group and the few collectives the trainer needs.

``torchrun --nproc_per_node N -m handclip train ...`` starts N processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` set. :func:`setup` joins them into one process group (NCCL
on GPUs, gloo on CPUs) and pins each process to GPU ``LOCAL_RANK``. Without torchrun every
function here is a cheap no-op for a single process, so the trainer calls them unconditionally.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Iterable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from handclip.errors import UserError

# Rank 0 alone validates and writes checkpoints while the others wait at a barrier; a large
# validation set must not trip the collective timeout (NCCL's default is 10 minutes).
TIMEOUT = timedelta(minutes=60)


def launched() -> bool:
    """Whether this process is one of several started by torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the one process that validates, prints and writes files."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """The GPU of this process (``cuda:LOCAL_RANK``) when torchrun started it; else ``device``."""
    if device.type == "cuda" and launched() and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def setup(device: torch.device) -> torch.device:
    """Join torchrun's process group once (no-op for a single process); returns this process's device."""
    device = local_device(device)
    if not launched() or active():
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("train.device: torchrun was asked for GPUs but no CUDA GPU is available here")
        if device.index >= torch.cuda.device_count():
            raise UserError(f"torchrun --nproc_per_node: local rank {device.index} has no GPU "
                            f"(this machine has {torch.cuda.device_count()})")
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    return device


def teardown() -> None:
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def wrap_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when several processes train, else ``model`` itself.

    ``static_graph``: every step uses the same parameters, so DDP finds any that never get a
    gradient (e.g. the projection when the metric feature is taken before it) in the first step
    and skips them from then on; ``find_unused_parameters`` would search the graph every step.
    Frozen parameters (requires_grad False) are ignored by DDP anyway.
    """
    if not active():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   static_graph=True)


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Average the gradients of parameters outside the DDP model (the loss's centres and ArcFace
    class weights) over the processes, so every process takes the same optimiser step."""
    if not active():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # one collective instead of one per tensor
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def sum_over_processes(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over every process (the epoch's loss totals and image counts)."""
    if active():
        values = values.clone()
        dist.all_reduce(values)
    return values


def broadcast_from_main(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``tensor`` on every process (in place), so all train against the same values."""
    if active():
        dist.broadcast(tensor, src=0)
    return tensor
