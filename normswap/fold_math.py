"""BatchNorm folding arithmetic: pure tensor functions, float64 inside, no modules.

Eval-mode BN is a per-channel affine y = s·x + t with s = γ/√(σ²+ε), t = β − μ·s.
Folding it into the layer before it scales that layer's output channels:
W' = s·W (per output channel), b' = s·b + t. Folding it into the layer after it
scales that layer's input channels: W'[:, c] = W[:, c]·s[c], and the shift
becomes a bias, b' = b + Σ W[:, c]·t[c] (exact only when that layer never sees
padded zeros: a zero-padded normalized input is not a zero-padded raw input).
"""
from __future__ import annotations

import torch


def bn_affine(mean, var, weight, bias, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) in float64 for an eval-mode BN; weight/bias may be None (affine=False)."""
    mean = mean.detach().double()
    var = var.detach().double()
    s = torch.rsqrt(var + eps)
    if weight is not None:
        s = s * weight.detach().double()
    t = -mean * s
    if bias is not None:
        t = t + bias.detach().double()
    return s, t


def norm_affine(weight, bias, offset: float, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(γ, β) in float64 of a LayerNorm/RMSNorm y = n(x)·(offset + weight) + bias; either may be None."""
    ref = weight if weight is not None else bias
    gamma = torch.full((channels,), 1.0, dtype=torch.float64, device=ref.device)
    if weight is not None:
        gamma = weight.detach().double().reshape(-1) + offset
    return gamma, (bias.detach().double().reshape(-1) if bias is not None else None)


# Elements per float64 chunk in ``scale_into``: 2 MiB, about one core's L2 cache here, so the three
# passes over a chunk stay in cache; large enough that the per-chunk overhead does not matter. One
# pass over a whole weight through a fresh float64 tensor of its size costs 10x more, in page faults
# and memory traffic.
_CHUNK = 1 << 18


def scale_into(out: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``out = weight * scale``, the product taken in float64 and rounded once to ``out``'s dtype.

    ``scale`` (float64) broadcasts against ``weight`` along dim 0 (size 1 or ``weight.shape[0]``)
    and the trailing dims; ``out`` may be ``weight`` itself. Works chunk by chunk along dim 0
    through one small float64 buffer.
    """
    rows = weight.shape[0]
    per_row = max(weight[0].numel(), 1) if rows else 1
    step = max(1, _CHUNK // per_row)
    buf = torch.empty((min(step, rows), *weight.shape[1:]), dtype=torch.float64, device=weight.device)
    for i in range(0, rows, step):
        j = min(i + step, rows)
        part = buf[: j - i]
        part.copy_(weight[i:j])  # widen into the buffer: a mixed-dtype mul would allocate a float64 copy
        part.mul_(scale[i:j] if scale.shape[0] != 1 else scale)
        out[i:j].copy_(part)
    return out


def fold_output_channels(weight, bias, s, t, *, transposed: bool, groups: int, out=None):
    """New (weight, bias) for conv/linear(x) followed by the affine (s, t) on its output channels.

    ``weight`` is (out, in/groups, *k) for conv and linear, (in, out/groups, *k) for transposed conv.
    The weight products are taken in float64 and rounded once, into ``out`` (``weight``'s dtype and
    shape; may be ``weight`` itself) or, without it, returned in float64. The bias is float64.
    """
    w = weight.detach()
    s = s.double()
    dest = out.detach() if out is not None else torch.empty(w.shape, dtype=torch.float64, device=w.device)
    if transposed:  # group g's input channels carry its output channels in dim 1
        in_per_group, out_per_group = w.shape[0] // groups, w.shape[1]
        ones = [1] * (w.ndim - 2)
        for g in range(groups):
            rows = slice(g * in_per_group, (g + 1) * in_per_group)
            scale = s[g * out_per_group:(g + 1) * out_per_group].reshape(1, out_per_group, *ones)
            scale_into(dest[rows], w[rows], scale)
    else:
        scale_into(dest, w, s.reshape(-1, *([1] * (w.ndim - 1))))
    b = t.clone() if bias is None else bias.detach().double() * s + t
    return (out if out is not None else dest), b


def fold_expert_output_channels(weight, bias, s, *, out_channels: int, out=None):
    """New (expert weights, expert biases) for a conditional conv followed by the scale ``s``.

    A conditional conv (timm's CondConv2d) mixes E expert kernels ``weight`` (E, out·rest) and
    biases (E, out) per sample; scaling every expert's output channels scales the mix, whatever
    the routing weights. The BN's shift does not mix this way: it is added separately. Products
    in float64, rounded once into ``out`` (may be ``weight``) or returned in float64.
    """
    w = weight.detach()
    experts = w.shape[0]
    dest = out.detach() if out is not None else torch.empty(w.shape, dtype=torch.float64, device=w.device)
    scale_into(dest.view(experts, out_channels, -1), w.reshape(experts, out_channels, -1),
               s.double().reshape(1, out_channels, 1))
    b = None if bias is None else bias.detach().double() * s.double()
    return (out if out is not None else dest), b


def fold_input_channels(weight, bias, s, t, *, groups: int):
    """New (weight, bias) in float64 for the affine (s, t) on the input channels, then conv/linear.

    Not for transposed convs. Exact only without zero padding (see the module docstring).
    """
    w = weight.detach().double()
    out_ch, in_per_group = w.shape[0], w.shape[1]
    k = w.shape[2:]
    wg = w.reshape(groups, out_ch // groups, in_per_group, *k)
    s_g = s.reshape(groups, 1, in_per_group, *([1] * len(k)))
    t_g = t.reshape(groups, 1, in_per_group, *([1] * len(k)))
    shift = (wg * t_g).sum(dim=tuple(range(2, wg.ndim))).reshape(out_ch)
    w_new = (wg * s_g).reshape(w.shape)
    b = shift if bias is None else bias.detach().double() + shift
    return w_new, b


def centre_output_channels(weight, bias, layout: str, scale=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) in float64 whose output has zero mean over its channels, for every input:
    W' = P·diag(scale)·W and b' = P·(scale·b), with P = I - 11ᵀ/C the centring projection.

    ``layout``: "linear" and "conv" (output channels on dim 0), "conv1d_t" (Hugging Face Conv1D, on dim 1),
    "embedding" (each row is an output: channels on dim 1). ``scale``: a per-channel scale applied after the
    layer (LayerScale), folded in first, since centring does not survive a scale.
    """
    w = weight.detach().double()
    axis = 1 if layout in ("conv1d_t", "embedding") else 0
    shape = [1] * w.ndim
    shape[axis] = -1
    if scale is not None:
        w = w * scale.double().reshape(shape)
    w = w - w.mean(dim=axis, keepdim=True)
    b = None
    if bias is not None and layout != "embedding":
        b = bias.detach().double()
        if scale is not None:
            b = b * scale.double()
        b = b - b.mean()
    return w, b

