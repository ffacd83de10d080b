"""Error figures between a reference tensor and a candidate: pure tensor math, float64 inside.

Relative errors are relative to the reference's scale, ``|ref - cand| / max|ref|``:
an element-wise ratio explodes wherever the reference is near zero, so one
near-zero logit would decide the verdict.
"""
from __future__ import annotations

import math

import torch


def scale_of(ref: torch.Tensor) -> float:
    """max |ref| (0 for an empty tensor)."""
    return ref.detach().double().abs().max().item() if ref.numel() else 0.0


def max_errors(ref: torch.Tensor, cand: torch.Tensor, scale: float | None = None) -> tuple[float, float]:
    """(max abs, max rel) with rel relative to max |ref| (or ``scale``); inf where either is non-finite."""
    if not ref.numel():
        return 0.0, 0.0
    r, c = ref.detach(), cand.detach()
    if r.dtype != torch.float64 or c.dtype != torch.float64:
        r, c = r.double(), c.double()
    diff = (r - c).abs().max().item()
    if not math.isfinite(diff):
        return math.inf, math.inf
    if scale is None:
        scale = r.abs().max().item()
    return diff, (diff / scale if scale > 0 else diff)


def quantile(values: torch.Tensor, q: float) -> float:
    """The q-quantile (nearest rank) of a 1-d tensor of any length (torch.quantile stops at 16M elements)."""
    n = values.numel()
    if n == 0:
        return 0.0
    k = min(n, max(1, math.ceil(q * n)))
    return values.kthvalue(k).values.item()


def distribution(values: torch.Tensor) -> dict[str, float]:
    """mean / median / p99 of a 1-d float64 tensor."""
    if not values.numel():
        return {"mean": 0.0, "median": 0.0, "p99": 0.0}
    return {"mean": values.mean().item(), "median": quantile(values, 0.5), "p99": quantile(values, 0.99)}


def cosine(ref: torch.Tensor, cand: torch.Tensor) -> float:
    """Cosine similarity of the flattened tensors (1.0 for two all-zero tensors)."""
    r, c = ref.detach().double().flatten(), cand.detach().double().flatten()
    nr, nc = r.norm().item(), c.norm().item()
    if nr == 0 and nc == 0:
        return 1.0
    if nr == 0 or nc == 0:
        return 0.0
    return (r @ c).item() / (nr * nc)


def looks_like_logits(t: torch.Tensor) -> bool:
    """A (batch, classes) floating output with more than one class: top-1 agreement means something."""
    return t.is_floating_point() and t.ndim == 2 and t.shape[1] > 1


def top1_matches(ref: torch.Tensor, cand: torch.Tensor) -> tuple[int, int]:
    """(rows whose argmax agrees, rows) for (batch, classes) outputs."""
    return int((ref.argmax(dim=1) == cand.argmax(dim=1)).sum().item()), int(ref.shape[0])


def channel_affine(x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, axis: int) -> torch.Tensor:
    """s·x + t along ``axis`` (an eval-mode BN as arithmetic), in x's dtype."""
    shape = [1] * x.ndim
    shape[axis] = -1
    return x * s.to(x.dtype).reshape(shape) + t.to(x.dtype).reshape(shape)
