"""The one place that moves state from an old module into its replacement.

New modules are built fresh on the old module's device and dtype, and values are
copied in, so a prepared module never shares storage with the caller's model.
Three kinds of state move, each only through here:

* tensors (γ/β, running statistics, weights): ``carry_state`` for what a rule's
  ``carry:`` asks, ``carry_tensors`` for an explicit map. The copy itself is
  ``normswap.layers._state.copy_named``, which the layers' ``from_bn`` share;
* a timm norm-act layer's ``drop`` and ``act`` into the new norm:
  ``with_activation``, through timm's norm-act class for that norm (``NORM_ACT``)
  or else the class from ``normswap.layers.norm_act``;
* what is left of a norm-act layer without its norm: ``activation_or_identity``.
"""
from __future__ import annotations

from collections.abc import Callable, Collection

import torch.nn as nn
from timm.layers import LayerNorm2d
from timm.layers.norm_act import (
    FrozenBatchNorm2d,
    FrozenBatchNormAct2d,
    GroupNorm1Act,
    GroupNormAct,
    LayerNormAct,
    LayerNormAct2d,
    SyncBatchNormAct,
)

from .errors import PlanError
from .families import activation_of
from .layers import _state
from .layers._state import factory_kwargs
from .layers.norm_act import act_class
from .module_copy import deepcopy_module

__all__ = [
    "NORM_ACT", "activation_or_identity", "carry_affine", "carry_running_stats", "carry_state", "carry_tensors",
    "factory_kwargs", "finish", "norm_act_class", "with_activation",
]

# ---------------------------------------------------------------- tensors


def carry_tensors(old: nn.Module, new: nn.Module, names: dict[str, str], what: str) -> dict[str, str]:
    """Copy ``old.<a>`` into ``new.<b>`` for each a -> b present in both; returns what was carried.

    ``b`` may name a submodule's tensor (``IN.weight``); a copy that is not a rename reads as a slice assignment
    (``"weight[:8]" -> "IN.weight[:]"``, ``"weight" -> "weight[:]"``, broadcasting): the syntax of
    ``normswap.layers._state``. The map returned is the report's ``carried``.
    """
    return _state.copy_named(old, new, names, what, error=PlanError)


def carry_affine(old: nn.Module, new: nn.Module) -> dict[str, str]:
    """γ/β (``weight``/``bias``), whether they are parameters or, as in frozen BN, buffers."""
    return carry_tensors(old, new, _state.carry_map(new, "affine"), "affine")


def carry_running_stats(old: nn.Module, new: nn.Module) -> dict[str, str]:
    """running_mean, running_var and num_batches_tracked, those of them both layers have."""
    return carry_tensors(old, new, _state.carry_map(new, "running_stats"), "running statistics")


def carry_state(old: nn.Module, new: nn.Module, kinds: Collection[str]) -> dict[str, str]:
    """What a rule's ``carry:`` asks for (``ctx.carry``): γ/β for ``affine``, the statistics for
    ``running_stats``; whatever is not asked for keeps ``new``'s fresh value. Returns the carried map."""
    carried: dict[str, str] = {}
    if "affine" in kinds:
        carried.update(carry_affine(old, new))
    if "running_stats" in kinds:
        carried.update(carry_running_stats(old, new))
    return carried


# ---------------------------------------------------------------- activations

# norm kind -> timm's norm-act class, and its constructor arguments read from the plain norm (the pairs of
# timm's create_norm_act / get_norm_act_layer). A norm without an entry keeps an activation through the
# class normswap.layers.norm_act defines for it.
NORM_ACT: dict[str, tuple[type, Callable[[nn.Module], dict]]] = {
    "groupnorm": (GroupNormAct, lambda n: {"num_channels": n.num_channels, "num_groups": n.num_groups,
                                           "eps": n.eps, "affine": n.affine, "apply_act": False}),
    "groupnorm1": (GroupNorm1Act, lambda n: {"num_channels": n.num_channels, "eps": n.eps, "affine": n.affine,
                                             "apply_act": False}),
    "layernorm": (LayerNormAct, lambda n: {"normalization_shape": n.normalized_shape, "eps": n.eps,
                                           "affine": n.elementwise_affine, "bias": n.bias is not None,
                                           "apply_act": False}),
    "layernorm2d": (LayerNormAct2d, lambda n: {"num_channels": n.normalized_shape[0], "eps": n.eps,
                                               "affine": n.elementwise_affine, "apply_act": False}),
    "frozenbatchnorm2d": (FrozenBatchNormAct2d, lambda n: {"num_features": n.weight.shape[0], "eps": n.eps,
                                                           "apply_act": False}),
    "syncbatchnorm": (SyncBatchNormAct, lambda n: {"num_features": n.num_features, "eps": n.eps,
                                                   "momentum": n.momentum, "affine": n.affine,
                                                   "track_running_stats": n.track_running_stats}),
}

# the kind of a plain norm, by exact class; GroupNorm(1, C) is "groupnorm" unless the caller says "groupnorm1"
_KIND_OF: dict[type, str] = {
    nn.GroupNorm: "groupnorm",
    nn.LayerNorm: "layernorm",
    LayerNorm2d: "layernorm2d",
    FrozenBatchNorm2d: "frozenbatchnorm2d",
    nn.SyncBatchNorm: "syncbatchnorm",
}


def norm_act_class(kind: str) -> type | None:
    """timm's norm-act class for a norm kind (``groupnorm`` -> GroupNormAct), or None where timm has none."""
    entry = NORM_ACT.get(kind.lower().replace("_", "").replace("-", ""))
    return entry[0] if entry else None


def with_activation(old: nn.Module, new: nn.Module, notes: list[str], *, kind: str | None = None) -> nn.Module:
    """``new`` (a plain norm) followed by the ``drop`` and ``act`` of the norm-act layer ``old``.

    Where timm pairs the norm with an activation (``NORM_ACT``, by ``kind``, else by ``new``'s class), the
    result is that timm class built with ``new``'s settings and tensors, whenever ``old`` is a norm-act layer.
    Otherwise ``new`` becomes the ``normswap.layers.norm_act`` class for its class, when ``old`` has an
    activation or drop other than Identity. A plain ``old`` gives ``new`` back. Notes say what was kept.
    """
    if activation_of(old) is None:
        return new
    entry = NORM_ACT.get(kind or _KIND_OF.get(type(new), ""))
    if entry is not None:
        new = _rebuilt(new, *entry)
    elif _state.activation_module(old) is None:
        return new
    else:
        new.__class__ = act_class(type(new))  # same state, plus the drop/act slots the mixin runs after the norm
        new.drop, new.act = nn.Identity(), nn.Identity()
    for name in ("drop", "act"):
        sub = getattr(old, name, None)
        if isinstance(sub, nn.Module):
            setattr(new, name, deepcopy_module(sub))
            if not isinstance(sub, nn.Identity):
                notes.append(f"kept {name} {type(sub).__name__}")
    return new


def _rebuilt(norm: nn.Module, cls: type, args: Callable[[nn.Module], dict]) -> nn.Module:
    """``cls`` built with ``norm``'s settings, taking over ``norm``'s tensors (so their values, device, dtype
    and requires_grad) and train flag; ``norm`` is a fresh private module, left behind."""
    paired = cls(**args(norm))
    own = dict(paired.named_parameters(recurse=False)), dict(paired.named_buffers(recurse=False))
    theirs = dict(norm.named_parameters(recurse=False)), dict(norm.named_buffers(recurse=False))
    if [sorted(d) for d in own] != [sorted(d) for d in theirs]:
        raise PlanError(f"{cls.__name__} does not hold the tensors of {type(norm).__name__}")
    for table in theirs:
        for name, t in table.items():
            setattr(paired, name, t)
    return paired.train(norm.training)


def activation_or_identity(old: nn.Module) -> tuple[nn.Module, list[str]]:
    """What is left of a norm layer once its normalization is gone: the activation it carried, or Identity."""
    new = _state.activation_module(old)
    if new is None:
        return nn.Identity(), []
    new.train(old.training)
    return new, [f"kept activation {type(activation_of(old)[1]).__name__}"]


# ---------------------------------------------------------------- the rest


def finish(old: nn.Module, new: nn.Module) -> list[str]:
    """Match the train/eval flag and say what could not be moved (hooks other code registered)."""
    new.train(old.training)
    notes = []
    hooks = {
        "forward hook": old._forward_hooks,
        "forward pre-hook": old._forward_pre_hooks,
        "backward hook": old._backward_hooks,
        "backward pre-hook": getattr(old, "_backward_pre_hooks", {}),
    }
    for kind, table in hooks.items():
        if table:
            notes.append(
                f"{len(table)} {kind}(s) registered on the old module were not moved: they refer to the old "
                "module; register them again on the new one"
            )
    return notes
