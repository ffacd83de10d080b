"""IBN-Net's mixed norm (Pan et al. 2018): InstanceNorm on some channels, BatchNorm on the rest.

Instance-normalizing part of the channels removes per-image appearance (colour,
style, contrast) while the BatchNorm part keeps the content features, which
helps models generalize across domains without losing accuracy.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ._state import KINDS, bn_dim, copy_kinds, factory_kwargs, require_bn


class IBN(nn.Module):
    """The IBN-a norm: channels [:half] through ``IN`` (affine), channels [half:] through ``BN``.

    ``half = int(num_features * ratio)``. Attribute names follow the reference IBN-Net code,
    so its checkpoints load.
    """

    def __init__(self, num_features: int, ratio: float = 0.5, eps: float = 1e-5, momentum: float | None = 0.1, *,
                 device=None, dtype=None):
        super().__init__()
        half = int(num_features * ratio)
        if not 0 < half < num_features:
            raise ValueError(f"IBN: ratio={ratio} gives {half} of {num_features} channels to InstanceNorm; "
                             f"both parts need at least one channel (0 < int(num_features * ratio) < {num_features})")
        kw = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.ratio = ratio
        self.half = half
        self.IN = nn.InstanceNorm2d(half, eps=eps, affine=True, **kw)
        self.BN = nn.BatchNorm2d(num_features - half, eps=eps, momentum=momentum, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"IBN expects 4D input (N, C, H, W), got {x.ndim}D input")
        if x.shape[1] != self.num_features:
            raise ValueError(f"IBN({self.num_features}) got an input with {x.shape[1]} channels (shape {tuple(x.shape)})")
        x_in, x_bn = torch.split(x, [self.half, self.num_features - self.half], dim=1)
        # contiguous: BN's kernel for a strided view rounds differently; this way the BN half is
        # bit-identical to the full BatchNorm on those channels
        return torch.cat([self.IN(x_in), self.BN(x_bn.contiguous())], dim=1)

    def extra_repr(self) -> str:
        return f"{self.num_features}, ratio={self.ratio}, half={self.half}"

    def carry_names(self) -> dict[str, dict[str, str]]:
        """Where a BN's state goes (``normswap.layers._state`` map syntax): channels [:half] into ``IN``, the
        rest into ``BN``."""
        k = self.half
        return {
            "affine": {f"weight[:{k}]": "IN.weight[:]", f"bias[:{k}]": "IN.bias[:]",
                       f"weight[{k}:]": "BN.weight[:]", f"bias[{k}:]": "BN.bias[:]"},
            "running_stats": {f"running_mean[{k}:]": "BN.running_mean[:]", f"running_var[{k}:]": "BN.running_var[:]",
                              "num_batches_tracked": "BN.num_batches_tracked"},
        }

    @classmethod
    def like(cls, bn: nn.Module, ratio: float = 0.5) -> IBN:
        """A fresh IBN of ``bn``'s size, eps, momentum, device and dtype: identity affine, statistics 0 / 1."""
        require_bn(bn, cls.__name__, needs_stats=False)
        if bn_dim(bn) not in (None, 2):
            raise ValueError(f"IBN is a 2d layer; cannot build it from a {type(bn).__name__}")
        return cls(bn.num_features, ratio=ratio, eps=bn.eps, momentum=bn.momentum, **factory_kwargs(bn))

    @classmethod
    def from_bn(cls, bn: nn.Module, ratio: float = 0.5) -> "IBN":
        """An IBN whose ``IN`` takes γ/β of ``bn``'s channels [:half] and whose ``BN`` takes the rest.

        ``BN`` also carries the running statistics, num_batches_tracked, eps and momentum
        (``None`` included); ``IN`` gets eps. A BN without affine gives γ = 1, β = 0.
        timm's BatchNormAct2d counts as a BatchNorm2d; its activation is not carried.
        """
        require_bn(bn, cls.__name__, needs_stats=True)
        new = cls.like(bn, ratio=ratio)
        copy_kinds(bn, new, KINDS)
        new.train(bn.training)
        return new
