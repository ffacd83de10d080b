"""Batch Renormalization (Ioffe 2017): BatchNorm that stays correct with small or non-i.i.d. batches.

Training normalizes with the batch statistics corrected towards the running ones
(r, d), so train and eval compute the same function in expectation; eval is
exactly an eval-mode BatchNorm, so a BN converted to it keeps its eval outputs.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._state import KINDS, bn_dim, copy_kinds, factory_kwargs, require_bn


class _BatchRenorm(nn.Module):
    """y = ((x - μ_B) / σ_B · r + d) · γ + β in training, an eval-mode BatchNorm otherwise.

    r = clamp(σ_B / σ, 1/rmax, rmax) and d = clamp((μ_B - μ) / σ, -dmax, dmax) use the
    running statistics (μ, σ) and carry no gradient. ``rmax`` and ``dmax`` are plain
    attributes, so a training loop can ramp them up as the paper does. Parameter and
    buffer names are BatchNorm's, so state dicts load either way.
    """

    _dim: int  # 1, 2 or 3, as in BatchNorm1d/2d/3d; set by the subclasses

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, rmax: float = 3.0,
                 dmax: float = 5.0, affine: bool = True, *, device=None, dtype=None):
        super().__init__()
        if rmax < 1.0:
            raise ValueError(f"rmax must be >= 1 (r is clamped to [1/rmax, rmax]), got {rmax}")
        if dmax < 0.0:
            raise ValueError(f"dmax must be >= 0 (d is clamped to [-dmax, dmax]), got {dmax}")
        kw = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.rmax = rmax
        self.dmax = dmax
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **kw))
            self.bias = nn.Parameter(torch.zeros(num_features, **kw))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def _check_input_dim(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) got an input with {x.shape[1]} channels "
                             f"(shape {tuple(x.shape)})")
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

        dims = [0, *range(2, x.ndim)]  # every dim but the channels
        n = x.numel() // x.shape[1]
        if n < 2:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
        shape = [1, -1] + [1] * (x.ndim - 2)
        acc = torch.promote_types(x.dtype, torch.float32)  # statistics in at least float32, as BN kernels do
        xa = x.to(acc)

        mean = xa.mean(dims)
        var = xa.var(dims, correction=0)
        std = torch.sqrt(var + self.eps)
        running_mean = self.running_mean.to(acc)
        running_std = torch.sqrt(self.running_var.to(acc) + self.eps)
        r = (std.detach() / running_std).clamp(1.0 / self.rmax, self.rmax)
        d = ((mean.detach() - running_mean) / running_std).clamp(-self.dmax, self.dmax)

        y = (xa - mean.reshape(shape)) / std.reshape(shape) * r.reshape(shape) + d.reshape(shape)
        if self.weight is not None:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)

        with torch.no_grad():  # as torch BN: momentum average, unbiased variance
            m = self.momentum
            unbiased = var * (n / (n - 1))
            self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
            self.running_var.mul_(1 - m).add_(m * unbiased.to(self.running_var.dtype))
            self.num_batches_tracked.add_(1)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, rmax={self.rmax}, "
                f"dmax={self.dmax}, affine={self.affine}")

    @classmethod
    def from_bn(cls, bn: nn.Module, rmax: float = 3.0, dmax: float = 5.0, *, dim: int | None = None) -> "_BatchRenorm":
        """The BatchRenorm carrying ``bn``'s γ/β, running statistics, eps and momentum.

        The dimension comes from ``bn``'s class (BatchNorm1d -> BatchRenorm1d, BatchNorm2d and
        timm's BatchNormAct2d -> BatchRenorm2d, ...). SyncBatchNorm does not know it: pass
        ``dim=`` or call it on the class you want (``BatchRenorm2d.from_bn(sync_bn)``).
        timm's activation/drop are not carried. A ``momentum=None`` BN (cumulative average)
        gets momentum 0.1. Eval outputs are bit-identical to ``bn``'s.
        """
        require_bn(bn, cls.__name__, needs_stats=True)
        new = cls.like(bn, rmax=rmax, dmax=dmax, dim=dim)
        copy_kinds(bn, new, KINDS)
        new.train(bn.training)
        return new

    @classmethod
    def like(cls, bn: nn.Module, rmax: float = 3.0, dmax: float = 5.0, *, dim: int | None = None) -> _BatchRenorm:
        """A fresh BatchRenorm shaped like ``bn`` (size, affine, eps, momentum, device, dtype, dimension as in
        ``from_bn``), with γ = 1, β = 0 and running statistics 0 / 1: nothing of ``bn``'s state."""
        require_bn(bn, cls.__name__, needs_stats=False)
        have = bn_dim(bn)
        asked = {d for d in (dim, getattr(cls, "_dim", None)) if d is not None}
        if len(asked) > 1:
            raise ValueError(f"dim={dim} contradicts {cls.__name__}")
        want = asked.pop() if asked else have
        if want is None:
            raise ValueError(f"cannot tell the dimension of a {type(bn).__name__}: pass dim=1, 2 or 3, "
                             "or call BatchRenorm1d/2d/3d.from_bn")
        if have is not None and want != have:
            raise ValueError(f"{type(bn).__name__} is a {have}d BatchNorm; cannot build a BatchRenorm{want}d from it")
        target = {1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d}.get(want)
        if target is None:
            raise ValueError(f"dim must be 1, 2 or 3, got {want}")
        momentum = 0.1 if bn.momentum is None else bn.momentum
        return target(bn.num_features, eps=bn.eps, momentum=momentum, rmax=rmax, dmax=dmax,
                      affine=bn.weight is not None, **factory_kwargs(bn))


class BatchRenorm1d(_BatchRenorm):
    """Batch Renormalization over (N, C) or (N, C, L) inputs; see ``_BatchRenorm``."""

    _dim = 1

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.ndim not in (2, 3):
            raise ValueError(f"BatchRenorm1d expects 2D or 3D input (N, C[, L]), got {x.ndim}D input")


class BatchRenorm2d(_BatchRenorm):
    """Batch Renormalization over (N, C, H, W) inputs; see ``_BatchRenorm``."""

    _dim = 2

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"BatchRenorm2d expects 4D input (N, C, H, W), got {x.ndim}D input")


class BatchRenorm3d(_BatchRenorm):
    """Batch Renormalization over (N, C, D, H, W) inputs; see ``_BatchRenorm``."""

    _dim = 3

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.ndim != 5:
            raise ValueError(f"BatchRenorm3d expects 5D input (N, C, D, H, W), got {x.ndim}D input")
