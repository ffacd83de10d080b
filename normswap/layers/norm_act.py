"""Norm + activation in one module, for norms timm has no norm-act class for.

A timm ``BatchNormAct2d`` carries its activation (and drop) inside. When it is
swapped for a norm timm does not pair with an activation, the new module keeps
them the same way, so the state-dict keys (``bn1.weight``) and the module tree
stay as they were. The classes are made once, at import, under stable names so
that a rewritten model pickles and unpickles like any other.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class NormActMixin:
    """Runs ``drop`` then ``act`` after the norm's own forward; both start as Identity."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.drop = nn.Identity()
        self.act = nn.Identity()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.act(self.drop(super().forward(x, *args, **kwargs)))


_ACT_CLASSES: dict[type, type] = {}


def act_class(norm_cls: type) -> type:
    """The norm-act class for ``norm_cls`` (``InstanceNorm2d`` -> ``InstanceNormAct2d``)."""
    try:
        return _ACT_CLASSES[norm_cls]
    except KeyError:
        raise KeyError(f"no norm-act class is defined for {norm_cls.__name__}") from None


def define_act_class(norm_cls: type, module_globals: dict) -> type:
    """Make ``<Name>Act<dim>`` for ``norm_cls`` and bind it in the caller's module (so pickle finds it)."""
    name = norm_cls.__name__
    for suffix in ("1d", "2d", "3d"):
        if name.endswith(suffix):
            act_name = f"{name[:-2]}Act{suffix}"
            break
    else:
        act_name = f"{name}Act"
    cls = type(act_name, (NormActMixin, norm_cls), {
        "__module__": module_globals["__name__"],
        "__qualname__": act_name,
        "__doc__": f"{name} followed by the activation (and drop) of the norm-act layer it replaced.",
    })
    module_globals[act_name] = cls
    _ACT_CLASSES[norm_cls] = cls
    return cls


for _cls in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
    define_act_class(_cls, globals())


def _define_catalog_act_classes() -> None:
    from .conditional import ConditionalBatchNorm2d, ConditionalInstanceNorm2d
    from .ibn import IBN
    from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d

    for cls in (BatchRenorm2d, IBN, ConditionalInstanceNorm2d, ConditionalBatchNorm2d, BatchRenorm1d, BatchRenorm3d):
        define_act_class(cls, globals())


_define_catalog_act_classes()
