"""Built-in replacements. Each factory reads the old layer, builds a fresh one and carries state."""
from __future__ import annotations

import copy

import torch.nn as nn

from .. import carry
from ..carry import activation_or_identity
from ..factory import Built, LayerContext, SkipLayer
from ..families import activation_of, channels_of
from ..match import glob_match
from ..registry import Option, register
from .grouping import choose_num_groups, valid_group_counts

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
def group_norm(ctx: LayerContext) -> Built:
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
    new = nn.GroupNorm(groups, channels, eps=eps, affine=affine, **carry.factory_kwargs(old))
    return _finish(ctx, carry.with_activation(old, new, notes, kind="groupnorm"), notes)


@register(
    "identity",
    families=(),
    carries=(),
    doc="Remove the layer: nn.Identity, or the activation a timm norm-act layer carried.",
)
def identity(ctx: LayerContext) -> Built:
    new, notes = activation_or_identity(ctx.module)
    notes = ["parameters and buffers dropped"] + notes + carry.finish(ctx.module, new)
    return Built(new, notes, {})


# ------------------------------------------------------------------ the activation-norm catalog


def _input_shape(ctx: LayerContext) -> tuple[int, ...]:
    """The layer's input shape in the recorded forward; skips a layer the forward never reached."""
    shape = ctx.input_shape()
    if shape is None:
        raise SkipLayer("not called in the example forward, so its input shape is unknown")
    return tuple(shape)


def _require_spatial(ctx: LayerContext, target: str) -> tuple[int, ...]:
    """Per-sample norms need several values per channel; (N, C) and 1x1 maps have one (at any of its calls)."""
    first = _input_shape(ctx)
    calls = ctx.input_shapes() or [first]
    for shape in calls:
        shape = tuple(shape)
        which = f" (call {calls.index(shape) + 1} of {len(calls)})" if len(calls) > 1 else ""
        if len(shape) < 3:
            raise SkipLayer(f"its input {shape}{which} has no spatial axis: {target} would normalize single "
                            "values to 0")
        spatial = 1
        for s in shape[2:]:
            spatial *= s
        if spatial == 1:
            raise SkipLayer(f"its input {shape}{which} is 1x1 per channel: {target} would normalize single "
                            "values to 0")
    return first


def _require_rank(ctx: LayerContext, ranks: tuple[int, ...], target: str) -> tuple[int, ...]:
    first = _input_shape(ctx)
    for shape in ctx.input_shapes() or [first]:
        if len(shape) not in ranks:
            want = " or ".join(f"{r}-d" for r in ranks)
            raise SkipLayer(f"{target} takes {want} input; this layer sees {tuple(shape)}")
    return first


def _finish(ctx: LayerContext, new: nn.Module, notes: list[str]) -> Built:
    """Carry what the rule's ``carry:`` asks into ``new`` (built fresh), match the train flag, report."""
    carried = carry.carry_state(ctx.module, new, ctx.carry)
    return Built(new, notes + carry.finish(ctx.module, new), carried)


def _eps(ctx: LayerContext) -> float:
    eps = ctx.options.get("eps")
    return float(eps) if eps is not None else float(getattr(ctx.module, "eps", 1e-5))


@register(
    "instance_norm",
    families=_BN_LIKE,
    carries=("affine", "running_stats"),
    default_carry=("affine",),
    needs_analysis=True,
    doc="InstanceNorm: each sample and channel normalized over its own spatial values (style transfer). "
        "γ/β carried; no running statistics unless asked.",
    options=(
        Option("affine", bool, True, "learnable per-channel γ/β (carried from the BN)"),
        Option("track_running_stats", bool, False, "keep running statistics for eval mode (carried when set)"),
        Option("eps", float, None, "epsilon; default: the old layer's", nullable=True, minimum=0.0),
    ),
)
def instance_norm(ctx: LayerContext) -> Built:
    old, opts = ctx.module, ctx.options
    shape = _require_spatial(ctx, "InstanceNorm")
    cls = {3: nn.InstanceNorm1d, 4: nn.InstanceNorm2d, 5: nn.InstanceNorm3d}.get(len(shape))
    if cls is None:
        raise SkipLayer(f"InstanceNorm takes 3-, 4- or 5-d input; this layer sees {shape}")
    channels = channels_of(old)
    affine = opts["affine"] and getattr(old, "weight", None) is not None
    momentum = getattr(old, "momentum", 0.1)
    new = cls(channels, eps=_eps(ctx), momentum=0.1 if momentum is None else momentum, affine=affine,
              track_running_stats=opts["track_running_stats"], **carry.factory_kwargs(old))
    notes: list[str] = []
    if opts["affine"] and not affine:
        notes.append("the old layer had no affine; the new one has none either")
    return _finish(ctx, carry.with_activation(old, new, notes), notes)


@register(
    "layer_norm",
    families=_BN_LIKE,
    carries=("affine",),
    needs_analysis=True,
    doc="LayerNorm: each sample normalized over C,H,W (GroupNorm with one group), or over channels only "
        "at each position (ConvNeXt's LayerNorm2d). γ/β carried.",
    options=(
        Option("over", str, "chw", "chw: all of C,H,W (GroupNorm(1, C)); c: channels only, per position",
               choices=("chw", "c")),
        Option("eps", float, None, "epsilon; default: the old layer's", nullable=True, minimum=0.0),
    ),
)
def layer_norm(ctx: LayerContext) -> Built:
    from timm.layers import LayerNorm2d

    old, opts = ctx.module, ctx.options
    shape = _input_shape(ctx)
    channels = channels_of(old)
    affine = getattr(old, "weight", None) is not None
    fk = carry.factory_kwargs(old)
    kind = None
    if len(shape) == 2:  # (N, C): over channels is all there is
        new = nn.LayerNorm(channels, eps=_eps(ctx), elementwise_affine=affine, **fk)
    elif opts["over"] == "chw":
        new, kind = nn.GroupNorm(1, channels, eps=_eps(ctx), affine=affine, **fk), "groupnorm1"
    elif len(shape) != 4:
        raise SkipLayer(f"channel-only LayerNorm2d takes 4-d input; this layer sees {shape}")
    else:
        new = LayerNorm2d(channels, eps=_eps(ctx), affine=affine).to(**fk)
    notes: list[str] = []
    return _finish(ctx, carry.with_activation(old, new, notes, kind=kind), notes)


@register(
    "frozen_batch_norm",
    keeps_function=True,
    families=("batchnorm",),
    carries=("affine", "running_stats"),
    needs_analysis=True,
    doc="FrozenBatchNorm2d: BN with its statistics and affine fixed as buffers (fine-tuning at small batch, "
        "DP-SGD keeping a pretrained function). Same eval-mode output.",
    options=(),
)
def frozen_batch_norm(ctx: LayerContext) -> Built:
    from timm.layers.norm_act import FrozenBatchNorm2d

    old = ctx.module
    _require_rank(ctx, (4,), "FrozenBatchNorm2d")
    if getattr(old, "running_mean", None) is None:
        raise SkipLayer("it has no running statistics to freeze (track_running_stats=False)")
    new = FrozenBatchNorm2d(channels_of(old), eps=float(old.eps)).to(**carry.factory_kwargs(old))
    notes: list[str] = []
    return _finish(ctx, carry.with_activation(old, new, notes), notes)


@register(
    "sync_batch_norm",
    keeps_function=True,
    families=("batchnorm",),
    carries=("affine", "running_stats"),
    doc="SyncBatchNorm: BN with batch statistics synchronized across processes (multi-GPU training). "
        "timm's BatchNormAct2d becomes SyncBatchNormAct with the same activation. Same eval-mode output.",
    options=(),
)
def sync_batch_norm(ctx: LayerContext) -> Built:
    old = ctx.module
    new = nn.SyncBatchNorm(channels_of(old), eps=float(old.eps), momentum=old.momentum,
                           affine=getattr(old, "weight", None) is not None,
                           track_running_stats=getattr(old, "running_mean", None) is not None)
    new.to(**carry.factory_kwargs(old))
    notes: list[str] = []
    return _finish(ctx, carry.with_activation(old, new, notes), notes)


@register(
    "evonorm",
    families=_BN_LIKE,
    carries=("affine",),
    needs_analysis=True,
    doc="timm's EvoNorm (Liu et al. 2020): a norm-activation layer. S0 is batch-free (groups, like GN), "
        "B0 uses batch variance. Replaces BN and the activation a norm-act layer carried.",
    options=(
        Option("variant", str, "s0", "s0 (batch-free, for small batches) or b0", choices=("s0", "b0")),
        Option("num_groups", int, 32, "groups for S0 (the nearest valid count is taken)", minimum=1),
        Option("min_group_size", int, 4, "fewest channels per S0 group", minimum=1),
    ),
)
def evonorm(ctx: LayerContext) -> Built:
    from timm.layers import EvoNorm2dB0, EvoNorm2dS0

    old, opts = ctx.module, ctx.options
    _require_rank(ctx, (4,), "EvoNorm2d")
    channels = channels_of(old)
    apply_act = activation_of(old) is not None and not isinstance(activation_of(old)[1], nn.Identity)
    fk = carry.factory_kwargs(old)
    notes: list[str] = []
    if opts["variant"] == "s0":
        groups = choose_num_groups(channels, opts["num_groups"], opts["min_group_size"])
        new = EvoNorm2dS0(channels, groups=groups, apply_act=apply_act, eps=float(old.eps), **fk)
        notes.append(f"{groups} groups of {channels // groups}")
    else:
        new = EvoNorm2dB0(channels, apply_act=apply_act, eps=float(old.eps), **fk)
    if apply_act:
        notes.append(f"EvoNorm's own nonlinearity replaces {type(activation_of(old)[1]).__name__}")
    return _finish(ctx, new, notes)


@register(
    "filter_response_norm",
    families=_BN_LIKE,
    carries=("affine",),
    needs_analysis=True,
    doc="timm's Filter Response Normalization (Singh & Krishnan 2020): batch-free, divides by the mean "
        "square over H,W; a norm-act layer's ReLU becomes FRN's TLU, other activations are kept.",
    options=(
        Option("eps", float, 1e-6, "epsilon", minimum=0.0),
    ),
)
def filter_response_norm(ctx: LayerContext) -> Built:
    from timm.layers import FilterResponseNormAct2d, FilterResponseNormTlu2d

    old, opts = ctx.module, ctx.options
    _require_spatial(ctx, "FilterResponseNorm")
    _require_rank(ctx, (4,), "FilterResponseNorm2d")
    channels = channels_of(old)
    act = activation_of(old)
    act_mod = None if act is None or isinstance(act[1], nn.Identity) else act[1]
    fk = carry.factory_kwargs(old)
    notes: list[str] = []
    if act_mod is None:
        new = FilterResponseNormTlu2d(channels, apply_act=False, eps=opts["eps"], **fk)
    elif isinstance(act_mod, nn.ReLU):
        new = FilterResponseNormTlu2d(channels, apply_act=True, eps=opts["eps"], **fk)
        notes.append("ReLU became FRN's thresholded linear unit (TLU)")
    else:
        new = FilterResponseNormAct2d(channels, apply_act=True, eps=opts["eps"], **fk)
        new.act = copy.deepcopy(act_mod)
        notes.append(f"kept act {type(act_mod).__name__}")
    return _finish(ctx, new, notes)


@register(
    "weight_standardized_conv",
    families=("conv",),
    carries=(),  # a rewrite of the layer's own weights, which always come along: no `carry:` to choose
    doc="Conv2d -> timm's StdConv2d (weight standardization, Qiao et al. 2019), the partner of GroupNorm "
        "at small batch. Weights carried; the function changes (the weight is standardized in forward).",
    options=(
        Option("eps", float, 1e-6, "epsilon of the weight standardization", minimum=0.0),
    ),
)
def weight_standardized_conv(ctx: LayerContext) -> Built:
    from timm.layers import StdConv2d, StdConv2dSame
    from timm.layers.conv2d_same import Conv2dSame

    old = ctx.module
    if type(old) not in (nn.Conv2d, Conv2dSame):
        raise SkipLayer(f"weight standardization is provided for Conv2d, not {type(old).__name__}")
    if old.weight[0].numel() == 1:
        raise SkipLayer("each output channel has a single weight, which standardization would zero")
    if old.padding_mode != "zeros":
        raise SkipLayer(f"StdConv2d pads with zeros; this conv pads with {old.padding_mode}")
    cls = StdConv2dSame if isinstance(old, Conv2dSame) else StdConv2d
    padding = old.padding if isinstance(old.padding, str) else tuple(old.padding)
    kwargs = {} if cls is StdConv2dSame else {"padding": padding}
    new = cls(old.in_channels, old.out_channels, old.kernel_size, stride=old.stride, dilation=old.dilation,
              groups=old.groups, bias=old.bias is not None, eps=ctx.options["eps"], **kwargs)
    new.to(**carry.factory_kwargs(old))
    carried = carry.carry_tensors(old, new, {"weight": "weight", "bias": "bias"}, "weights")
    return Built(new, carry.finish(old, new), carried)


def _needs_running_stats(old: nn.Module, target: str) -> None:
    if getattr(old, "running_mean", None) is None:
        raise SkipLayer(f"{target} needs running statistics, and this layer has none (track_running_stats=False)")


@register(
    "batch_renorm",
    keeps_function=True,
    families=("batchnorm",),
    carries=("affine", "running_stats"),
    needs_analysis=True,
    doc="Batch Renormalization (Ioffe 2017): BN whose training output is corrected towards the running "
        "statistics by r, d (clipped to rmax, dmax; no gradient), for small or non-i.i.d. batches. "
        "Same eval-mode output.",
    options=(
        Option("rmax", float, 3.0, "largest scale correction r (1 = plain BN)", minimum=1.0),
        Option("dmax", float, 5.0, "largest shift correction d (0 = plain BN)", minimum=0.0),
    ),
)
def batch_renorm(ctx: LayerContext) -> Built:
    from ..layers.renorm import _BatchRenorm

    old = ctx.module
    _needs_running_stats(old, "Batch Renorm")
    shape = _input_shape(ctx)
    dim = {2: 1, 3: 1, 4: 2, 5: 3}.get(len(shape))
    if dim is None:
        raise SkipLayer(f"Batch Renorm takes 2- to 5-d input; this layer sees {shape}")
    new = _BatchRenorm.like(old, rmax=ctx.options["rmax"], dmax=ctx.options["dmax"], dim=dim)
    notes: list[str] = []
    if getattr(old, "momentum", 0.1) is None:
        notes.append("the BN used a cumulative average (momentum=None); Batch Renorm uses momentum 0.1")
    return _finish(ctx, carry.with_activation(old, new, notes), notes)


@register(
    "ibn",
    families=("batchnorm",),
    carries=("affine", "running_stats"),
    needs_analysis=True,
    doc="IBN-Net (Pan et al. 2018): the first `ratio` of the channels InstanceNorm, the rest BatchNorm, "
        "for appearance invariance across domains. γ/β split between the halves, statistics carried.",
    options=(
        Option("ratio", float, 0.5, "fraction of channels given to InstanceNorm", minimum=0.0),
    ),
)
def ibn(ctx: LayerContext) -> Built:
    from ..layers.ibn import IBN

    old, ratio = ctx.module, ctx.options["ratio"]
    _needs_running_stats(old, "IBN")
    _require_rank(ctx, (4,), "IBN")
    _require_spatial(ctx, "IBN's InstanceNorm half")
    channels = channels_of(old)
    k = int(channels * ratio)
    if not 0 < k < channels:
        ctx.fail(f"ratio {ratio} leaves {k} of {channels} channels for InstanceNorm; both halves must be non-empty",
                 fix="choose a ratio strictly between 1/C and 1 (IBN-Net uses 0.5)")
    new = IBN.like(old, ratio=ratio)
    affine, stats = "affine" in ctx.carry, "running_stats" in ctx.carry
    bn_part = " and ".join(["γ/β"] * affine + ["statistics"] * stats)
    notes = [(f"channels [:{k}] InstanceNorm ({'γ/β carried' if affine else 'fresh'}), "
              f"[{k}:] BatchNorm ({bn_part + ' carried' if bn_part else 'fresh'})")]
    return _finish(ctx, carry.with_activation(old, new, notes), notes)


def _conditional(ctx: LayerContext, cls_name: str, what: str) -> Built:
    from ..layers import conditional

    cls = getattr(conditional, cls_name)
    old, n = ctx.module, ctx.options["num_conditions"]
    _require_rank(ctx, (4,), cls_name)
    if cls_name == "ConditionalInstanceNorm2d":
        _require_spatial(ctx, "conditional InstanceNorm")
    else:
        _needs_running_stats(old, cls_name)
    new = cls.like(old, n)
    start = "the BN's γ/β" if "affine" in ctx.carry else "γ = 1, β = 0"
    notes = [(f"{n} {what}: every row of the γ/β tables starts as {start}; set the condition with "
              "normswap.layers.conditioned(model, y)")]
    return _finish(ctx, carry.with_activation(old, new, notes), notes)


@register(
    "conditional_instance_norm",
    families=_BN_LIKE,
    carries=("affine",),
    needs_analysis=True,
    doc="Conditional InstanceNorm (Dumoulin et al. 2017): one γ/β per style, for multi-style transfer "
        "networks. Each style's γ/β starts as the BN's.",
    options=(Option("num_conditions", int, None, "number of styles", minimum=1),),
)
def conditional_instance_norm(ctx: LayerContext) -> Built:
    return _conditional(ctx, "ConditionalInstanceNorm2d", "styles")


@register(
    "conditional_batch_norm",
    keeps_function=True,
    families=("batchnorm",),
    carries=("affine", "running_stats"),
    needs_analysis=True,
    doc="Class-conditional BatchNorm (SNGAN, BigGAN generators): shared statistics, one γ/β per class. "
        "Each class's γ/β starts as the BN's; statistics carried.",
    options=(Option("num_conditions", int, None, "number of classes", minimum=1),),
)
def conditional_batch_norm(ctx: LayerContext) -> Built:
    return _conditional(ctx, "ConditionalBatchNorm2d", "classes")
