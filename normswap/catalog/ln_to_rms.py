"""LayerNorm -> RMSNorm, function-preserving, by centring the residual stream (SliceGPT's step).

A LayerNorm subtracts the mean of its input; an RMSNorm does not. If every
tensor written into a residual stream has zero mean over the channels, the
stream has zero mean, and every LayerNorm reading it computes what an RMSNorm
with the same eps computes. So each writer's output is centred: a linear or conv
layer writing into the stream gets W - mean over output channels (and its bias
likewise), an embedding has each row centred. A per-channel scale between a
writer and the stream (timm's LayerScale) is folded into the writer first, since
centring does not survive a scale. Centring is exact only if everything reading
the stream ignores its mean: LayerNorms, and adds continuing the stream. The
LayerNorm's β cannot stay on an RMSNorm: it goes to the layers reading its output
(``norm_affine.affine_site``), and a LayerNorm whose β has nowhere to go stays a
LayerNorm (still exact on the centred stream).
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from ..factory import Built, LayerContext, NeighbourEdit, ParameterEdit, SkipLayer
from ..families import built_class, family_of
from ..fold_math import centre_output_channels
from ..graph import DataFlow, _short, describe
from ..registry import Option, register
from .folding import fold_base
from .norm_affine import PASS_MODULES, absorb_edit, affine_site, beta_placement, channel_index, norm_axis, tied_to

_LAYOUT = {"view", "reshape", "flatten", "transpose", "permute", "contiguous", "to", "type_as", "float", "clone",
           "expand"}
_ADDS = {"add", "__add__", "__radd__", "add_", "__iadd__"}


@dataclass
class Writer:
    path: str
    kind: str  # "linear" | "conv1d_t" | "conv" | "embedding"
    scale: str | None = None  # path of a LayerScale between the writer and the stream, folded into the writer
    tied: list[str] = field(default_factory=list)  # other layers' parameters that are this writer's weight


@dataclass
class Stream:
    """One residual stream: the LayerNorms reading it (in execution order) and the layers writing into it."""

    readers: list[str] = field(default_factory=list)
    writers: list[Writer] = field(default_factory=list)
    reason: str | None = None


def _name(node: fx.Node) -> str:
    return _short(node.meta.get("func_name", getattr(node.target, "__name__", "")))


def _is_add(node: fx.Node) -> bool:
    return node.op == "call_function" and _name(node) in _ADDS and len(node.all_input_nodes) == 2


def _passes(flow: DataFlow, node: fx.Node) -> bool:
    """A node that hands its one input on with the same values per token (eval-mode dropout, identity, a cast,
    a reshape that keeps the channels as the last dim, as OPT's decoder layers do)."""
    if node.op == "call_module":
        return isinstance(flow.modules[flow.canonical(node.target)].module, PASS_MODULES)
    if node.op != "call_function" or len(node.all_input_nodes) != 1:
        return False
    name = _name(node)
    if name in ("to", "type_as", "contiguous", "clone", "dropout"):
        return True
    shape, source = node.meta.get("shape"), node.all_input_nodes[0].meta.get("shape")
    return name in ("view", "reshape", "flatten") and bool(shape) and bool(source) and shape[-1] == source[-1]


def residual_stream(flow: DataFlow, ln_path: str) -> Stream:
    """The stream the LayerNorm at ``ln_path`` reads (memoized per recorded pass, shared by its readers)."""
    start = flow.input_node(ln_path)
    for stream_values, stream in flow.memo.get("residual_streams", []):
        if start in stream_values:
            return stream
    values, stream = _trace(flow, start)
    flow.memo.setdefault("residual_streams", []).append((values, stream))
    return stream


def _trace(flow: DataFlow, start: fx.Node) -> tuple[set[fx.Node], Stream]:
    """Every value of the stream (forward through adds and pass-throughs, backward through both operands of the
    adds that built it), its LayerNorm readers, and the writes into it."""
    stream, values, todo, writes = Stream(), set(), [start], []
    while todo:
        v = todo.pop()
        if v in values:
            continue
        values.add(v)
        if _is_add(v) or _passes(flow, v):
            for operand in v.all_input_nodes:
                (todo if _is_stream(flow, operand, v) else writes).append(operand)
        else:  # a stream value some layer produced: a write into it
            writes.append(v)
        for user in v.users:
            if _is_add(user) or _passes(flow, user):
                todo.append(user)
            elif user.op == "call_module" and family_of(flow.modules[flow.canonical(user.target)].module) \
                    == "layernorm":
                stream.readers.append(flow.canonical(user.target))
            else:
                stream.reason = f"the stream is also read by {describe(user)}, which sees its mean"
    order = {n: i for i, n in enumerate(flow.graph.nodes)}
    stream.readers = sorted(set(stream.readers), key=lambda p: order[flow.calls(p)[0]])
    for w in writes:
        if stream.reason is None:
            stream.reason = _writer(flow, w, stream)
    return values, stream


def _is_stream(flow: DataFlow, operand: fx.Node, add: fx.Node) -> bool:
    """An operand of a stream add is the stream itself when something besides that add reads it (the LayerNorm
    of the next block) or when it is an add or pass-through itself; otherwise it is a write into the stream."""
    return len(operand.users) > 1 or _is_add(operand) or _passes(flow, operand)


def _writer(flow: DataFlow, node: fx.Node, stream: Stream) -> str | None:
    """Record the layer writing ``node`` into the stream, through layout ops, dropout and a LayerScale; or say
    why it cannot be centred."""
    write, scale, chain = node, None, []
    while (node.op == "call_function" and _name(node) in _LAYOUT | {"dropout"} and len(node.all_input_nodes) == 1
           or node.op == "call_module" and (_is_layer_scale(flow, node) or _passes(flow, node))):
        if node.op == "call_module" and _is_layer_scale(flow, node):
            if scale is not None:
                return f"the stream is written through two scales ({describe(node)})"
            scale = flow.canonical(node.target)
        elif node.op == "call_function":
            chain.append(node)
        node = node.all_input_nodes[0]
    if node.op == "call_function" and _name(node) == "cat" and not chain and scale is None:
        return _concatenated_writers(flow, node, stream)
    if _is_add(node) and not chain and scale is None:  # a sum of writes (patch tokens + position embedding)
        return next((why for part in node.all_input_nodes if (why := _writer(flow, part, stream))), None)
    if node.op == "get_attr":
        return _parameter_writer(node, chain, write, stream, scale)
    if node.op != "call_module":
        return f"the stream is written by {describe(node)}, which cannot be centred"
    path = flow.canonical(node.target)
    module = flow.modules[path].module
    kind = _writer_kind(module)
    why = None
    if flow.call_count(path) != 1:
        why = f"is called {flow.call_count(path)} times"
    elif kind is None:
        why = "is not a linear, conv or embedding layer"
    elif int(getattr(module, "groups", 1)) != 1:
        why = "is a grouped conv: each output channel sees only its group, so centring its weight is not centring " \
              "its output"
    elif kind == "embedding" and scale is not None:
        why = "is an embedding behind a scale"
    elif not _lands_on_channels(node, list(reversed(chain)), write, kind):
        why = "has output channels that are not the stream's channels"
    if why:
        return f"the stream is written by {path} ({type(module).__name__}), which {why}"
    stream.writers.append(Writer(path, kind, scale, tied_to(flow, module)))
    return None


def _concatenated_writers(flow: DataFlow, cat: fx.Node, stream: Stream) -> str | None:
    """Tokens joined along a dim other than the channels (a class token before the patch tokens): each part is
    a write of its own."""
    parts = cat.args[0] if cat.args else cat.kwargs.get("tensors", ())
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if dim in (-1, len(cat.meta.get("shape", ())) - 1):
        return f"the stream is written by {describe(cat)} along the channels, which cannot be centred"
    for part in parts:
        why = _writer(flow, part, stream) if isinstance(part, fx.Node) else "a constant part cannot be centred"
        if why:
            return why
    return None


def _parameter_writer(node: fx.Node, chain: list[fx.Node], write: fx.Node, stream: Stream,
                      scale: str | None) -> str | None:
    """A parameter read straight into the stream (a position embedding, a class token): centred over its last
    dim, which must be the stream's channels."""
    owner, _, name = str(node.target).rpartition(".")
    if scale is not None or not _lands_on_channels(node, list(reversed(chain)), write, "parameter"):
        return f"the stream is written by the parameter {node.target}, whose last dim is not the stream's channels"
    stream.writers.append(Writer(owner, f"parameter:{name}"))
    return None


def _writer_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Embedding):
        return "embedding"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "conv1d_t"
    base = fold_base(built_class(module))
    if base in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return "linear"
    if base in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        return "conv"
    return None


def _lands_on_channels(writer: fx.Node, chain: list[fx.Node], write: fx.Node, kind: str) -> bool:
    """Replay the layout ops between the writer and the stream on the writer's channel indices: the stream's
    last dim must hold them in order."""
    shape = writer.meta.get("shape")
    if not shape or not write.meta.get("shape"):
        return False
    index = channel_index(tuple(shape), 1 if kind == "conv" else len(shape) - 1)
    prev = writer
    try:
        for node in chain:
            index = node.target(*[index if a is prev else a for a in node.args], **node.kwargs)
            prev = node
    except Exception:  # noqa: BLE001 - a layout that cannot be replayed cannot be proven
        return False
    return tuple(index.shape) == tuple(write.meta["shape"]) and torch.equal(
        index, channel_index(tuple(index.shape), index.ndim - 1))


def _is_layer_scale(flow: DataFlow, node: fx.Node) -> bool:
    """timm's LayerScale (x * gamma over the last dim), called once."""
    module = flow.modules[flow.canonical(node.target)].module
    return type(module).__name__ == "LayerScale" and isinstance(getattr(module, "gamma", None), torch.Tensor) \
        and module.gamma.ndim == 1 and flow.call_count(node.target) == 1


# ------------------------------------------------------------------ module plumbing


def _centre_edit(writer: Writer, scale: torch.Tensor | None) -> NeighbourEdit:
    def write(target: nn.Module, source: nn.Module) -> list[str]:
        w_new, b_new = centre_output_channels(source.weight, getattr(source, "bias", None), writer.kind, scale)
        with torch.no_grad():
            target.weight.copy_(w_new)
            if b_new is not None:
                target.bias.copy_(b_new)
        return []

    note = "its output centred over the channels (the residual stream it writes must have zero mean)" + (
        f", with {writer.scale}'s scale folded in" if writer.scale else "") + (
        f"; its weight was tied to {', '.join(writer.tied)} and now has its own copy (untie: true)"
        if writer.tied else "")
    return NeighbourEdit(writer.path, write, note, overwrites=("weight",))


def _unit_scale_edit(path: str) -> NeighbourEdit:
    def write(target: nn.Module, source: nn.Module) -> list[str]:
        with torch.no_grad():
            target.gamma.fill_(1.0)
        return []

    return NeighbourEdit(path, write, "its scale folded into the layer before it (now 1)")


def _centred(value: torch.Tensor) -> torch.Tensor:
    value = value.double()
    return value - value.mean(dim=-1, keepdim=True)


def _stream_edits(ctx: LayerContext, stream: Stream) -> tuple[list[NeighbourEdit], list[ParameterEdit]]:
    edits, parameters = [], []
    for w in stream.writers:
        if w.kind.startswith("parameter:"):
            parameters.append(ParameterEdit(w.path, w.kind.partition(":")[2], _centred,
                                            "centred over the channels (it is written into the residual stream)"))
            continue
        scale = ctx.layer(w.scale).gamma.detach().double() if w.scale else None
        edits.append(_centre_edit(w, scale))
        if w.scale:
            edits.append(_unit_scale_edit(w.scale))
    return edits, parameters


@functools.cache
def _plain_layer_norms() -> tuple[type, ...]:
    """LayerNorm classes whose forward is F.layer_norm over the last dim, with their weight and bias."""
    from timm.layers import LayerNorm

    return nn.LayerNorm, LayerNorm


def _rms_norm(ln: nn.Module) -> nn.Module:
    """nn.RMSNorm with the LayerNorm's shape, eps, γ, device and dtype."""
    weight = getattr(ln, "weight", None)
    new = nn.RMSNorm(ln.normalized_shape, eps=ln.eps, elementwise_affine=weight is not None,
                     device=(weight.device if weight is not None else None),
                     dtype=(weight.dtype if weight is not None else None))
    if weight is not None:
        with torch.no_grad():
            new.weight.copy_(weight)
    return new


@register(
    "rms_norm_on_centred_stream",
    keeps_function=True,
    families=("layernorm",),
    needs_analysis=True,
    carries=(),
    doc="LayerNorm -> RMSNorm with the same eps and γ, exact: every write into the residual stream it reads is "
        "centred, and β goes into the layers reading its output.",
    options=(Option("add_bias", bool, False, "give a reader without a bias one, to take β (else the LayerNorm "
                                             "stays, exact on the centred stream)"),
             Option("untie", bool, False, "give a writer or reader whose weight is tied to another layer's (a tied "
                                          "embedding and lm_head) its own copy")),
)
def rms_norm_on_centred_stream(ctx: LayerContext) -> Built:
    ln = ctx.module
    if norm_axis(ln) != -1:
        raise SkipLayer(f"{type(ln).__name__} normalizes channels-first maps; only a LayerNorm over the last dim "
                        "becomes an RMSNorm")
    stream = residual_stream(ctx.flow, ctx.path)
    if stream.reason:
        raise SkipLayer(stream.reason)
    tied = next((w for w in stream.writers if w.tied), None)
    if tied is not None and not ctx.options["untie"]:
        raise SkipLayer(f"the stream is written by {tied.path}, whose weight is tied to {', '.join(tied.tied)}: "
                        "centring it would change that layer too; set untie: true to give it its own copy")
    if built_class(ln) not in _plain_layer_norms() or norm_axis(ln) != -1:
        raise SkipLayer(f"{type(ln).__name__}: only a plain LayerNorm over the last dim (torch's, timm's) becomes "
                        "an RMSNorm")
    owner = stream.readers[0] == ctx.path  # the first reader centres the stream, for every reader
    edits, parameters = _stream_edits(ctx, stream) if owner else ([], [])
    notes = [f"centred the stream it reads: {len(stream.writers)} writer(s), {len(stream.readers)} LayerNorm "
             "reader(s)"] if owner else []
    bias = getattr(ln, "bias", None)
    if bias is None:
        return Built(_rms_norm(ln), notes + ["now an RMSNorm"], edits=edits, parameter_edits=parameters)
    site = affine_site(ctx.flow, ctx.path, untie=ctx.options["untie"])
    beta = bias.detach().double()
    why = site.reason or beta_placement(site, ctx, beta)[1]
    if why:
        if not owner:
            raise SkipLayer(f"stays a LayerNorm (exact on the centred stream): {why}")
        return Built(copy.deepcopy(ln), notes + [f"stays a LayerNorm (exact on the centred stream): {why}"],
                     edits=edits, parameter_edits=parameters)
    gamma = torch.ones(ln.normalized_shape[-1], dtype=torch.float64, device=bias.device)
    edits += [absorb_edit(c, gamma, beta, f"{ctx.path}'s β folded in", site.tied.get(c.path, []))
              for c in site.consumers]
    return Built(_rms_norm(ln), notes + [f"now an RMSNorm; β folded into {', '.join(c.path for c in site.consumers)}"],
                 edits=edits, parameter_edits=parameters)



