"""Folding a LayerNorm's or RMSNorm's affine (γ, β) into the layers that read its output.

A norm y = n(x)·γ + β read by a linear layer W gives W·y + b = (W·diag γ)·n(x) + (W·β + b):
γ scales the consumer's input columns and β becomes bias. That holds for every
consumer reached through operations that move elements without mixing channels
(reshape, permute, a token selected, roll, window partition, eval-mode dropout)
or average them over tokens (mean pooling: β survives an average, not a sum).
Zero padding on the way keeps γ exact but not β (a padded zero is not a padded
β), so β then stays on the norm, as β/γ. The norm is left, with the reason,
when any use of its output is something else: the residual stream, an
activation, a layer that cannot absorb it, a weight tied to another tensor.

``affine_site`` is the one analysis: ``inspect`` shows it and ``fold_affine`` acts on it.
"""
from __future__ import annotations

import copy
import functools
import operator
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..factory import Built, LayerContext, NeighbourEdit, SkipLayer
from ..families import activation_of, built_class, family_of
from ..fold_map import FoldLink
from ..fold_math import fold_input_channels, norm_affine
from ..graph import DataFlow, _short, describe
from ..norm_probe import NormForm, probe, why_unidentified
from ..registry import Option, register
from .folding import fold_base, target_problem

# Ops that only move elements (or keep them, as casts and eval-mode dropout do): γ and β both survive them.
_MOVES = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "contiguous", "transpose", "permute",
          "movedim", "swapaxes", "swapdims", "__getitem__", "getitem", "roll", "narrow", "select", "clone",
          "expand", "split", "chunk", "unbind", "dropout"}
_CASTS = {"to", "type", "float", "double", "half", "bfloat16", "type_as"}  # values kept: not replayed
_AVERAGES = {"mean"}  # β survives an average over tokens
PASS_MODULES = (nn.Dropout, nn.Identity)  # identities in eval mode


@functools.cache
def _replayed_modules() -> tuple[type, ...]:
    """Modules that move elements (flatten) or average them over positions (average pooling): followed by
    replaying them on the channel index, like the ops above (an average that takes in zero padding mixes
    channel indices with zeros, so the line-up check refuses it)."""
    from timm.layers.adaptive_avgmax_pool import FastAdaptiveAvgPool

    return (nn.Flatten, nn.Unflatten, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
            nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, FastAdaptiveAvgPool)


def _is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's Conv1D (GPT-2): a linear layer storing its weight transposed, (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


@dataclass
class Consumer:
    path: str
    layout: str  # "linear" (weight out x in), "conv1d_t" (Hugging Face Conv1D, in x out), "conv" (channels dim 1)
    beta_ok: bool  # False: zero padding on the way, or a zero-padding conv


@dataclass
class AffineSite:
    """Where one norm's affine can go: the consumers of its output, or why it cannot."""

    norm_path: str
    consumers: list[Consumer] = field(default_factory=list)
    reason: str | None = None
    tied: dict[str, list[str]] = field(default_factory=dict)  # consumer path -> the tensors its weight is tied to

    @property
    def foldable(self) -> bool:
        return self.reason is None


def norm_form(module: nn.Module) -> NormForm | None:
    """What ``module`` computes: from its class for the known ones, else from the probe."""
    cls = built_class(module)
    fam = family_of(module)
    if fam not in ("layernorm", "rmsnorm"):
        return None
    if cls.__module__.startswith(("torch.nn", "timm.")):
        return NormForm(fam, 0.0, getattr(module, "bias", None) is not None, float32_inside="Fp32" in cls.__name__)
    return probe(module)


def norm_axis(module: nn.Module) -> int | None:
    """The dim the norm normalizes: 1 for timm's channels-first 2d norms, -1 for the rest; None for a norm over
    several dims (``normalized_shape`` of length > 1), whose affine is not per channel."""
    if "2d" in built_class(module).__name__:  # LayerNorm2d, RmsNorm2dFp32, MetaFormer's LayerNorm2dNoBias
        return 1
    shape = getattr(module, "normalized_shape", None)
    if shape is not None and len(tuple(shape)) != 1:
        return None
    return -1


def channel_index(shape: tuple[int, ...], axis: int) -> torch.Tensor:
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return torch.arange(shape[axis], dtype=torch.float64).reshape(view).expand(shape).contiguous()


def affine_site(flow: DataFlow, path: str, *, untie: bool = False) -> AffineSite:
    """Follow every use of the norm's output to the layers that would absorb its affine, or say why not."""
    site = AffineSite(path)
    mc = flow.modules[flow.canonical(path)]
    norm = mc.module
    why = _norm_problem(flow, mc, norm)
    if why:
        site.reason = why
        return site
    node = mc.nodes[0]
    axis = norm_axis(norm) % len(node.meta["shape"])
    frontier = [(node, channel_index(tuple(node.meta["shape"]), axis), True)]
    while frontier and site.reason is None:
        value, index, beta_ok = frontier.pop()
        for user in sorted(value.users, key=lambda u: u.op != "call_function"):  # an add explains most
            step = _follow(flow, site, value, user, index, beta_ok, untie)
            if site.reason is not None:
                break
            if step is not None:
                frontier.append(step)
    if site.reason is None and not site.consumers:
        site.reason = "its output reaches no layer"
    return site


def _norm_problem(flow: DataFlow, mc, norm: nn.Module) -> str | None:
    if mc.call_count != 1:
        return "never called in the forward pass" if mc.call_count == 0 else \
            f"called {mc.call_count} times: one folded copy cannot serve every call"
    if norm_form(norm) is None:
        return why_unidentified(norm)
    if norm_axis(norm) is None:
        return "it normalizes over several dims: its affine is not per channel"
    pair = activation_of(norm)
    if pair is not None and not all(isinstance(m, nn.Identity) for m in pair):
        return f"its activation ({type(pair[1]).__name__}) sits between it and the layers reading it"
    if "shape" not in mc.nodes[0].meta:
        return "its output is not a single tensor"
    return None


def _follow(flow, site, value, user, index, beta_ok, untie):
    """One use of a value derived from the norm's output: a consumer (recorded), a pass-through op (returns the
    next (node, index, beta_ok) to follow), or anything else (the site's reason)."""
    if user.op == "call_module":
        module = flow.modules[user.target].module
        if isinstance(module, PASS_MODULES):  # identities in eval mode, where a folded model runs
            return user, index, beta_ok
        if isinstance(module, _replayed_modules()) and len(user.all_input_nodes) == 1:
            try:
                return user, module(index), beta_ok  # a flatten or an average over positions
            except Exception:  # noqa: BLE001 - a module that cannot be replayed cannot be proven
                pass
        site.reason = _consumer_problem(flow, site, value, user, module, index, beta_ok, untie)
        return None
    if user.op != "call_function":
        site.reason = f"its output is {'the model output' if user.op == 'output' else describe(user)}"
        return None
    name = _short(user.meta.get("func_name", getattr(user.target, "__name__", "")))
    if name in _CASTS:
        return user, index, beta_ok
    others = [a for a in user.all_input_nodes if a is not value]
    getitem = user.target is operator.getitem or name == "getitem"
    zero_pad = name == "pad"
    if name in ("add", "__add__", "add_", "__iadd__", "__radd__") and others:
        site.reason = f"its output is added to another branch ({describe(user)}: a residual stream), which " \
                      "cannot absorb its affine"
        return None
    if others or not (name in _MOVES or name in _AVERAGES or getitem or zero_pad):
        site.reason = f"its output reaches {describe(user)}, which is not a linear, channel-preserving op"
        return None
    try:
        out = user.target(*[index if a is value else a for a in user.args],
                          **{k: index if v is value else v for k, v in user.kwargs.items()})
    except Exception:  # noqa: BLE001 - an op that cannot be replayed cannot be proven
        site.reason = f"its channels cannot be followed through {describe(user)}"
        return None
    if zero_pad:
        pads = user.args[1] if len(user.args) > 1 else user.kwargs.get("pad", ())
        value_arg = user.args[3] if len(user.args) > 3 else user.kwargs.get("value", 0.0)
        if (user.args[2] if len(user.args) > 2 else user.kwargs.get("mode", "constant")) != "constant" or \
                (value_arg or 0.0) != 0.0:
            site.reason = f"its output reaches {describe(user)}, which pads with values other than zero"
            return None
        beta_ok = beta_ok and not any(pads)
        # padded positions hold zeros, not channels: marked NaN, so the line-up check at the reader skips them
        out = torch.nn.functional.pad(index, tuple(pads), value=float("nan"))
    return user, out, beta_ok


def _consumer_problem(flow, site, value, user, module, index, beta_ok, untie) -> str | None:
    path = flow.canonical(user.target)
    name = f"{path} ({type(module).__name__})"
    if flow.input_node(path) is not value:
        return f"its output reaches {name} as an argument other than its input"
    if flow.call_count(path) != 1:
        return f"its output reaches {name}, which is called {flow.call_count(path)} times"
    if _is_hf_conv1d(module):
        layout, axis, width = "conv1d_t", -1, module.weight.shape[0]
    else:
        base = fold_base(built_class(module))
        if base is nn.Linear or base is nn.modules.linear.NonDynamicallyQuantizableLinear:
            layout, axis, width = "linear", -1, module.in_features
        elif base in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
            layout, axis, width = "conv", 1, module.in_channels
            pads = module._reversed_padding_repeated_twice
            beta_ok = beta_ok and not (module.padding_mode == "zeros" and any(p != 0 for p in pads))
        else:
            return f"its output reaches {name}, which cannot absorb it (not a linear or conv layer)"
        why = target_problem(module, bake=False)
        if why:
            return f"its output reaches {why}"
    read = flow.tensors_read_outside(module)
    tied = tied_to(flow, module)
    if read and not tied:
        return f"the forward also reads {name}'s {', '.join(read)} outside it, and would read the folded values"
    if tied:
        if not untie:
            return (f"its output reaches {name}, whose weight is tied to {', '.join(tied)}; "
                    "set untie: true to give it its own copy")
        site.tied[path] = tied
    if index.ndim == 0 or index.shape[axis] != width or not _lines_up(index, axis % index.ndim):
        return f"its channels do not line up with {name}'s input features"
    site.consumers.append(Consumer(path, layout, beta_ok))
    return None


def _lines_up(index: torch.Tensor, axis: int) -> bool:
    """Feature c holds channel c everywhere but at padded positions (NaN), and some position is not padding."""
    real = ~index.isnan()
    want = channel_index(tuple(index.shape), axis)
    return bool(real.any()) and torch.equal(index[real], want[real])


def tied_to(flow: DataFlow, module: nn.Module) -> list[str]:
    """``path.name`` of every other layer's parameter that is ``module``'s weight (a tied head / embedding)."""
    mine = id(module.weight)
    return [f"{p}.{n}" for p, mc in flow.modules.items() if mc.module is not module
            for n, t in mc.module._parameters.items() if t is not None and id(t) == mine]


# ------------------------------------------------------------------ module plumbing


def _without_affine(norm: nn.Module, form: NormForm, kept_bias: torch.Tensor | None) -> nn.Module:
    """A copy of the norm computing n(x) (+ ``kept_bias``): no weight where the class allows none, else the
    weight at its identity value (1, or 0 for a (1 + weight) class)."""
    new = copy.deepcopy(norm)
    own_class = built_class(norm).__module__.startswith(("torch.nn", "timm."))
    with torch.no_grad():
        if own_class:
            new.weight = None
        else:
            new.weight.fill_(1.0 - form.offset)
        if getattr(new, "bias", None) is not None or kept_bias is not None:
            if kept_bias is None:
                if own_class:
                    new.bias = None
                else:
                    new.bias.zero_()
            elif getattr(new, "bias", None) is None:
                new.bias = nn.Parameter(kept_bias.to(dtype=norm.weight.dtype, device=norm.weight.device),
                                        requires_grad=norm.weight.requires_grad)
            else:
                new.bias.copy_(kept_bias)
    if own_class and new.weight is None and getattr(new, "bias", None) is None and hasattr(new, "elementwise_affine"):
        new.elementwise_affine = False
    return new


def absorb_edit(consumer: Consumer, gamma: torch.Tensor, beta: torch.Tensor | None, note: str,
            tied: list[str]) -> NeighbourEdit:
    """γ into the consumer's input columns, β (when given) into its bias, in float64, rounded once."""

    def write(target: nn.Module, source: nn.Module) -> list[str]:
        weight = source.weight.detach()
        w = weight.t() if consumer.layout == "conv1d_t" else weight
        groups = int(getattr(source, "groups", 1))
        t = beta if beta is not None else torch.zeros_like(gamma)
        w_new, b_new = fold_input_channels(w, source.bias, gamma, t, groups=groups)
        with torch.no_grad():
            if target.weight is weight and tied:  # never write into a tensor another layer reads
                target.weight = nn.Parameter(torch.empty_like(weight), requires_grad=weight.requires_grad)
            target.weight.copy_(w_new.t() if consumer.layout == "conv1d_t" else w_new)
            if beta is not None:
                if target.bias is None:
                    target.bias = nn.Parameter(b_new.to(device=weight.device, dtype=weight.dtype),
                                               requires_grad=weight.requires_grad)
                else:
                    target.bias.copy_(b_new)
        return [f"its weight was tied to {', '.join(tied)}; it now has its own copy (untie: true)"] if tied else []

    return NeighbourEdit(consumer.path, write, note, overwrites=("weight",), in_place=not tied)


def beta_placement(site: AffineSite, ctx: LayerContext, beta: torch.Tensor | None) -> tuple[str, str | None]:
    """("consumers" | "norm" | "none", why β cannot go to the readers): where a norm's β can go."""
    if beta is None:
        return "none", None
    if not all(c.beta_ok for c in site.consumers):
        bad = next(c.path for c in site.consumers if not c.beta_ok)
        return "norm", f"{bad} sees zero padding, where a folded β would be missing"
    lacking = [c.path for c in site.consumers if ctx.layer(c.path).bias is None]
    if lacking and not ctx.options["add_bias"]:
        return "norm", f"{', '.join(lacking[:3])} has no bias; add_bias: true creates one"
    return "consumers", None


def _nothing_to_untie(ctx: LayerContext) -> str | None:
    """The plan's note when ``untie: true`` finds no layer sharing its weight with another."""
    if not ctx.options.get("untie"):
        return None
    seen: set[int] = set()
    for mc in ctx.flow.modules.values():
        for t in mc.module._parameters.values():
            if t is not None and id(t) in seen:
                return None
            if t is not None:
                seen.add(id(t))
    return "untie: true, but no layer of this model shares its weight with another: nothing was untied"


@register(
    "fold_affine",
    keeps_function=True,
    families=("layernorm", "rmsnorm"),
    needs_analysis=True,
    carries=(),
    note=_nothing_to_untie,
    doc="Fold a LayerNorm/RMSNorm's γ (and β) into the linear/conv layers reading its output; the norm keeps no "
        "affine.",
    options=(
        Option("add_bias", bool, False, "give a consumer without a bias one, to take β (Hugging Face's "
               "save_pretrained/from_pretrained drops a bias its config says is not there)"),
        Option("untie", bool, False, "give a consumer whose weight is tied to another tensor (a tied lm_head) its "
               "own copy, so it can absorb γ"),
    ),
)
def fold_affine(ctx: LayerContext) -> Built:
    norm = ctx.module
    form = norm_form(norm)
    site = affine_site(ctx.flow, ctx.path, untie=ctx.options["untie"])
    if not site.foldable:
        raise SkipLayer(site.reason)
    if getattr(norm, "weight", None) is None and getattr(norm, "bias", None) is None:
        raise SkipLayer("it has no affine to fold", quiet=True)
    gamma, beta = norm_affine(norm.weight, getattr(norm, "bias", None) if form.has_bias else None, form.offset,
                              int(norm.weight.numel() if norm.weight is not None else norm.bias.numel()))
    placement, why_kept = beta_placement(site, ctx, beta)
    kept = None
    if placement == "norm":
        if bool((gamma.abs() <= gamma.abs().max() * 1e-6).any()):
            raise SkipLayer("β would stay on the norm as β/γ, but γ has (near-)zero entries")
        kept = beta / gamma
    folded_beta = beta if placement == "consumers" else None
    note = f"{ctx.path}'s γ" + (" and β" if folded_beta is not None else "") + " folded in"
    edits = [absorb_edit(c, gamma, folded_beta, note, site.tied.get(c.path, [])) for c in site.consumers]
    notes = [f"affine folded into {', '.join(c.path for c in site.consumers)}"] + (
        [f"β stays on the norm (as β/γ): {why_kept}"] if why_kept else [])
    if any(folded_beta is not None and ctx.layer(c.path).bias is None for c in site.consumers):
        notes.append("bias added to a layer that had none (add_bias: true): a Hugging Face config that says the "
                     "layer has no bias loses it in save_pretrained/from_pretrained")
    t = folded_beta if folded_beta is not None else torch.zeros_like(gamma)
    links = {ctx.path: FoldLink("normalized", ctx.path, gamma, t, norm_axis(norm))}
    links.update({c.path: FoldLink("absorbs", ctx.path, gamma, t, -1 if c.layout != "conv" else 1)
                  for c in site.consumers})
    if bool((gamma == 0).any()):
        links = {}  # the per-layer view divides by γ
    rounding = {}
    if form.float32_inside and form.offset:  # its float32 product n·(1 + w) moves into the readers, in float64
        rounding = {p: torch.float32 for p in [ctx.path] + [c.path for c in site.consumers]}
    return Built(_without_affine(norm, form, kept), notes, edits=edits, fold_links=links, rounding=rounding)

