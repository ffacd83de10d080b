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


def fold_output_channels(weight, bias, s, t, *, transposed: bool, groups: int):
    """New (weight, bias) in float64 for conv/linear(x) followed by the affine (s, t) on its output channels.

    ``weight`` is (out, in/groups, *k) for conv and linear, (in, out/groups, *k) for transposed conv.
    """
    w = weight.detach()  # times the float64 s below: the product is taken, exactly, in float64 in one pass
    if transposed:
        in_ch, out_per_group = w.shape[0], w.shape[1]
        k = w.shape[2:]
        w = w.reshape(groups, in_ch // groups, out_per_group, *k)
        w = w * s.double().reshape(groups, 1, out_per_group, *([1] * len(k)))
        w = w.reshape(in_ch, out_per_group, *k)
    else:
        w = w * s.double().reshape(-1, *([1] * (w.ndim - 1)))
    b = t.clone() if bias is None else bias.detach().double() * s + t
    return w, b


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
