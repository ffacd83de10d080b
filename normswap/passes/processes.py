"""The processes of a torch.distributed group, pooled in rank order.

An ``all_reduce`` sums in whatever order the backend takes, so floating-point
results can differ by rank and by run; gathering every process's part and
combining the parts in rank order gives every rank the same bits. Without an
initialized group these are the one-process identities.
"""
from __future__ import annotations

import torch


def world(group=None) -> tuple[int, int]:
    """(this process's rank, the number of processes); (0, 1) without an initialized group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def device(group=None) -> torch.device:
    """Where the group's collectives take their tensors: the current GPU for NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gathered(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    """``t`` from every process, in rank order, on ``t``'s device (every process passes a tensor of the same
    shape and dtype); ``[t]`` on one process."""
    import torch.distributed as dist

    size = world(group)[1]
    if size == 1:
        return [t]
    sent = t.to(device(group)).contiguous()
    parts = [torch.empty_like(sent) for _ in range(size)]
    dist.all_gather(parts, sent, group=group)
    return [p.to(t.device) for p in parts]


def summed(t: torch.Tensor, group=None) -> torch.Tensor:
    """``t`` summed over every process in rank order: the same bits on every rank."""
    parts = gathered(t, group)
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def all_reduce_int(value: int, group=None, op: str = "sum") -> int:
    """``value`` summed (or its minimum taken) over every process; itself on one process (integers: exact)."""
    import torch.distributed as dist

    if world(group)[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.SUM, group=group)
    return int(t.item())
