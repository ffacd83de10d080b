"""Realistic normalization state for tests, examples and benchmarks: BatchNorm, and LayerNorm/RMSNorm affine.

A freshly built BN is the identity (γ=1, β=0, μ=0, σ²=1) and hides every bug in
code that moves or folds it. Arbitrary running variances make deep nets blow
up instead. This sets BN state the way training leaves it: random affine, then
running statistics measured on random inputs, then each running mean and
variance perturbed by up to ±25%.

Each BN's statistics are measured on the input it sees in eval mode, with every
BN upstream already set and perturbed: one eval-mode forward, each BN setting
its own statistics just before it runs. A single train-mode pass instead measures
BN k on an upstream normalized with batch statistics; in eval mode every
perturbation upstream then shifts what BN k sees, the shifts compound, and deep
random nets (efficientnetv2_m, efficientnet_b6, levit_256d) reached |y| ~ 1e6
with float32 results 70% off their own float64. Measured this way, and on enough
samples per channel (the batch grows as the maps shrink), the same nets keep
|y| ~ 1 and float32 within ~1e-5 of float64.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from .families import family_of
from .inputs import infer_input_size, make_inputs
from .norm_probe import probe

# Spatial positions per channel the statistics should see at 1/32 of the input side
# (the last stage of a typical CNN): batch x H x W / 1024 >= this.
_SAMPLES_AT_STRIDE_32 = 256


def default_batch(input_size: Sequence[int] | None) -> int:
    """Batch size for measuring statistics: 8 at 224x224, 64 at 64x64 and below."""
    if not input_size or len(input_size) < 3:
        return 16
    spatial = math.prod(int(s) for s in input_size[2:])
    return max(8, min(64, math.ceil(_SAMPLES_AT_STRIDE_32 * 1024 / max(spatial, 1))))


@torch.no_grad()
def randomize_bn(model: nn.Module, input_size: Sequence[int] | None = None, *, seed: int = 0,
                 batch: int | None = None, perturb: float = 0.25) -> nn.Module:
    """Give every BatchNorm-family layer of ``model`` realistic non-trivial state, in place."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        return (torch.rand(t.shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(t)

    bns = [m for m in model.modules() if family_of(m) in ("batchnorm", "frozen_batchnorm")]
    for m in bns:
        if getattr(m, "weight", None) is not None:
            m.weight.copy_(uniform(m.weight, 0.5, 1.5))
            m.bias.copy_(uniform(m.bias, -0.2, 0.2))
    with_stats = [m for m in bns if getattr(m, "running_mean", None) is not None]
    measured: set[int] = set()

    def measure(module: nn.Module, args) -> None:
        if id(module) in measured or not args or not isinstance(args[0], torch.Tensor):
            return
        measured.add(id(module))
        x = args[0].detach().double()
        dims = [d for d in range(x.ndim) if d != 1]
        count = x.numel() // max(x.shape[1], 1)
        mean = x.mean(dims)
        var = x.var(dims, correction=1) if count > 1 else torch.ones_like(mean)
        module.running_mean.copy_(mean)
        module.running_var.copy_(var)
        perturb_stats(module)

    def perturb_stats(module: nn.Module) -> None:
        module.running_mean.mul_(uniform(module.running_mean, 1 - perturb, 1 + perturb))
        module.running_var.mul_(uniform(module.running_var, 1 - perturb, 1 + perturb))

    modes = {id(m): m.training for m in model.modules()}
    handles = [m.register_forward_pre_hook(measure) for m in with_stats]
    try:
        model.eval()
        size = tuple(input_size) if input_size else (1, *infer_input_size(model)[0])
        n = batch or default_batch(size)
        x = make_inputs(model, (n, *size[1:]), seed=seed)
        model(x)
    finally:
        for h in handles:
            h.remove()
        for m in model.modules():
            m.training = modes[id(m)]
    for m in with_stats:  # not reached by the forward pass: perturb what they have
        if id(m) not in measured:
            perturb_stats(m)
    return model


@torch.no_grad()
def randomize_norms(model: nn.Module, *, seed: int = 0) -> nn.Module:
    """Give every LayerNorm/RMSNorm of ``model`` a random affine, in place: γ in [0.5, 1.5) (for a (1 + weight)
    class such as Gemma's RMSNorm, a weight in [-0.5, 0.5)), β normal with std 0.5. Hugging Face and timm
    start them at the identity, where a fold that drops γ or β passes unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if family_of(m) not in ("layernorm", "rmsnorm"):
            continue
        weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
        form = probe(m) if not type(m).__module__.startswith(("torch.nn", "timm.")) else None
        if isinstance(weight, torch.Tensor):
            low = -0.5 if form is not None and form.offset else 0.5
            weight.copy_(torch.rand(weight.shape, generator=gen, dtype=torch.float64) + low)
        if isinstance(bias, torch.Tensor):
            bias.copy_(torch.randn(bias.shape, generator=gen, dtype=torch.float64) * 0.5)
    return model
