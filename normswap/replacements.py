"""Built-in replacements. Each factory reads the old layer, builds a fresh one and carries state."""
from __future__ import annotations

import copy

import torch.nn as nn

from . import carry
from .families import activation_of, channels_of
from .grouping import choose_num_groups, valid_group_counts
from .match import glob_match
from .registry import Built, Option, SkipLayer, register

_BN_LIKE = ("batchnorm", "frozen_batchnorm")


@register(
    "group_norm",
    families=_BN_LIKE,
    carries=("affine",),
    doc="GroupNorm over groups of channels per sample; BN's γ/β become GN's per-channel affine.",
    options=(
        Option("num_groups", int, 32, "target number of groups; the nearest valid count is taken", minimum=1),
        Option("group_size", int, None, "channels per group instead of num_groups", nullable=True, minimum=1),
        Option("min_group_size", int, 4, "fewest channels a group may have (smaller groups approach InstanceNorm)", minimum=1),
        Option("groups_by_path", dict, {}, "exact group counts by path glob; a count that does not fit is an error"),
        Option("eps", float, None, "epsilon; default: the old layer's", nullable=True, minimum=0.0),
    ),
)
def group_norm(ctx) -> Built:
    old = ctx.module
    opts = ctx.options
    channels = channels_of(old)
    if channels is None:
        raise SkipLayer("cannot tell its channel count")
    notes: list[str] = []
    explicit = next(
        (n for g, n in opts["groups_by_path"].items() if any(glob_match(g, p) for p in ctx.paths)), None
    )
    if explicit is not None:
        if not isinstance(explicit, int) or isinstance(explicit, bool) or explicit <= 0:
            ctx.fail(f"groups_by_path gives {explicit!r} groups; it must be a positive integer")
        if channels % explicit:
            ctx.fail(
                f"groups_by_path asks for {explicit} groups on {channels} channels, which {explicit} does not "
                f"divide; valid counts: {', '.join(map(str, valid_group_counts(channels, 1)))}"
            )
        groups = explicit
    else:
        target = channels // opts["group_size"] if opts["group_size"] else opts["num_groups"]
        groups = choose_num_groups(channels, max(target, 1), opts["min_group_size"])
        if groups != target:
            notes.append(
                f"{groups} groups of {channels // groups} instead of {target} "
                f"(nearest count dividing {channels} with >= {opts['min_group_size']} channels per group)"
            )
    size = channels // groups
    if size < 4 and groups > 1:
        notes.append(f"warning: groups of {size} channel(s) behave close to InstanceNorm")
    if groups == 1 and channels > 1:
        notes.append("one group: normalizes over all channels, like LayerNorm over C,H,W")

    eps = opts["eps"] if opts["eps"] is not None else float(getattr(old, "eps", 1e-5))
    affine = getattr(old, "weight", None) is not None
    fk = carry.factory_kwargs(old)
    act = activation_of(old)
    if act is not None:
        from timm.layers.norm_act import GroupNormAct

        new = GroupNormAct(channels, groups, eps=eps, affine=affine, apply_act=False, **fk)
        notes += carry.carry_activation(old, new)
    else:
        new = nn.GroupNorm(groups, channels, eps=eps, affine=affine, **fk)
    carried = carry.carry_affine(old, new) if "affine" in ctx.carry and affine else {}
    notes += carry.finish(old, new)
    return Built(new, notes, carried)


def activation_or_identity(old: nn.Module) -> tuple[nn.Module, list[str]]:
    """What is left of a norm layer once its normalization is gone: the activation it carried, or Identity."""
    act = activation_of(old)
    if act is None:
        return nn.Identity(), []
    parts = [copy.deepcopy(m) for m in act if not isinstance(m, nn.Identity)]
    if not parts:
        return nn.Identity(), []
    new = nn.Sequential(*parts) if len(parts) > 1 else parts[0]
    new.train(old.training)
    return new, [f"kept activation {type(act[1]).__name__}"]


@register(
    "identity",
    families=(),
    carries=(),
    doc="Remove the layer: nn.Identity, or the activation a timm norm-act layer carried.",
)
def identity(ctx) -> Built:
    new, notes = activation_or_identity(ctx.module)
    notes = ["parameters and buffers dropped"] + notes + carry.finish(ctx.module, new)
    return Built(new, notes, {})
