"""Shape-only stand-ins for the heavy tensor ops, for the recorded forward pass.

The analysis needs the data flow and the shapes of one forward pass, never its
values. Convolutions, linear layers and matrix products are nearly all of a
forward's time, so while recording they return zeros of the shape (dtype,
device, memory format) the real op would return, and every other op runs for
real on them. A stand-in returns ``None`` whenever it cannot be sure of that
shape (an argument it does not know, a mismatch the real op would report),
and the real op runs instead.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _plain(*tensors) -> bool:
    """Plain dense tensors (or None): no subclass whose op might do something else."""
    return all(t is None or (type(t) in _PLAIN and t.layout is torch.strided) for t in tensors)


def _ints(value, n: int) -> tuple[int, ...] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * n
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) for v in value):
        return None
    value = tuple(value)
    if len(value) == 1:
        return value * n
    return value if len(value) == n else None


def _zeros(shape, like: torch.Tensor, memory_format=torch.contiguous_format) -> torch.Tensor:
    return torch.zeros(shape, dtype=like.dtype, device=like.device).contiguous(memory_format=memory_format)


def _same_float(*tensors) -> bool:
    first = tensors[0]
    return first.dtype.is_floating_point and all(t.dtype == first.dtype and t.device == first.device
                                                 for t in tensors if t is not None)


def conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """torch.conv1d/2d/3d."""
    if not (isinstance(input, torch.Tensor) and isinstance(weight, torch.Tensor)) or not _plain(input, weight, bias):
        return None
    n = weight.dim() - 2
    if n < 1 or input.dim() not in (n + 1, n + 2) or not _same_float(input, weight, bias):
        return None
    if not isinstance(groups, int) or groups < 1 or weight.shape[0] % groups:
        return None
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        return None
    batched = input.dim() == n + 2
    if input.shape[1 if batched else 0] != weight.shape[1] * groups or input.numel() == 0:
        return None
    stride, dilation = _ints(stride, n), _ints(dilation, n)
    if stride is None or dilation is None or min(stride) < 1 or min(dilation) < 1:
        return None
    spatial, kernel = input.shape[-n:], weight.shape[2:]
    if padding == "same":
        if any(s != 1 for s in stride):
            return None
        out = list(spatial)
    else:
        pad = (0,) * n if padding == "valid" else _ints(padding, n)
        if pad is None or min(pad) < 0:
            return None
        out = [(s + 2 * p - d * (k - 1) - 1) // st + 1
               for s, p, d, k, st in zip(spatial, pad, dilation, kernel, stride)]
    if min(out) <= 0:
        return None
    shape = ((input.shape[0],) if batched else ()) + (weight.shape[0], *out)
    channels_last = (n == 2 and batched and not input.is_contiguous()
                     and input.is_contiguous(memory_format=torch.channels_last))
    return _zeros(shape, input, torch.channels_last if channels_last else torch.contiguous_format)


def linear(input, weight, bias=None):
    """F.linear."""
    if not (isinstance(input, torch.Tensor) and isinstance(weight, torch.Tensor)) or not _plain(input, weight, bias):
        return None
    if weight.dim() != 2 or input.dim() < 1 or input.shape[-1] != weight.shape[1] or not _same_float(input, weight, bias):
        return None
    if bias is not None and tuple(bias.shape) not in ((weight.shape[0],), ()):
        return None
    return _zeros((*input.shape[:-1], weight.shape[0]), input)


def _matrices(a, b) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and _plain(a, b) and _same_float(a, b)
            and a.dim() >= 2 and b.dim() >= 2)


def matmul(a, b, *, out=None):
    """torch.matmul / Tensor.matmul / ``@`` on operands of two or more dims."""
    if out is not None or not _matrices(a, b) or a.shape[-1] != b.shape[-2]:
        return None
    try:
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except RuntimeError:
        return None
    return _zeros((*batch, a.shape[-2], b.shape[-1]), a)


def bmm(a, b, *, out=None):
    """torch.bmm / Tensor.bmm."""
    if out is not None or not _matrices(a, b) or a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] \
            or a.shape[2] != b.shape[1]:
        return None
    return _zeros((a.shape[0], a.shape[1], b.shape[2]), a)


def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention with matching batch and head dims."""
    if not (_matrices(query, key) and _matrices(query, value)) or enable_gqa or not _plain(attn_mask):
        return None
    if not (query.dim() == key.dim() == value.dim()) or query.shape[:-2] != key.shape[:-2] \
            or query.shape[:-2] != value.shape[:-2] or query.shape[-1] != key.shape[-1] \
            or key.shape[-2] != value.shape[-2]:
        return None
    if attn_mask is not None:
        scores = (*query.shape[:-1], key.shape[-2])
        try:
            if is_causal or torch.broadcast_shapes(attn_mask.shape, scores) != scores:
                return None
        except RuntimeError:
            return None
    return _zeros((*query.shape[:-1], value.shape[-1]), query)


STAND_INS: dict[Callable, Callable] = {
    torch.conv1d: conv, torch.conv2d: conv, torch.conv3d: conv,
    F.linear: linear,
    torch.matmul: matmul, torch.Tensor.matmul: matmul, torch.Tensor.__matmul__: matmul,
    torch.bmm: bmm, torch.Tensor.bmm: bmm,
    F.scaled_dot_product_attention: attention,
}


# Ops whose result depends on tensor values in a way that can change what runs next: a Python bool,
# number or list read off a tensor, or an output whose shape depends on the values. After a stand-in
# has run, one of these means the pass may take a path the real values would not.
VALUE_READS = frozenset({
    torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__,
    torch.Tensor.__complex__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__,
    torch.Tensor.__contains__, torch.nonzero, torch.Tensor.nonzero, torch.argwhere, torch.Tensor.argwhere,
    torch.unique, torch.Tensor.unique, torch.unique_consecutive, torch.Tensor.unique_consecutive,
    torch.masked_select, torch.Tensor.masked_select, torch.equal, torch.Tensor.equal, torch.allclose,
    torch.Tensor.allclose, torch.repeat_interleave, torch.Tensor.repeat_interleave, torch.bincount,
    torch.Tensor.bincount, torch.Tensor.nonzero_static, torch.nonzero_static,
})


def reads_values(func, args) -> bool:
    """``func(*args)`` reads values that decide control flow or a shape (a boolean mask index, too)."""
    if func in VALUE_READS:
        return True
    if func is torch.Tensor.__getitem__ and len(args) > 1:
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
    if func is torch.where and len(args) == 1:
        return True
    return False
