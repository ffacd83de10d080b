"""Pooled per-channel mean and variance over many chunks: pure tensor math.

Each chunk's count, mean and sum of squared deviations (M2) are taken in the
data's dtype; chunks are then combined in float64 with Chan et al.'s pairwise
update, in a fixed order, so the result does not depend on how the data was
split or on which process held which chunk:

    n = n_a + n_b,  δ = mean_b − mean_a,
    mean = mean_a + δ · n_b / n,  M2 = M2_a + M2_b + δ² · n_a · n_b / n.

Averaging per-batch variances (a momentum or per-batch-average estimate) drops
the δ² term, the variance *between* chunks, and is biased when data arrives
sorted; summing x and x² in one pass loses precision to cancellation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Moments:
    """Per-channel count, mean and sum of squared deviations, in float64."""

    n: float
    mean: torch.Tensor
    m2: torch.Tensor

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased (n − 1), as BatchNorm's running_var."""
        return self.m2 / max(self.n - 1.0, 1.0)

    def to_tensor(self) -> torch.Tensor:
        """(2·C + 1,) float64: [n, mean..., M2...], for collectives."""
        return torch.cat([torch.tensor([self.n], dtype=torch.float64, device=self.mean.device), self.mean, self.m2])

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "Moments":
        c = (t.numel() - 1) // 2
        return cls(float(t[0].item()), t[1:1 + c].clone(), t[1 + c:].clone())


def chunk_moments(x: torch.Tensor, channel_dim: int = 1) -> Moments:
    """Moments of one chunk over every dim but ``channel_dim``, in x's dtype, returned as float64."""
    dims = [d for d in range(x.ndim) if d != channel_dim]
    n = x.numel() // x.shape[channel_dim] if x.numel() else 0
    if n == 0:
        zeros = torch.zeros(x.shape[channel_dim], dtype=torch.float64, device=x.device)
        return Moments(0.0, zeros, zeros.clone())
    x = x.detach()
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()  # sums of thousands of squares overflow float16
    mean = x.mean(dim=dims, keepdim=True)  # two passes, in x's dtype: faster on CPU than var_mean here
    m2 = (x - mean).square().sum(dim=dims)
    return Moments(float(n), mean.flatten().double(), m2.double())


def combine(a: Moments, b: Moments) -> Moments:
    """Chan's pairwise update (see the module docstring)."""
    if a.n == 0:
        return b
    if b.n == 0:
        return a
    n = a.n + b.n
    delta = b.mean - a.mean
    return Moments(n, a.mean + delta * (b.n / n), a.m2 + b.m2 + delta.square() * (a.n * b.n / n))


def combine_all(parts: list[Moments]) -> Moments:
    """Combine in list order (the order is part of the result's last bits: keep it fixed)."""
    out = parts[0]
    for p in parts[1:]:
        out = combine(out, p)
    return out
