"""What a LayerNorm- or RMSNorm-like layer computes, read from its output on a probe input.

Families are exact class lists, with one stated exception: the per-model norm
classes of Hugging Face (LlamaRMSNorm, T5LayerNorm, GemmaRMSNorm, ...) and of
other libraries cannot all be listed, and a name does not say what a class
computes (Gemma's RMSNorm multiplies by ``1 + weight``, Llama's by ``weight``).
A copy of the layer, given a distinct random weight (and bias), is run on a
probe whose rows have a non-zero mean, and its output is compared with each
known form. The comparison is at float32 level: these classes compute in float32
even inside a float64 model. A class that matches no form is never guessed.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
import torch.nn as nn

# Relative distance from a form's float64 output that a float32 computation stays within.
PROBE_TOLERANCE = 1e-4
_EPS_NAMES = ("eps", "variance_epsilon", "epsilon")


@dataclass(frozen=True)
class NormForm:
    """y = normalize(x) * (offset + weight) + bias over the last dim; normalize is LayerNorm's or RMSNorm's."""

    family: str  # "layernorm" | "rmsnorm"
    offset: float  # 0.0, or 1.0 for (1 + weight)
    has_bias: bool
    float32_inside: bool  # computes in float32 whatever the model's dtype (Hugging Face's RMSNorms)


def eps_of(module: nn.Module) -> float | None:
    for name in _EPS_NAMES:
        value = getattr(module, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


# Libraries whose norm classes the families list by name: anything of theirs not listed is not a LayerNorm or
# RMSNorm (BatchRenorm, EvoNorm, FilterResponseNorm), so it is never probed.
_LISTED_LIBRARIES = ("torch.", "timm.", "torchvision.", "normswap.")


def is_norm_like(module: nn.Module) -> bool:
    """A leaf of a foreign class whose name says norm, with a 1-d ``weight`` parameter and no running
    statistics: what the probe is tried on."""
    weight = getattr(module, "weight", None)
    cls = type(module)
    return ("norm" in cls.__name__.lower() and not module._modules and not cls.__module__.startswith(_LISTED_LIBRARIES)
            and getattr(module, "running_mean", None) is None
            and isinstance(weight, nn.Parameter) and weight.ndim == 1 and weight.numel() > 1)


def _forms(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> dict[tuple[str, float], torch.Tensor]:
    centred = x - x.mean(-1, keepdim=True)
    ln = centred * torch.rsqrt(centred.square().mean(-1, keepdim=True) + eps)
    rms = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return {(fam, off): n * (off + w) + b for fam, n in (("layernorm", ln), ("rmsnorm", rms)) for off in (0.0, 1.0)}


_CACHE: dict[type, NormForm | None] = {}  # by class: what a class computes does not change per instance


def probe(module: nn.Module) -> NormForm | None:
    """The form ``module`` computes over its last dim, or None when it matches none (or cannot be probed)."""
    cls = type(module)
    if cls not in _CACHE:
        _CACHE[cls] = _run_probe(module)
    return _CACHE[cls]


@functools.lru_cache(maxsize=None)
def _probe_input(channels: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(6, channels, generator=gen, dtype=torch.float64) * 2.0 + 1.5


def _run_probe(module: nn.Module) -> NormForm | None:
    if not is_norm_like(module):
        return None
    channels = module.weight.numel()
    try:
        work = copy.deepcopy(module).to(device="cpu", dtype=torch.float64).eval()
    except Exception:  # noqa: BLE001 - a layer that cannot be copied cannot be probed
        return None
    gen = torch.Generator().manual_seed(1)
    w = torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5
    bias = getattr(work, "bias", None)
    has_bias = isinstance(bias, nn.Parameter) and bias.shape == w.shape
    b = torch.randn(channels, generator=gen, dtype=torch.float64) if has_bias else torch.zeros_like(w)
    with torch.no_grad():
        work.weight.copy_(w)
        if has_bias:
            bias.copy_(b)
        x = _probe_input(channels)
        try:
            y = work(x)
        except Exception:  # noqa: BLE001 - a layer that does not take (rows, channels) is not one of the forms
            return None
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return None
    eps = eps_of(module)
    for (family, offset), want in _forms(x, w, b, 1e-5 if eps is None else eps).items():
        err = ((y.double() - want).abs().max() / want.abs().max()).item()
        if err < PROBE_TOLERANCE:
            return NormForm(family, offset, has_bias, float32_inside=y.dtype != torch.float64 or err > 1e-12)
    return None


def why_unidentified(module: nn.Module) -> str:
    """The reason a norm-like layer the probe cannot identify is left."""
    return (f"{type(module).__name__} looks like a normalization layer, but its output on a probe matches none of "
            "LayerNorm, RMSNorm, or either with (1 + weight): left as it is, never guessed")
