"""Layer families: the exact classes each family name stands for.

Families list exact classes on purpose. A subclass of BatchNorm2d with its own
forward may compute something else, so it is matched only when a rule says
``include_subclasses: true``; otherwise it is listed in the report as skipped.
The one exception: a norm-like class no list names (Hugging Face's per-model
RMSNorms, T5LayerNorm) joins ``layernorm`` or ``rmsnorm`` when its output on a
probe input shows which it computes (``norm_probe``).
"""
from __future__ import annotations

import functools

import torch.nn as nn

from .norm_probe import is_norm_like, probe


@functools.lru_cache(maxsize=None)
def family_classes() -> dict[str, tuple[type, ...]]:
    import timm.layers as tl
    from timm.layers import norm_act
    from timm.models.metaformer import LayerNorm2dNoBias, LayerNormNoBias
    from torchvision.ops.misc import FrozenBatchNorm2d as TvFrozenBatchNorm2d

    return {
        "batchnorm": (
            nn.BatchNorm1d,
            nn.BatchNorm2d,
            nn.BatchNorm3d,
            nn.SyncBatchNorm,
            norm_act.BatchNormAct2d,
            norm_act.SyncBatchNormAct,
        ),
        "frozen_batchnorm": (TvFrozenBatchNorm2d, norm_act.FrozenBatchNormAct2d),
        "groupnorm": (nn.GroupNorm, norm_act.GroupNormAct, norm_act.GroupNorm1Act),
        "layernorm": (nn.LayerNorm, tl.LayerNorm, tl.LayerNorm2d, tl.LayerNormFp32, tl.LayerNorm2dFp32,
                      norm_act.LayerNormAct, norm_act.LayerNormAct2d, LayerNormNoBias, LayerNorm2dNoBias),
        "rmsnorm": (nn.RMSNorm, tl.RmsNorm, tl.RmsNorm2d, tl.RmsNormFp32, tl.RmsNorm2dFp32),
        "instancenorm": (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d),
        "conv": (
            nn.Conv1d,
            nn.Conv2d,
            nn.Conv3d,
            nn.ConvTranspose1d,
            nn.ConvTranspose2d,
            nn.ConvTranspose3d,
        ),
        "linear": (nn.Linear,),
    }


NORM_FAMILIES = ("batchnorm", "frozen_batchnorm", "groupnorm", "layernorm", "rmsnorm", "instancenorm")

# Base classes whose subclasses are "near misses" of a family: reported, not matched.
_FAMILY_BASES = {
    "batchnorm": (nn.modules.batchnorm._BatchNorm,),
    "groupnorm": (nn.GroupNorm,),
    "layernorm": (nn.LayerNorm,),
    "rmsnorm": (nn.RMSNorm,),
    "instancenorm": (nn.modules.instancenorm._InstanceNorm,),
    "conv": (nn.modules.conv._ConvNd,),
    "linear": (nn.Linear,),
}


_ALL_BASES = tuple(c for bases in _FAMILY_BASES.values() for c in bases)


def built_class(module: nn.Module) -> type:
    """The class a module was built as: torch's parametrize swaps in a generated ``Parametrized<Class>``."""
    cls = type(module)
    if "parametrizations" in module._modules and cls.__name__ == f"Parametrized{cls.__bases__[0].__name__}":
        return cls.__bases__[0]
    return cls


def family_of(module: nn.Module) -> str | None:
    """The family whose exact classes include the module's class (looking through parametrization), or None;
    for a norm-like class no family lists, the family its output on a probe shows (``norm_probe``)."""
    cls = built_class(module)
    for name, classes in family_classes().items():
        if cls in classes:
            return name
    if is_norm_like(module) and not isinstance(module, _ALL_BASES):
        form = probe(module)
        return form.family if form is not None else None
    return None


def near_family_of(module: nn.Module) -> str | None:
    """The family a module subclasses without being one of its exact classes; ``unidentified_norm`` for a
    norm-like class whose output matches no known form."""
    if family_of(module) is not None:
        return None
    for name, bases in _FAMILY_BASES.items():
        if isinstance(module, bases):
            return name
    if is_norm_like(module):
        return "unidentified_norm"
    return None


def is_norm_layer(module: nn.Module) -> bool:
    fam = family_of(module) or near_family_of(module)
    return fam in NORM_FAMILIES or fam == "unidentified_norm"


def channels_of(module: nn.Module) -> int | None:
    """The channel count a normalization or conv/linear layer works on."""
    for attr in ("num_features", "num_channels", "out_channels", "out_features"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    shape = getattr(module, "normalized_shape", None)
    if shape:
        return int(shape[-1]) if len(shape) == 1 else int(shape[0])
    weight = getattr(module, "weight", None)
    if weight is not None and getattr(weight, "ndim", 0) == 1:
        return int(weight.shape[0])
    return None


def activation_of(module: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(drop, act) of a timm norm-act layer, or None for a plain norm layer."""
    act = getattr(module, "act", None)
    drop = getattr(module, "drop", None)
    if isinstance(act, nn.Module) and isinstance(drop, nn.Module):
        return drop, act
    if isinstance(act, nn.Module):  # SyncBatchNormAct may carry only act
        return nn.Identity(), act
    return None
