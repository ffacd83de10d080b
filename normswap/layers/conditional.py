"""Conditional normalization: one learned γ/β per condition (class, style) on top of a shared normalization.

Conditional InstanceNorm (Dumoulin et al. 2017) lets one style-transfer network
render many styles; conditional BatchNorm (SNGAN, BigGAN) feeds the class into
every block of a generator. The condition rides on the layers (``condition``),
so a model's forward signature does not change: set it with ``set_condition``
or the ``conditioned`` context manager.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._state import KINDS, RUNNING_STATS, bn_dim, copy_kinds, factory_kwargs, require_bn


class _ConditionalNorm(nn.Module):
    """A normalization without affine, then γ/β chosen or mixed from ``weight``/``bias`` tables.

    ``weight`` and ``bias`` have shape (num_conditions, num_features). ``condition`` is either a
    LongTensor (N,) of row indices, or a float tensor (N, num_conditions) of mixing weights:
    γ = condition @ weight, β = condition @ bias (a one-hot row picks that row).
    """

    def __init__(self, num_features: int, num_conditions: int, eps: float, *, device=None, dtype=None):
        super().__init__()
        if num_conditions < 1:
            raise ValueError(f"num_conditions must be >= 1, got {num_conditions}")
        kw = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.num_conditions = num_conditions
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_conditions, num_features, **kw))
        self.bias = nn.Parameter(torch.zeros(num_conditions, num_features, **kw))
        self.condition: torch.Tensor | None = None

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _gamma_beta(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """γ and β of shape (batch, num_features) for the current condition."""
        name, k = type(self).__name__, self.num_conditions
        cond = self.condition
        if cond is None:
            raise RuntimeError(f"{name} has no condition: set one before calling the model, with "
                               "normswap.layers.set_condition(model, y) or "
                               "`with normswap.layers.conditioned(model, y): ...`")
        if not isinstance(cond, torch.Tensor):
            raise TypeError(f"{name}.condition must be a tensor, got {type(cond).__name__}")
        cond = cond.to(self.weight.device)
        if cond.dtype == torch.bool or cond.is_complex():
            raise TypeError(f"{name}.condition must be an integer tensor of indices or a float tensor of "
                            f"mixing weights, got {cond.dtype}")
        if cond.ndim == 0 or cond.shape[0] != batch:
            got = "a scalar" if cond.ndim == 0 else f"{cond.shape[0]} entries"
            raise ValueError(f"{name}.condition has {got} but the input batch has {batch} samples; "
                             "give one condition per sample")
        if cond.is_floating_point():
            if cond.shape != (batch, k):
                raise ValueError(f"{name}: a float condition holds mixing weights and must have shape "
                                 f"(batch, num_conditions) = ({batch}, {k}), got {tuple(cond.shape)}")
            cond = cond.to(self.weight.dtype)
            return cond @ self.weight, cond @ self.bias
        if cond.ndim != 1:
            raise ValueError(f"{name}: an index condition must have shape (batch,) = ({batch},), got {tuple(cond.shape)}")
        lo, hi = int(cond.min()), int(cond.max())
        if lo < 0 or hi >= k:
            raise ValueError(f"{name}: condition indices must be in [0, {k}), got values from {lo} to {hi}")
        return self.weight[cond], self.bias[cond]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"{type(self).__name__} expects 4D input (N, C, H, W), got {x.ndim}D input")
        if x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) got an input with {x.shape[1]} channels "
                             f"(shape {tuple(x.shape)})")
        gamma, beta = self._gamma_beta(x.shape[0])
        return self._normalize(x) * gamma[:, :, None, None] + beta[:, :, None, None]

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_conditions={self.num_conditions}, eps={self.eps}"

    def carry_names(self) -> dict[str, dict[str, str]]:
        """Where a BN's state goes (``normswap.layers._state`` map syntax): γ/β into every row of the tables."""
        return {"affine": {"weight": "weight[:]", "bias": "bias[:]"}, "running_stats": dict(RUNNING_STATS)}

    @classmethod
    def _from_bn(cls, bn: nn.Module, num_conditions: int, *, needs_stats: bool) -> _ConditionalNorm:
        require_bn(bn, cls.__name__, needs_stats=needs_stats)
        new = cls.like(bn, num_conditions)
        copy_kinds(bn, new, KINDS)  # ones/zeros stay where bn has no affine
        new.train(bn.training)
        return new


def _require_2d(bn: nn.Module, layer: str) -> None:
    if bn_dim(bn) not in (None, 2):
        raise ValueError(f"{layer} is a 2d layer; cannot build it from a {type(bn).__name__}")


class ConditionalInstanceNorm2d(_ConditionalNorm):
    """InstanceNorm2d without affine (no running statistics), then per-condition γ/β."""

    def __init__(self, num_features: int, num_conditions: int, eps: float = 1e-5, *, device=None, dtype=None):
        super().__init__(num_features, num_conditions, eps, device=device, dtype=dtype)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return F.instance_norm(x, eps=self.eps)

    @classmethod
    def like(cls, bn: nn.Module, num_conditions: int) -> ConditionalInstanceNorm2d:
        """A fresh layer of ``bn``'s size, eps, device and dtype; every condition's γ/β 1 / 0."""
        require_bn(bn, cls.__name__, needs_stats=False)
        _require_2d(bn, cls.__name__)
        return cls(bn.num_features, num_conditions, eps=bn.eps, **factory_kwargs(bn))

    @classmethod
    def from_bn(cls, bn: nn.Module, num_conditions: int) -> "ConditionalInstanceNorm2d":
        """Every condition starts with ``bn``'s γ/β and eps: InstanceNorm with the BN's affine.

        Running statistics are not used (instance statistics replace them).
        """
        return cls._from_bn(bn, num_conditions, needs_stats=False)


class ConditionalBatchNorm2d(_ConditionalNorm):
    """BatchNorm2d without affine (batch statistics in training, running ones in eval), then per-class γ/β.

    ``momentum=None`` keeps a cumulative average of the statistics, as in torch.
    """

    def __init__(self, num_features: int, num_conditions: int, eps: float = 1e-5, momentum: float | None = 0.1, *,
                 device=None, dtype=None):
        super().__init__(num_features, num_conditions, eps, device=device, dtype=dtype)
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(num_features, device=device, dtype=dtype))
        self.register_buffer("running_var", torch.ones(num_features, device=device, dtype=dtype))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        factor = 0.0
        if self.training:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return F.batch_norm(x, self.running_mean, self.running_var, None, None, self.training, factor, self.eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", momentum={self.momentum}"

    @classmethod
    def like(cls, bn: nn.Module, num_conditions: int) -> ConditionalBatchNorm2d:
        """A fresh layer of ``bn``'s size, eps, momentum, device and dtype: γ/β 1 / 0, statistics 0 / 1."""
        require_bn(bn, cls.__name__, needs_stats=False)
        _require_2d(bn, cls.__name__)
        return cls(bn.num_features, num_conditions, eps=bn.eps, momentum=bn.momentum, **factory_kwargs(bn))

    @classmethod
    def from_bn(cls, bn: nn.Module, num_conditions: int) -> "ConditionalBatchNorm2d":
        """Every class starts with ``bn``'s γ/β; running statistics, eps and momentum are carried."""
        return cls._from_bn(bn, num_conditions, needs_stats=True)


def _conditional_layers(model: nn.Module) -> list[_ConditionalNorm]:
    layers = [m for m in model.modules() if isinstance(m, _ConditionalNorm)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no conditional normalization layers to condition")
    return layers


def set_condition(model: nn.Module, condition: torch.Tensor | None) -> int:
    """Set ``condition`` on every conditional norm layer of ``model`` (None clears it); returns how many.

    ``condition``: a LongTensor (N,) of indices, or a float tensor (N, num_conditions) of mixing weights.
    """
    layers = _conditional_layers(model)
    for m in layers:
        m.condition = condition
    return len(layers)


@contextlib.contextmanager
def conditioned(model: nn.Module, condition: torch.Tensor | None) -> Iterator[nn.Module]:
    """``with conditioned(model, y): out = model(x)``: condition the layers, then restore what they had."""
    layers = _conditional_layers(model)
    saved = [m.condition for m in layers]
    try:
        for m in layers:
            m.condition = condition
        yield model
    finally:
        for m, c in zip(layers, saved):
            m.condition = c
