"""Weight-side normalization as replacements: spectral norm, weight norm, cosine norm, and baking them away.

Spectral and weight norm use torch's parametrizations API on a private copy of
the layer; the copy keeps the layer's class (torch's generated
``Parametrized<Class>`` subclasses it), so every method still works. ``bake``
replaces each parametrization by its current value for deployment: a
parametrized module cannot be pickled, and folding needs plain weights.
"""
from __future__ import annotations

import copy
import functools

import torch
import torch.nn as nn
from torch.nn.utils import parametrizations, parametrize

from .. import carry
from ..factory import Built, LayerContext, SkipLayer
from ..registry import Option, register

EMA_NOTE = ("spectral norm keeps power-iteration vectors (parametrizations.weight.0._u / _v); an EMA of the "
            "weights must copy them, not average them (an averaged u/v is not a singular vector and can blow "
            "up the normalized weight): see normswap.catalog.weight_norms.power_iteration_buffers")


def _weight_dim(module: nn.Module) -> int:
    """The weight dimension that indexes output channels: 1 for transposed convs, 0 otherwise."""
    return 1 if getattr(module, "transposed", False) else 0


@functools.cache
def legacy_hook_types() -> dict[type, str]:
    """torch's old hook-based weight norms (torch.nn.utils.spectral_norm / weight_norm): pre-hook type -> name."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return {SpectralNorm: "spectral norm", WeightNorm: "weight norm"}


def legacy_hooks(module: nn.Module) -> list[str]:
    """Names of torch's old hook-based spectral/weight norms on ``module`` (torch.nn.utils.spectral_norm, ...)."""
    if not module._forward_pre_hooks:
        return []
    kinds = legacy_hook_types()
    return [kinds[type(h)] for h in module._forward_pre_hooks.values() if type(h) in kinds]


def _private_copy(ctx, what: str) -> nn.Module:
    old = ctx.module
    if legacy_hooks(old):
        raise SkipLayer(f"it already has torch's legacy {legacy_hooks(old)[0]} hook; bake it first (normswap bake) "
                        "or load its weights into a plain model (normswap migrate renames the keys)")
    if getattr(old, "weight", None) is None or not isinstance(old.weight, torch.Tensor):
        raise SkipLayer(f"{type(old).__name__} has no weight to apply {what} to")
    if parametrize.is_parametrized(old, "weight"):
        kinds = ", ".join(type(p).__name__.lstrip("_") for p in old.parametrizations.weight)
        raise SkipLayer(f"its weight is already parametrized ({kinds}); bake it first (normswap bake) or exclude it")
    return copy.deepcopy(old)


@register(
    "spectral_norm",
    families=("conv", "linear"),
    note=EMA_NOTE,
    carries=(),  # a rewrite of the layer's own weights, which always come along: no `carry:` to choose
    doc="Spectral normalization (Miyato et al. 2018): the weight divided by its largest singular value, "
        "estimated by power iteration in train mode (torch.nn.utils.parametrizations.spectral_norm; the "
        "output dimension first, dimension 1 for transposed convs). Makes the layer 1-Lipschitz.",
    options=(
        Option("n_power_iterations", int, 1, "power iterations per train-mode forward", minimum=1),
        Option("eps", float, 1e-12, "epsilon of the power iteration's normalizations", minimum=0.0),
    ),
)
def spectral_norm(ctx: LayerContext) -> Built:
    new = _private_copy(ctx, "spectral norm")
    weight = new.weight.detach()
    sigma = torch.linalg.matrix_norm(weight.movedim(_weight_dim(new), 0).flatten(1).double(), ord=2).item()
    parametrizations.spectral_norm(new, n_power_iterations=ctx.options["n_power_iterations"],
                                   eps=ctx.options["eps"], dim=_weight_dim(new))
    carried = {"weight": "parametrizations.weight.original", "bias": "bias"}
    notes = [f"weight divided by its largest singular value ({sigma:.3g})"]
    return Built(new, notes, {k: v for k, v in carried.items() if k in dict(ctx.module.named_parameters())})


@register(
    "weight_norm",
    keeps_function=True,
    families=("conv", "linear"),
    carries=(),  # a rewrite of the layer's own weights, which always come along: no `carry:` to choose
    doc="Weight normalization (Salimans & Kingma 2016): w = g · v/‖v‖ per output channel "
        "(torch.nn.utils.parametrizations.weight_norm; dim 1 for transposed convs). The output is "
        "unchanged at application: g starts as ‖w‖.",
)
def weight_norm(ctx: LayerContext) -> Built:
    new = _private_copy(ctx, "weight norm")
    parametrizations.weight_norm(new, name="weight", dim=_weight_dim(new))
    notes = ["g = ‖w‖ per output channel (new parameter parametrizations.weight.original0)"]
    groups = getattr(new, "groups", 1)
    if getattr(new, "transposed", False) and groups > 1:
        notes.append(f"grouped transposed conv: torch normalizes weight dim 1, which joins the {groups} groups' "
                     "channels of the same index")
    carried = {"weight": "parametrizations.weight.original1", "bias": "bias"}
    return Built(new, notes, {k: v for k, v in carried.items() if k in dict(ctx.module.named_parameters())})


@register(
    "cosine_norm",
    families=("conv", "linear"),
    carries=(),  # a rewrite of the layer's own weights, which always come along: no `carry:` to choose
    doc="Cosine normalization (Luo et al. 2018): the layer's dot product becomes scale · cos(w, x) over "
        "the input vector or receptive-field patch (normswap.layers.CosineLinear / CosineConv). The bias "
        "is dropped; the function changes.",
    options=(
        Option("scale", float, 1.0, "initial output scale (the cosine is in [-1, 1])"),
        Option("learn_scale", bool, True, "make the scale a trainable parameter (else a fixed buffer)"),
        Option("eps", float, 1e-8, "floor for the norms", minimum=0.0),
    ),
)
def cosine_norm(ctx: LayerContext) -> Built:
    from ..layers.cosine import CosineConv, CosineLinear

    old = ctx.module
    if parametrize.is_parametrized(old):
        raise SkipLayer("its weight is parametrized; bake it first (normswap bake) or exclude it")
    kw = {k: ctx.options[k] for k in ("scale", "learn_scale", "eps")}
    if isinstance(old, nn.Linear):
        new = CosineLinear.from_linear(old, **kw)
    elif getattr(old, "transposed", False):
        raise SkipLayer("a transposed convolution has no input patch to take a cosine with")
    else:
        new = CosineConv(old, **kw)
    new.train(old.training)
    notes = ["bias dropped: the cosine form has none"] if old.bias is not None else []
    return Built(new, notes + carry.finish(old, new), {"weight": "weight"})


@register(
    "bake",
    keeps_function=True,
    families=("conv", "linear"),
    carries=(),  # a rewrite of the layer's own weights, which always come along: no `carry:` to choose
    doc="Replace every parametrization of the layer (spectral/weight norm, ...) by its current eval-mode "
        "value: plain weights that pickle, export and fold.",
)
def bake_layer(ctx: LayerContext) -> Built:
    old = ctx.module
    legacy = legacy_hooks(old)
    if legacy:
        own = dict(old.named_parameters())  # the tensor the weight was computed from becomes the weight
        carried = {name: "weight" for name in ("weight_orig", "weight_v") if name in own}
        return Built(remove_legacy(copy.deepcopy(old)), [f"baked torch's legacy {', '.join(legacy)} hook"], carried)
    if not parametrize.is_parametrized(old):
        raise SkipLayer("not parametrized", quiet=True)
    names = list(old.parametrizations.keys())
    kinds = sorted({type(p).__name__.lstrip("_") for name in names for p in old.parametrizations[name]})
    new = bake(copy.deepcopy(old))
    carried = {f"parametrizations.{n}.original": n for n in names if hasattr(old.parametrizations[n], "original")}
    return Built(new, [f"baked {', '.join(kinds)} into {', '.join(names)}"], carried)


def bake(module: nn.Module) -> nn.Module:
    """Replace every parametrization of ``module`` by its current value (eval mode, so no power iteration).

    A deep copy of a parametrized module shares torch's injected class with the
    original, and removing a parametrization deletes its property from that
    class; the module gets a class of its own first so the original keeps working.
    """
    cls = type(module)
    if parametrize.is_parametrized(module):
        module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    was = module.training
    module.eval()
    with torch.no_grad():
        for name in list(getattr(module, "parametrizations", {}).keys()):
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    # weight_norm leaves a load hook (a local function, so unpicklable) that renames its old keys: gone with it
    for key, hook in list(module._load_state_dict_pre_hooks.items()):
        if "_weight_norm_compat_hook" in getattr(getattr(hook, "hook", hook), "__qualname__", ""):
            del module._load_state_dict_pre_hooks[key]
    module.train(was)
    return module


def remove_legacy(module: nn.Module) -> nn.Module:
    """Remove the old hooks from a private copy, leaving the weight they compute (eval: no power iteration)."""
    from torch.nn.utils import remove_spectral_norm, remove_weight_norm

    remove = {"spectral norm": remove_spectral_norm, "weight norm": remove_weight_norm}
    kinds = legacy_hook_types()
    was = module.training
    module.eval()
    with torch.no_grad():
        for hook in list(module._forward_pre_hooks.values()):
            if type(hook) in kinds:
                remove[kinds[type(hook)]](module, hook.name)
    module.train(was)
    return module


def bake_in_place(module: nn.Module) -> list[str]:
    """Bake a private copy's recomputed weight (parametrizations, torch's legacy hooks) into plain tensors; notes."""
    notes = []
    if parametrize.is_parametrized(module):
        bake(module)
        notes.append("parametrizations baked")
    legacy = legacy_hooks(module)
    if legacy:
        remove_legacy(module)
        notes.append(f"torch's legacy {', '.join(legacy)} hook baked")
    return notes


def power_iteration_buffers(model: nn.Module) -> list[str]:
    """State-dict keys of spectral norm's power-iteration vectors: an EMA must copy these, never average them."""
    out = []
    for path, module in model.named_modules():
        for name, plist in getattr(module, "parametrizations", {}).items():
            for i, p in enumerate(plist):
                for buf, _ in p.named_buffers(recurse=False):
                    if buf in ("_u", "_v"):
                        out.append(f"{path + '.' if path else ''}parametrizations.{name}.{i}.{buf}")
    return out
