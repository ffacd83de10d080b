"""A timm CondConv2d that also adds a constant per-channel shift: where a folded BatchNorm's shift lives.

CondConv2d mixes its expert kernels (and biases) with per-sample routing weights
that need not sum to one, so a BN after it folds its scale into every expert
exactly, but its shift β − μ·s cannot live in the mixed bias. This subclass adds
it to the bias of the same grouped convolution: no extra op, the same output.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers.cond_conv2d import CondConv2d
from timm.layers.conv2d_same import conv2d_same


class ShiftedCondConv2d(CondConv2d):
    """CondConv2d(x, r) + shift, the shift added per output channel inside the convolution."""

    shift: nn.Parameter

    @classmethod
    def adopt(cls, conv: CondConv2d) -> "ShiftedCondConv2d":
        """Turn ``conv`` (a private copy) into this class in place, with a zero shift."""
        ref = conv.weight
        conv.__class__ = cls
        conv.shift = nn.Parameter(torch.zeros(conv.out_channels, dtype=ref.dtype, device=ref.device),
                                  requires_grad=ref.requires_grad)
        return conv

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        weight = torch.matmul(routing_weights, self.weight)
        weight = weight.view((b * self.out_channels, self.in_channels // self.groups) + self.kernel_size)
        bias = self.shift.repeat(b)
        if self.bias is not None:
            bias = bias + torch.matmul(routing_weights, self.bias).view(b * self.out_channels)
        conv = conv2d_same if self.dynamic_padding else F.conv2d
        out = conv(x.reshape(1, b * c, h, w), weight, bias, stride=self.stride, padding=self.padding,
                   dilation=self.dilation, groups=self.groups * b)
        return out.permute([1, 0, 2, 3]).view(b, self.out_channels, out.shape[-2], out.shape[-1])
