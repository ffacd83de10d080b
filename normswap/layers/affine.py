"""A fixed per-channel affine: what an eval-mode BatchNorm computes, without the statistics."""
from __future__ import annotations

import torch
import torch.nn as nn

from ._state import activation_module


class ChannelAffine(nn.Module):
    """y = x * scale + shift over dim 1, then the activation a timm norm-act layer carried.

    What an eval-mode BN becomes when it cannot be folded into a neighbour: one
    multiply-add per element instead of BN's four, same result.
    """

    def __init__(self, num_features: int, *, device=None, dtype=None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
        self.shift = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        self.act: nn.Module = nn.Identity()

    @classmethod
    def from_bn(cls, bn: nn.Module) -> "ChannelAffine":
        from ..fold_math import bn_affine

        s, t = bn_affine(bn.running_mean, bn.running_var, getattr(bn, "weight", None), getattr(bn, "bias", None),
                         float(bn.eps))
        ref = bn.running_mean
        new = cls(s.numel(), device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            new.scale.copy_(s.to(ref.dtype))
            new.shift.copy_(t.to(ref.dtype))
        act = activation_module(bn)  # what normswap.carry.activation_or_identity keeps
        if act is not None:
            new.act = act
        new.train(bn.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1, -1] + [1] * (x.ndim - 2)
        return self.act(x * self.scale.reshape(shape) + self.shift.reshape(shape))

    def extra_repr(self) -> str:
        return f"{self.scale.numel()}"
