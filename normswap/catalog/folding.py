"""BatchNorm folding: which BNs can be folded where (from the recorded graph), and the ``fold`` replacement.

``fold_site`` is the single foldability analysis: ``inspect`` reports it and the
``fold`` replacement acts on it, so the two cannot disagree.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils import parametrize

from ..carry import activation_or_identity
from ..factory import Built, LayerContext, NeighbourEdit, SkipLayer
from ..families import built_class, family_of
from ..fold_map import FoldLink
from ..fold_math import (
    bn_affine,
    fold_expert_output_channels,
    fold_input_channels,
    fold_output_channels,
)
from ..graph import DataFlow, _short, describe, users_of
from ..registry import Option, register
from .weight_norms import bake_in_place, legacy_hook_types, legacy_hooks

# Operations that move elements around without changing them; a BN can be folded through them
# when its channels still line up with the producer's output channels (checked by replaying them).
_LAYOUT_OPS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "contiguous",
               "transpose", "permute", "movedim", "swapaxes", "swapdims"}


@functools.cache
def _allowed_targets() -> tuple[type, ...]:
    from timm.layers.cond_conv2d import CondConv2d
    from timm.layers.conv2d_same import Conv2dSame

    from ..layers import ShiftedCondConv2d

    return (
        nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
        nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear, Conv2dSame,
        CondConv2d, ShiftedCondConv2d,  # expert kernels mixed per sample: folded by write_folded_experts
    )


# What a conv/linear forward reads its weight through. A subclass of an allowed class that defines none of
# these runs that class's forward on the weight as stored (torchvision's Conv3DSimple, a user's Conv2d with
# an __init__ of its own), so it folds like that class; one that redefines any of them is left.
_FORWARD_PATH = frozenset({"forward", "_conv_forward", "_output_padding", "__call__", "_call_impl",
                           "_wrapped_call_impl", "__getattr__", "__getattribute__", "weight", "bias"})


@functools.cache
def fold_base(cls: type) -> type | None:
    """The allowed class whose forward ``cls`` runs unchanged (``cls`` itself if allowed), or None.

    CondConv2d is taken only as itself: folding turns it into ShiftedCondConv2d, which a subclass is not.
    """
    from timm.layers.cond_conv2d import CondConv2d

    allowed = _allowed_targets()
    for c in cls.__mro__:
        if c in allowed:
            return c if c is cls or not issubclass(c, CondConv2d) else None
        if not _FORWARD_PATH.isdisjoint(vars(c)):
            return None
    return None


def _is_cond_conv(module: nn.Module) -> bool:
    from timm.layers.cond_conv2d import CondConv2d

    return isinstance(module, CondConv2d) and module.weight.ndim == 2


def is_pruned(module: nn.Module) -> bool:
    return hasattr(module, "weight_orig") and hasattr(module, "weight_mask")


def _hook_name(hook) -> str:
    return getattr(hook, "__qualname__", None) or type(hook).__name__


@functools.cache
def _accounted_hooks() -> tuple[type, ...]:
    """Pre-hook types folding accounts for: pruning (folded through ``weight_orig``) and torch's legacy
    weight/spectral norm (``legacy_hooks``: baked or reported on their own)."""
    from torch.nn.utils.prune import BasePruningMethod

    return (BasePruningMethod, *legacy_hook_types())


def foreign_hooks(module: nn.Module) -> str | None:
    """The forward hooks and pre-hooks of the user's on ``module``, described; None if there are none."""
    if not module._forward_pre_hooks and not module._forward_hooks:
        return None
    pre = [_hook_name(h) for h in module._forward_pre_hooks.values() if not isinstance(h, _accounted_hooks())]
    post = [_hook_name(h) for h in module._forward_hooks.values()]
    parts = ([f"forward pre-hooks ({', '.join(pre[:3])})"] if pre else []) + \
        ([f"forward hooks ({', '.join(post[:3])})"] if post else [])
    return " and ".join(parts) or None


def target_problem(module: nn.Module, *, bake: bool) -> str | None:
    """Why BN cannot be folded into ``module``'s weights, or None if it can (exactly)."""
    cls = built_class(module)
    name = cls.__name__
    if parametrize.is_parametrized(module) and not bake:
        return (f"{name}'s weight is parametrized (weight/spectral norm): its forward recomputes the weight; "
                "set bake_parametrizations: true to bake it, then fold")
    legacy = legacy_hooks(module)
    if legacy and not bake:
        return (f"{name}'s weight is recomputed in every forward by torch's legacy {legacy[0]} hook "
                "(torch.nn.utils.weight_norm/spectral_norm); set bake_parametrizations: true to bake it, then fold")
    hooks = foreign_hooks(module)
    if hooks:
        return (f"{name} has {hooks}: user code that may read its weight or its output, which folding changes; "
                "remove them before folding (handle.remove()), or exclude this BN")
    if name in ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame"):
        return f"{name} standardizes its weight in forward, which would undo the folded scale"
    if hasattr(module, "bias_orig"):
        return f"{name}'s bias is pruned: the folded shift cannot live behind its mask"
    if fold_base(cls) is None:
        return f"{name} is not a conv/linear class whose forward uses its weight as stored"
    return None


@dataclass
class FoldSite:
    """Where one BN could fold: into these producers, each for a slice of the BN's channels."""

    bn_path: str
    targets: list[tuple[str, slice]] = field(default_factory=list)
    through: list[str] = field(default_factory=list)  # layout ops between producer and BN
    reason: str | None = None  # None: foldable
    into_next: bool = False  # True: the target reads the BN's output (fold into its input channels)

    @property
    def foldable(self) -> bool:
        return self.reason is None

    def links(self, s: torch.Tensor, t: torch.Tensor, layer: Callable[[str], nn.Module]) -> dict[str, FoldLink]:
        """The fold as a map for per-layer checks: which layer lines up with the reference through the BN's
        affine (s, t). ``layer``: path -> module, to tell a linear's channel axis from a conv's."""
        if self.into_next:
            return {self.bn_path: FoldLink("before", self.bn_path, s, t),
                    self.targets[0][0]: FoldLink("next", self.bn_path, s, t)}
        links = {self.bn_path: FoldLink("folded", self.bn_path, s, t)}
        for path, channels in self.targets:
            axis = -1 if isinstance(layer(path), nn.Linear) else 1
            links[path] = FoldLink("into", self.bn_path, s[channels], t[channels], axis)
        return links


def _bn_problem(flow: DataFlow, bn_path: str, assume_eval: bool = False) -> str | None:
    """Why this BN cannot be folded anywhere, whatever is next to it; None if it is a fixed affine called once."""
    mc = flow.modules[flow.canonical(bn_path)]
    bn = mc.module
    if getattr(bn, "running_mean", None) is None:
        return "no running statistics (track_running_stats=False): it always normalizes with batch statistics"
    if bn.training and family_of(bn) != "frozen_batchnorm" and not assume_eval:
        return "in train mode, where it normalizes with batch statistics; fold an eval-mode model (model.eval())"
    if mc.call_count == 0:
        return "never called in the forward pass"
    if mc.call_count > 1:
        return f"called {mc.call_count} times: one folded copy cannot serve every call"
    hooks = foreign_hooks(bn)
    if hooks:
        return f"it has {hooks} that would go with it; remove them before folding (handle.remove()), or exclude it"
    read = flow.tensors_read_outside(bn)
    if read:
        return f"the forward also reads its {', '.join(read)} outside it, which would be gone with it"
    return None


def fold_site(flow: DataFlow, bn_path: str, *, bake: bool = False, assume_eval: bool = False) -> FoldSite:
    """Decide whether the BN at ``bn_path`` folds into the layer(s) producing its input.

    ``assume_eval``: answer for the model as it will be in eval mode (what ``inspect`` shows).
    """
    site = FoldSite(bn_path)
    mc = flow.modules[flow.canonical(bn_path)]
    bn = mc.module

    def leave(reason: str) -> FoldSite:
        site.reason = reason
        return site

    why = _bn_problem(flow, bn_path, assume_eval)
    if why:
        return leave(why)
    channels = int(bn.running_mean.shape[0])
    consumer: fx.Node = mc.nodes[0]
    src = flow.input_node(bn_path)
    chain: list[fx.Node] = []
    while (src is not None and src.op == "call_function" and _short(src.meta.get("func_name", "")) in _LAYOUT_OPS
           and len(users_of(src)) == 1):
        chain.append(src)
        consumer = src
        src = _tensor_args(src)[0] if len(_tensor_args(src)) == 1 else None
    if src is None:
        return leave("its input does not come from a single layer")
    if src.op == "call_function" and _short(src.meta.get("func_name", "")) == "cat" and not chain:
        return _concat_site(flow, site, src, channels, bake)
    if src.op != "call_module":
        return leave(f"its input comes from {describe(src)}, not from a conv or linear layer")
    why = _producer_problem(flow, src, consumer, channels, bake)
    if why:
        return leave(why)
    if chain and not _channels_line_up(flow, src, list(reversed(chain)), channels):
        return leave(f"its channels do not line up with {src.target}'s outputs through "
                     f"{', '.join(describe(n) for n in reversed(chain))}")
    site.targets = [(flow.canonical(src.target), slice(0, channels))]
    site.through = [describe(n) for n in reversed(chain)]
    return site


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes]


def _producer_problem(flow: DataFlow, src: fx.Node, consumer: fx.Node, channels: int, bake: bool) -> str | None:
    module = flow.modules[src.target].module
    name = f"{src.target} ({type(module).__name__})"
    users = users_of(src)
    if len(users) != 1 or users[0] is not consumer:
        others = [describe(u) for u in users if u is not consumer]
        return f"the output of {name} also feeds {', '.join(others[:3])}"
    if flow.call_count(src.target) != 1:
        return f"{name} is called {flow.call_count(src.target)} times: folding into it would change every call"
    why = target_problem(module, bake=bake) or _read_outside_problem(flow, module, name)
    if why:
        return why
    out_ch = getattr(module, "out_channels", getattr(module, "out_features", None))
    if out_ch != channels:
        return f"{name} has {out_ch} output channels, the BN {channels}"
    return None


def _read_outside_problem(flow: DataFlow, module: nn.Module, name: str) -> str | None:
    read = flow.tensors_read_outside(module)
    if read:
        return f"the forward also reads {name}'s {', '.join(read)} outside it, and would read the folded values"
    return None


def _channels_line_up(flow: DataFlow, src: fx.Node, chain: list[fx.Node], channels: int) -> bool:
    """Replay the layout ops on a tensor of channel indices: BN channel c must hold producer channel c."""
    shape = src.meta.get("shape")
    if shape is None:
        return False
    module = flow.modules[src.target].module
    axis = len(shape) - 1 if isinstance(module, nn.Linear) else 1
    view = [channels if i == axis else 1 for i in range(len(shape))]
    x = torch.arange(channels).reshape(view).expand(shape).contiguous()
    prev = src
    try:
        for node in chain:
            args = tuple(x if a is prev else a for a in node.args)
            if any(isinstance(a, fx.Node) for a in args) or any(isinstance(v, fx.Node) for v in node.kwargs.values()):
                return False
            x = node.target(*args, **node.kwargs)
            prev = node
    except Exception:  # noqa: BLE001 - a replay that does not run means "cannot prove it"
        return False
    if x.ndim < 2 or x.shape[1] != channels:
        return False
    want = torch.arange(channels).reshape([1, channels] + [1] * (x.ndim - 2)).expand(x.shape)
    return torch.equal(x, want)


def _concat_site(flow: DataFlow, site: FoldSite, cat: fx.Node, channels: int, bake: bool) -> FoldSite:
    tensors = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    ndim = len(cat.meta.get("shape", ()))
    if not isinstance(tensors, (list, tuple)) or dim not in (1, 1 - ndim):
        site.reason = f"its input is {describe(cat)} along a dim other than the channels"
        return site
    if len(users_of(cat)) != 1:
        site.reason = f"the output of {describe(cat)} also feeds another layer"
        return site
    start = 0
    for part in tensors:
        if not isinstance(part, fx.Node) or part.op != "call_module":
            site.reason = f"part of its input ({describe(part) if isinstance(part, fx.Node) else 'a constant'}) " \
                          "is not a conv or linear output"
            return site
        module = flow.modules[part.target].module
        width = getattr(module, "out_channels", getattr(module, "out_features", 0))
        why = _producer_problem(flow, part, cat, width, bake)
        if why:
            site.reason = f"concatenated input: {why}"
            return site
        site.targets.append((flow.canonical(part.target), slice(start, start + width)))
        start += width
    if start != channels:
        site.reason = f"the concatenated widths add up to {start}, not the BN's {channels} channels"
        site.targets = []
    else:
        site.through = [describe(cat)]
    return site


def next_layer_site(flow: DataFlow, bn_path: str, *, bake: bool = False, assume_eval: bool = False) -> FoldSite:
    """Decide whether the BN at ``bn_path`` folds into the one conv/linear reading its output.

    Exact only when that layer never sees padded zeros (a zero-padded normalized
    input is not a zero-padded raw input): no padding, or reflect/replicate/circular.
    """
    site = FoldSite(bn_path, into_next=True)

    def leave(reason: str) -> FoldSite:
        site.reason = reason
        return site

    why = _bn_problem(flow, bn_path, assume_eval)
    if why:
        return leave(why)
    mc = flow.modules[flow.canonical(bn_path)]
    bn = mc.module
    channels = int(bn.running_mean.shape[0])
    _, kept = activation_or_identity(bn)
    if kept:
        return leave(f"its activation ({kept[0].removeprefix('kept activation ')}) sits between it and the next layer")
    users = flow.output_users(bn_path)
    if len(users) != 1 or users[0].op != "call_module":
        return leave("its output does not go to exactly one layer" if len(users) != 1
                     else f"its output goes to {describe(users[0])}, not to a conv or linear layer")
    nxt = users[0]
    module = flow.modules[nxt.target].module
    name = f"{nxt.target} ({type(module).__name__})"
    if flow.call_count(nxt.target) != 1:
        return leave(f"{name} is called {flow.call_count(nxt.target)} times")
    if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        return leave(f"its output goes to {name}, not to a conv or linear layer")
    if flow.input_node(nxt.target) is not mc.nodes[0]:
        return leave(f"{name} reads more than the BN's output")
    why = target_problem(module, bake=bake) or _read_outside_problem(flow, module, name)
    if why:
        return leave(why)
    if is_pruned(module) or getattr(module, "transposed", False) or _pads_at_run_time(module):
        return leave(f"{name} cannot absorb a BN on its input (pruned, transposed or padding at run time)")
    if isinstance(module, nn.Linear):
        shape = flow.input_shape(bn_path) or ()
        if len(shape) != 2 or module.in_features != channels:
            return leave(f"{name} does not read the BN's {channels} channels as its features")
    else:
        if module.in_channels != channels:
            return leave(f"{name} has {module.in_channels} input channels, the BN {channels}")
        if module.padding_mode == "zeros" and any(p != 0 for p in module._reversed_padding_repeated_twice):
            return leave(f"{name} pads its input with zeros, where the folded shift would be missing")
    site.targets = [(flow.canonical(nxt.target), slice(0, channels))]
    return site


# ------------------------------------------------------------------ module plumbing


def write_folded(module: nn.Module, s: torch.Tensor, t: torch.Tensor, source: nn.Module | None = None) -> None:
    """Fold the per-output-channel affine (s, t) into ``module`` (a private copy) in place.

    ``source``: the layer to read the weight from when ``module``'s own is uninitialized
    (``LayerContext.editable(..., uninitialized=...)``); by default ``module`` itself.
    """
    if _is_cond_conv(module):
        write_folded_experts(module, s, t, source)
        return
    transposed = bool(getattr(module, "transposed", False))
    groups = int(getattr(module, "groups", 1))
    weight_name = _weight_name(module)
    weight = getattr(module, weight_name)
    w, b = fold_output_channels(getattr(source or module, weight_name), module.bias, s, t, transposed=transposed,
                                groups=groups, out=weight)
    _store(module, weight, w, b)
    if is_pruned(module):
        with torch.no_grad():
            module.weight = module.weight_orig * module.weight_mask


def _pads_at_run_time(module: nn.Module) -> bool:
    """timm's Conv2dSame (and subclasses) pad by the input's size in forward, so their padding is not known."""
    from timm.layers.conv2d_same import Conv2dSame

    return isinstance(module, Conv2dSame)


def _weight_name(module: nn.Module) -> str:
    """The parameter holding the weight as trained: a pruned layer's ``weight`` is recomputed from it."""
    return "weight_orig" if is_pruned(module) else "weight"


def write_folded_experts(module: nn.Module, s: torch.Tensor, t: torch.Tensor,
                         source: nn.Module | None = None) -> None:
    """Fold (s, t) into a CondConv2d (a private copy) in place: s into every expert, t into a shift.

    The module becomes a ShiftedCondConv2d (still a CondConv2d), whose constant shift
    is added inside the same convolution.
    """
    from ..layers import ShiftedCondConv2d

    w, b = fold_expert_output_channels((source or module).weight, module.bias, s,
                                       out_channels=module.out_channels, out=module.weight)
    with torch.no_grad():
        if w is not module.weight:
            module.weight.copy_(w)
        if b is not None:
            module.bias.copy_(b.to(module.bias.dtype))
        if not isinstance(module, ShiftedCondConv2d):
            ShiftedCondConv2d.adopt(module)
        module.shift.copy_((module.shift.double() * s + t).to(module.shift.dtype))


def write_folded_into_input(module: nn.Module, s: torch.Tensor, t: torch.Tensor) -> None:
    """Fold the per-input-channel affine (s, t) into ``module`` (a private copy) in place."""
    w, b = fold_input_channels(module.weight, module.bias, s, t, groups=int(getattr(module, "groups", 1)))
    _store(module, module.weight, w, b)


def _store(module: nn.Module, weight: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> None:
    """Write the results into ``weight`` (unless already there) and the module's bias (created if it had
    none), in their dtypes."""
    with torch.no_grad():
        if w is not weight:
            weight.copy_(w)  # cast to the weight's dtype inside the copy, rounding once
        if module.bias is None:
            module.bias = nn.Parameter(b.to(device=weight.device, dtype=weight.dtype),
                                       requires_grad=weight.requires_grad)
        else:
            module.bias.copy_(b.to(module.bias.dtype))


@register(
    "fold",
    keeps_function=True,
    families=("batchnorm", "frozen_batchnorm"),
    needs_analysis=True,
    doc="Fold an eval-mode BatchNorm into the conv/linear producing its input; the BN becomes Identity "
        "(or the activation it carried).",
    options=(
        Option("bake_parametrizations", bool, False,
               "bake parametrized weights (weight/spectral norm) into plain tensors so BN can fold into them"),
        Option("unfoldable", str, "keep", "what to do with a BN that cannot fold: keep it, or make it a "
               "per-channel affine", choices=("keep", "affine")),
        Option("into_next", bool, False,
               "fold a BN that cannot fold into its producer into the conv/linear reading its output, when "
               "that layer sees no zero padding (exact only then)"),
    ),
)
def fold(ctx: LayerContext) -> Built:
    bn = ctx.module
    opts = ctx.options
    site = fold_site(ctx.flow, ctx.path, bake=opts["bake_parametrizations"])
    if not site.foldable and opts["into_next"]:
        forward = next_layer_site(ctx.flow, ctx.path, bake=opts["bake_parametrizations"])
        if forward.foldable:
            site = forward
        else:
            site.reason = f"{site.reason}; nor into the next layer: {forward.reason}"
    if not site.foldable:
        frozen = family_of(bn) == "frozen_batchnorm"
        if opts["unfoldable"] == "affine" and (frozen or not bn.training) and getattr(bn, "running_mean", None) is not None:
            from ..layers import ChannelAffine

            new = ChannelAffine.from_bn(bn)
            return Built(new, [f"not folded ({site.reason}); now a per-channel affine"])
        raise SkipLayer(site.reason)
    s, t = bn_affine(bn.running_mean, bn.running_var, bn.weight, bn.bias, float(bn.eps))
    note = f"{ctx.path} folded in" + (" (on its input)" if site.into_next else "")
    edits = [_fold_edit(path, ctx.layer(path), s[channels], t[channels], site.into_next, note)
             for path, channels in site.targets]
    new, notes = activation_or_identity(bn)
    via = f" through {', '.join(site.through)}" if site.through else ""
    where = "the next layer, " if site.into_next else ""
    return Built(new, [f"folded into {where}{', '.join(e.path for e in edits)}{via}"] + notes, edits=edits,
                 fold_links=site.links(s, t, ctx.layer))


def _fold_edit(path: str, live: nn.Module, s: torch.Tensor, t: torch.Tensor, into_next: bool,
               note: str) -> NeighbourEdit:
    """Writing (s, t) into the layer at ``path``, as an edit the engine makes on a copy or (low_memory) in place.

    A layer whose weight is recomputed in forward (parametrized, torch's legacy hooks) is baked on a private
    copy first, so it is never edited in place; a plain one needs no copy of its weight (it is written whole).
    """
    recomputed = parametrize.is_parametrized(live) or bool(legacy_hooks(live))
    overwrites = () if recomputed or into_next else (_weight_name(live),)

    def write(target: nn.Module, source: nn.Module) -> list[str]:
        notes = bake_in_place(target)
        if into_next:
            write_folded_into_input(target, s, t)
        else:
            write_folded(target, s, t, source=source if overwrites and source is not target else None)
        return notes

    return NeighbourEdit(path, write, note, overwrites=overwrites, in_place=not recomputed)
