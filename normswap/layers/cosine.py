"""Cosine normalization (Luo et al., 2018): a layer's dot product replaced by a cosine similarity.

``y = scale · (w · x) / (‖w‖ ‖x‖)`` per output unit: for a linear layer x is the
input vector; for a convolution it is the receptive-field patch the kernel sees
(zero padding included, as the convolution sees it). The output is bounded by
``scale`` whatever the input's magnitude, which is the point: no statistics,
no batch dependence. The cosine form has no bias.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class _CosineBase(nn.Module):
    def _init_scale(self, scale: float, learn_scale: bool, eps: float, like: torch.Tensor) -> None:
        value = torch.tensor(float(scale), dtype=like.dtype, device=like.device)
        if learn_scale:
            self.scale = nn.Parameter(value)
        else:
            self.register_buffer("scale", value)
        self.eps = float(eps)


class CosineLinear(_CosineBase):
    """Linear layer in cosine form; ``weight`` is (out_features, in_features) like nn.Linear's."""

    def __init__(self, in_features: int, out_features: int, *, scale: float = 1.0, learn_scale: bool = True,
                 eps: float = 1e-8, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self._init_scale(scale, learn_scale, eps, self.weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kw) -> "CosineLinear":
        new = cls(linear.in_features, linear.out_features, device=linear.weight.device, dtype=linear.weight.dtype, **kw)
        with torch.no_grad():
            new.weight.copy_(linear.weight)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_unit = x / x.norm(dim=-1, keepdim=True).clamp_min(self.eps)
        w_unit = self.weight / self.weight.norm(dim=1, keepdim=True).clamp_min(self.eps)
        return self.scale * F.linear(x_unit, w_unit)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, learn_scale={isinstance(self.scale, nn.Parameter)}"


class CosineConv(_CosineBase):
    """Conv1d/2d/3d in cosine form, with the conv's stride, padding (and mode), dilation and groups."""

    def __init__(self, conv: nn.modules.conv._ConvNd, *, scale: float = 1.0, learn_scale: bool = True,
                 eps: float = 1e-8):
        super().__init__()
        if conv.transposed:
            raise ValueError("a transposed convolution has no input patch to take a cosine with")
        self.dims = conv.weight.ndim - 2
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(self, attr, getattr(conv, attr))
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self._init_scale(scale, learn_scale, eps, self.weight)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        conv = _CONV[self.dims]
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv(x, weight, None, self.stride, 0, self.dilation, self.groups)
        return conv(x, weight, None, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w_norm = w.flatten(1).norm(dim=1).clamp_min(self.eps)
        dot = self._conv(x, w / w_norm.reshape(-1, *([1] * (w.ndim - 1))))
        # the squared norm of each group's input patch: the same conv of x² with a kernel of ones
        ones = torch.ones((self.groups, self.in_channels // self.groups, *w.shape[2:]), dtype=w.dtype, device=w.device)
        patch = self._conv(x * x, ones).clamp_min(0).sqrt().clamp_min(self.eps)
        patch = patch.repeat_interleave(self.out_channels // self.groups, dim=1)
        return self.scale * dot / patch

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"groups={self.groups}, learn_scale={isinstance(self.scale, nn.Parameter)}")
