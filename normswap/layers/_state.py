"""Tensor-copy primitives: the one implementation under carry.py and the layers' ``from_bn``.

Everything that copies a tensor from an old module into a new one goes through
``copy_named``: shape-checked, without autograd, keeping the source parameter's
``requires_grad``. The layers here use it directly; ``normswap.carry`` wraps it
for the replacements (carry.py imports layers/, so layers/ cannot import it).

A copy is described by a map, old name -> new name, which is also what a
report's ``carried`` map shows:

* ``"weight"`` -> ``"weight"`` (or ``"IN.weight"``, a submodule's tensor): the
  whole tensor, same shape; a rename, which the report's ``param_map`` follows;
* anything else reads as the slice assignment it is, ``new.<value> = old.<key>``:
  ``"weight[:8]"`` -> ``"IN.weight[:]"`` (channels 0..7, a slice of dim 0) and
  ``"weight"`` -> ``"weight[:]"`` (broadcast into every row of a (rows, C) table).
  These are not renames: ``param_map`` maps no optimizer state across them.

A name missing on either side (``None``, or no such attribute) is skipped, so
one map serves layers with and without affine or running statistics.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..families import activation_of
from ..module_copy import deepcopy_module

AFFINE = {"weight": "weight", "bias": "bias"}
RUNNING_STATS = {"running_mean": "running_mean", "running_var": "running_var",
                 "num_batches_tracked": "num_batches_tracked"}
KINDS = {"affine": AFFINE, "running_stats": RUNNING_STATS}  # what a recipe's ``carry:`` names -> default map
_WHAT = {"affine": "affine", "running_stats": "running statistics"}

_SOURCE = re.compile(r"^([A-Za-z_]\w*)(?:\[(\d*):(\d*)\])?$")
_TARGET = re.compile(r"^([A-Za-z_][\w.]*?)(\[:\])?$")


def factory_kwargs(module: nn.Module) -> dict:
    """device/dtype to build a replacement with: those of the module's first floating tensor (own, not children's)."""
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if t.is_floating_point():
            return {"device": t.device, "dtype": t.dtype}
    return {}


def tensor_at(module: nn.Module, name: str) -> torch.Tensor | None:
    """``module.<name>`` for a dotted name (``IN.weight``), or None when any part is missing or not a tensor."""
    obj = module
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, torch.Tensor) else None


def copy_tensor(dst: torch.Tensor, src: torch.Tensor, what: str, *, grad_from: torch.Tensor | None = None,
                error: type[Exception] = ValueError) -> None:
    """dst <- src in place, shapes equal; a parameter ``dst`` takes ``grad_from``'s requires_grad when given."""
    if dst.shape != src.shape:
        raise error(f"cannot carry {what}: shape {tuple(src.shape)} does not fit {tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(src.detach())
    if grad_from is not None and isinstance(dst, nn.Parameter):
        dst.requires_grad_(grad_from.requires_grad)


def copy_named(old: nn.Module, new: nn.Module, names: Mapping[str, str], what: str, *,
               error: type[Exception] = ValueError) -> dict[str, str]:
    """Copy each old -> new pair of ``names`` present on both sides; returns the pairs copied (the map's syntax above).

    ``requires_grad`` follows the old tensor when it is a parameter (a frozen γ stays frozen); a buffer
    copied into a parameter leaves the parameter trainable.
    """
    carried = {}
    for src_name, dst_name in names.items():
        src_m, dst_m = _SOURCE.match(src_name), _TARGET.match(dst_name)
        if src_m is None or dst_m is None:
            raise ValueError(f"bad carry map entry {src_name!r} -> {dst_name!r}")
        base = tensor_at(old, src_m.group(1))
        dst = tensor_at(new, dst_m.group(1))
        if base is None or dst is None:
            continue
        src = base
        if src_name.endswith("]"):
            lo, hi = src_m.group(2), src_m.group(3)
            src = base[int(lo) if lo else None:int(hi) if hi else None]
        if dst_m.group(2):  # dst[:] = src, broadcasting as torch does
            try:
                src = src.expand_as(dst)
            except RuntimeError:
                raise error(f"cannot carry {what} '{src_name}': shape {tuple(src.shape)} does not broadcast to "
                            f"{tuple(dst.shape)}") from None
        grad_from = base if isinstance(base, nn.Parameter) else None
        copy_tensor(dst, src, f"{what} '{src_name}'", grad_from=grad_from, error=error)
        carried[src_name] = dst_name
    return carried


def carry_map(new: nn.Module, kind: str) -> dict[str, str]:
    """The map for one kind of state (``affine``, ``running_stats``) into ``new``: its own ``carry_names``, or
    the plain same-name map."""
    own = getattr(new, "carry_names", None)
    return dict(own()[kind]) if callable(own) else dict(KINDS[kind])


def copy_kinds(old: nn.Module, new: nn.Module, kinds, *, error: type[Exception] = ValueError) -> dict[str, str]:
    """Copy every kind of state in ``kinds`` (``affine``, ``running_stats``) that both modules have."""
    carried: dict[str, str] = {}
    for kind in KINDS:
        if kind in kinds:
            carried.update(copy_named(old, new, carry_map(new, kind), _WHAT[kind], error=error))
    return carried


def require_bn(bn: nn.Module, layer: str, *, needs_stats: bool) -> None:
    """Raise unless ``bn`` is a torch BatchNorm (any subclass, timm's included) usable by ``layer``."""
    if not isinstance(bn, _BatchNorm):
        raise TypeError(f"{layer}.from_bn expects a torch BatchNorm layer (a _BatchNorm subclass), "
                        f"got {type(bn).__name__}")
    if needs_stats and bn.running_mean is None:
        raise ValueError(f"{layer}.from_bn needs running statistics, but this {type(bn).__name__} was built "
                         "with track_running_stats=False")


_BN_DIMS = ((nn.BatchNorm1d, 1), (nn.BatchNorm2d, 2), (nn.BatchNorm3d, 3))


def bn_dim(bn: nn.Module) -> int | None:
    """1, 2 or 3 for BatchNorm1d/2d/3d (and subclasses such as timm's BatchNormAct2d); None otherwise."""
    return next((d for cls, d in _BN_DIMS if isinstance(bn, cls)), None)


def activation_module(old: nn.Module) -> nn.Module | None:
    """Copies of what a timm norm-act layer runs after its norm (``drop``, ``act``), Identity parts left out:
    one module, a Sequential of two, or None when there is nothing to run (or ``old`` is a plain norm)."""
    act = activation_of(old)
    if act is None:
        return None
    parts = [deepcopy_module(m) for m in act if not isinstance(m, nn.Identity)]
    if not parts:
        return None
    return nn.Sequential(*parts) if len(parts) > 1 else parts[0]
