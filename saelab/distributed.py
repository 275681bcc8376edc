"""Data parallelism under torchrun: which rank this is, and the few collectives training needs.

Gradients are averaged by hand in one flat all-reduce (no DistributedDataParallel wrapper) because
the sparse TopK step computes them without autograd. One process per device; gloo on CPU, nccl on GPU.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


class World:
    """torchrun data parallelism: rank/size from the environment, gloo (CPU) or nccl (GPU)."""

    def __init__(self, device: torch.device):
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.owns_group = False
        if self.size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.owns_group = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(t)
        return t

    def mean_grads_(self, params: list[torch.Tensor]) -> None:
        """Average the gradients over ranks in one collective (manual DDP; our grads are hand-made)."""
        if self.size == 1:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= self.size
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x [n, d]`` in rank order (= the rows of one global batch)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def broadcast_(self, t: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.broadcast(t, 0)
        return t

    def close(self) -> None:
        if self.owns_group:
            dist.barrier()
            dist.destroy_process_group()


def default_device(device: str | None = None) -> torch.device:
    """``device`` if given; else this rank's GPU (``LOCAL_RANK``) when CUDA is available; else the CPU."""
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")
