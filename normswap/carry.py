"""The one place that moves state from an old module into its replacement.

New modules are built fresh on the old module's device and dtype, and values are
copied in, so a prepared module never shares storage with the caller's model.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .errors import PlanError


def factory_kwargs(module: nn.Module) -> dict:
    """device/dtype to build a replacement with: those of the old module's first floating tensor."""
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if t.is_floating_point():
            return {"device": t.device, "dtype": t.dtype}
    return {}


def _copy(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if dst.shape != src.shape:
        raise PlanError(f"cannot carry {what}: shape {tuple(src.shape)} does not fit {tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(src.detach())


def carry_tensors(old: nn.Module, new: nn.Module, names: dict[str, str], what: str) -> dict[str, str]:
    """Copy ``old.<a>`` into ``new.<b>`` for each a -> b present in both; returns what was carried."""
    carried = {}
    for src_name, dst_name in names.items():
        src = getattr(old, src_name, None)
        dst = getattr(new, dst_name, None)
        if src is None or dst is None:
            continue
        _copy(dst, src, f"{what} '{src_name}'")
        if isinstance(src, nn.Parameter) and isinstance(dst, nn.Parameter):
            dst.requires_grad_(src.requires_grad)
        carried[src_name] = dst_name
    return carried


def carry_affine(old: nn.Module, new: nn.Module) -> dict[str, str]:
    """γ/β (``weight``/``bias``), whether they are parameters or, as in frozen BN, buffers."""
    return carry_tensors(old, new, {"weight": "weight", "bias": "bias"}, "affine")


def carry_running_stats(old: nn.Module, new: nn.Module) -> dict[str, str]:
    names = {"running_mean": "running_mean", "running_var": "running_var", "num_batches_tracked": "num_batches_tracked"}
    return carry_tensors(old, new, names, "running statistics")


def carry_activation(old: nn.Module, new: nn.Module) -> list[str]:
    """Give ``new`` copies of a timm norm-act layer's ``drop`` and ``act`` (activation kept as it was)."""
    notes = []
    for name in ("drop", "act"):
        sub = getattr(old, name, None)
        if isinstance(sub, nn.Module):
            setattr(new, name, copy.deepcopy(sub))
            if not isinstance(sub, nn.Identity):
                notes.append(f"kept {name} {type(sub).__name__}")
    return notes


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
