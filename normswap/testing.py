"""Realistic BatchNorm state for tests, examples and benchmarks.

A freshly built BN is the identity (γ=1, β=0, μ=0, σ²=1) and hides every bug in
code that moves or folds it. Arbitrary running variances make deep nets blow
up instead. This sets BN state the way training would: random affine, then
statistics measured by a train-mode pass over random inputs, then each running
mean and variance perturbed by up to ±25%.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .families import family_of
from .inputs import make_inputs


@torch.no_grad()
def randomize_bn(model: nn.Module, input_size: Sequence[int] | None = None, *, seed: int = 0,
                 batch: int = 4, perturb: float = 0.25) -> nn.Module:
    """Give every BatchNorm-family layer of ``model`` realistic non-trivial state, in place."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        return (torch.rand(t.shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(t)

    bns = [m for m in model.modules() if family_of(m) in ("batchnorm", "frozen_batchnorm")]
    for m in bns:
        if getattr(m, "weight", None) is not None:
            m.weight.copy_(uniform(m.weight, 0.5, 1.5))
            m.bias.copy_(uniform(m.bias, -0.2, 0.2))
    tracked = [m for m in bns if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    saved_momentum = [(m, m.momentum) for m in tracked]
    modes = {id(m): m.training for m in model.modules()}
    try:
        for m in tracked:
            m.momentum = 1.0  # the running statistics become exactly this batch's
        model.eval()
        for m in tracked:
            m.train()
        x = make_inputs(model, (batch, *input_size[1:]) if input_size else None, batch=batch, seed=seed)
        model(x)
    finally:
        for m, mom in saved_momentum:
            m.momentum = mom
        for m in model.modules():
            m.training = modes[id(m)]
    for m in bns:
        if getattr(m, "running_mean", None) is not None:
            m.running_mean.mul_(uniform(m.running_mean, 1 - perturb, 1 + perturb))
            m.running_var.mul_(uniform(m.running_var, 1 - perturb, 1 + perturb))
    return model
