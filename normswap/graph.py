"""Data-flow analysis of a model by recording one real forward pass into an FX graph.

Why record instead of ``torch.fx.symbolic_trace``: symbolic tracing fails whole
on models with data-dependent control flow (TF "same" padding, efficientvit),
and it traces timm's norm-act layers into functional calls. A real forward runs
on every model; forward hooks mark calls of leaf modules and a
TorchFunctionMode sees every tensor operation between them. The result is a
``torch.fx.Graph`` whose ``call_module`` nodes are leaf-module calls (one node
per call) and whose ``call_function`` nodes are the operations between them.
``node.users`` counts real users only: an argument read just for its shape or
dtype (``y.reshape_as(x)``, ``torch.zeros_like(x)``, ``x.shape``) is not an
edge. ``benchmarks/analysis_choice.py`` measures this against symbolic tracing.

The pass computes shapes, not values, for convolutions, linear layers and matrix
products (``shape_only``): they are most of a forward's time. It is redone with
real values when that could matter: the forward reads a value (a branch, a
boolean mask), writes to the model (a cache), or fails.
"""
from __future__ import annotations

import functools
import operator
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .calls import as_args, run
from .errors import InputSpecError
from .families import family_of
from .shape_only import STAND_INS, reads_values
from .state_guard import StateGuard

# Functions that read only metadata (shape, dtype, device) of every tensor argument.
_META_ATTRS = {
    "shape", "ndim", "dtype", "device", "layout", "requires_grad", "is_cuda", "is_sparse",
    "is_quantized", "is_meta", "names", "grad_fn", "is_leaf", "itemsize", "nbytes",
}
_META_METHODS = {
    "size", "dim", "ndimension", "numel", "nelement", "stride", "storage_offset", "is_contiguous",
    "is_floating_point", "is_complex", "element_size", "get_device", "__len__", "data_ptr",
    "is_tensor", "is_nonzero_shape",
}
_SCALARS = {int, float, bool, str, complex, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout}
# (name -> indexes of arguments read for metadata only)
_SHAPE_ONLY_ARGS = {
    "reshape_as": (1,), "view_as": (1,), "expand_as": (1,), "type_as": (1,),
    "zeros_like": (0,), "ones_like": (0,), "empty_like": (0,), "full_like": (0,),
    "rand_like": (0,), "randn_like": (0,), "randint_like": (0,),
    "new_zeros": (0,), "new_ones": (0,), "new_empty": (0,), "new_full": (0,), "new_tensor": (0,),
}


def _leaves(value: Any) -> list:
    """pytree.tree_leaves, without its per-leaf dispatch for the tuples, lists and dicts ops take."""
    kind = type(value)
    if kind is tuple or kind is list:
        out = []
        for v in value:
            if isinstance(v, torch.Tensor) or type(v) in _SCALARS:
                out.append(v)
            else:
                out.extend(_leaves(v))
        return out
    if kind is dict:
        return _leaves(tuple(value.values()))
    if kind in pytree.SUPPORTED_NODES or isinstance(value, tuple):  # namedtuples, structseqs
        return pytree.tree_leaves(value)
    return [value]


def _tensors(value: Any) -> list[torch.Tensor]:
    return [x for x in _leaves(value) if isinstance(x, torch.Tensor)]


def _map_tensors(fn, value: Any) -> Any:
    """pytree.tree_map over the tensors only, fast for plain tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    kind = type(value)
    if kind is tuple or kind is list:
        return kind(_map_tensors(fn, v) for v in value)
    if kind is dict:
        return {k: _map_tensors(fn, v) for k, v in value.items()}
    if kind in pytree.SUPPORTED_NODES or isinstance(value, tuple):
        return pytree.tree_map(lambda x: fn(x) if isinstance(x, torch.Tensor) else x, value)
    return value


def func_name(func: Any) -> str:
    """A readable name for a torch function, method or attribute getter."""
    if getattr(func, "__name__", None) == "__get__":
        owner = getattr(func, "__self__", None)
        return f"Tensor.{getattr(owner, '__name__', '?')}"
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    if "<locals>" in name and getattr(func, "__name__", None):  # a generated wrapper (F.max_pool2d's dispatch)
        name = func.__name__
    if getattr(func, "__module__", None) == "torch.nn.functional":
        return f"F.{name}"
    return (name.replace("_VariableFunctionsClass.", "torch.")
            .replace("TensorBase.", "Tensor.").replace("_TensorBase.", "Tensor."))


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def is_leaf_module(module: nn.Module) -> bool:
    """Leaf for recording: no children besides parametrizations, or a known norm(-act) layer."""
    if family_of(module) is not None or type(module).__module__.startswith("timm.layers.norm_act"):
        return True
    return all(name == "parametrizations" for name in module._modules)


@dataclass
class ModuleCalls:
    """Everything the recording learned about one module object."""

    path: str  # canonical path (first in named_modules order)
    aliases: list[str]
    module: nn.Module
    nodes: list[fx.Node] = field(default_factory=list)  # one per call

    @property
    def call_count(self) -> int:
        return len(self.nodes)


class DataFlow:
    """The recorded graph plus per-module facts: producers, users, call counts, aliases."""

    def __init__(self, graph: fx.Graph, modules: dict[str, ModuleCalls], read_outside: frozenset[int] = frozenset()):
        self.graph = graph
        self.modules = modules  # canonical path -> ModuleCalls (every leaf module, called or not)
        self.real_pass_because: str | None = None  # why the shape-only pass was redone with real values
        # ids of the model's parameters and buffers that the forward reads outside the leaf layers' own calls
        # (a weight the forward uses itself, a tied head): a rewrite of their layer changes those reads too
        self.read_outside = read_outside
        self.memo: dict = {}  # analyses that span layers (residual streams), made once per recorded pass

    def tensors_read_outside(self, module: nn.Module) -> list[str]:
        """Names of ``module``'s own parameters and buffers that the forward also reads outside its calls."""
        if not self.read_outside:
            return []
        return [name for table in (module._parameters, module._buffers) for name, t in table.items()
                if t is not None and id(t) in self.read_outside]

    # -- per-module facts ---------------------------------------------------
    def calls(self, path: str) -> list[fx.Node]:
        return self.modules[self.canonical(path)].nodes

    def canonical(self, path: str) -> str:
        if path in self.modules:
            return path
        for mc in self.modules.values():
            if path in mc.aliases:
                return mc.path
        raise KeyError(path)

    def call_count(self, path: str) -> int:
        return len(self.calls(path))

    def input_node(self, path: str, call: int = 0) -> fx.Node | None:
        """The node producing the first tensor input of ``path``'s ``call``-th call."""
        nodes = self.calls(path)
        if call >= len(nodes):
            return None
        tensors = [a for a in pytree.tree_leaves((nodes[call].args, nodes[call].kwargs)) if isinstance(a, fx.Node)]
        return tensors[0] if tensors else None

    def output_users(self, path: str, call: int = 0) -> list[fx.Node]:
        """Real users of the output of ``path``'s ``call``-th call."""
        nodes = self.calls(path)
        if call >= len(nodes):
            return []
        return users_of(nodes[call])

    def input_shape(self, path: str, call: int = 0) -> tuple[int, ...] | None:
        nodes = self.calls(path)
        if call >= len(nodes):
            return None
        return nodes[call].meta.get("input_shape")


def users_of(node: fx.Node) -> list[fx.Node]:
    """Real users of a node's value; a multi-output node's users are those of its getitem children."""
    out = []
    for user in node.users:
        if user.target is operator.getitem and user.meta.get("unpack"):
            out.extend(user.users)
        else:
            out.append(user)
    return out


def describe(node: fx.Node | None) -> str:
    """``conv1 (Conv2d)``, ``torch.cat``, ``input x``, ``output``."""
    if node is None:
        return "-"
    if node.op == "call_module":
        call = node.meta.get("call_index", 0)
        suffix = f" call {call + 1}" if call else ""
        return f"{node.target} ({node.meta.get('module_type', '?')}){suffix}"
    if node.op == "placeholder":
        return f"input {node.name}"
    if node.op == "output":
        return "model output"
    if node.op == "get_attr":
        return f"tensor {node.target}"
    if node.target is operator.getitem and node.meta.get("unpack"):
        return describe(node.args[0]) + f"[{node.args[1]}]"
    return node.meta.get("func_name", str(node.target))


def _tensor_names(named_modules: list[tuple[str, nn.Module]]) -> dict[int, str]:
    """id(parameter or buffer) -> its name, as ``named_parameters``/``named_buffers(remove_duplicate=False)``
    name them (a tied tensor: its last name), from one walk of the tree instead of two."""
    params, buffers = {}, {}
    for prefix, mod in named_modules:
        dot = prefix + "." if prefix else ""
        for table, out in ((mod._parameters, params), (mod._buffers, buffers)):
            for k, t in table.items():
                if t is not None:
                    out[id(t)] = dot + k
    params.update(buffers)
    return params


class _Recorder(TorchFunctionMode):
    def __init__(self, named_modules: list[tuple[str, nn.Module]], shapes_only: bool):
        super().__init__()
        self.stand_ins = STAND_INS if shapes_only else {}
        self.stood_in = False  # a stand-in has run: values from here on are placeholders
        self.graph = fx.Graph()
        self.producer: dict[int, fx.Node] = {}  # id(tensor) -> node holding its current value
        # id(tensor) -> a weak reference whose callback drops the tensor's entries when it dies (CPython runs it
        # at deallocation, before the id can be reused): intermediates are freed as in a plain forward
        self.alive: dict[int, weakref.ref] = {}
        self.constants = 0  # tensors read that are neither the model's nor made by a recorded op
        self.depth = 0
        self.pending: list[tuple[nn.Module, tuple, dict]] = []
        self.named_tensors = _tensor_names(named_modules)
        self.read_outside: set[int] = set()  # ids of named tensors read outside leaf-module calls
        self.paths: dict[int, ModuleCalls] = {}
        for name, mod in named_modules:
            mc = self.paths.get(id(mod))
            if mc is None:
                self.paths[id(mod)] = ModuleCalls(name, [name], mod)
            else:
                mc.aliases.append(name)

    # -- value bookkeeping ---------------------------------------------------
    def node_for(self, t: torch.Tensor) -> fx.Node:
        node = self.producer.get(id(t))
        if node is None:
            name = self.named_tensors.get(id(t))
            if name is not None:
                self.read_outside.add(id(t))
            else:
                name = f"_constant_{self.constants}"
                self.constants += 1
            node = self.graph.get_attr(name)
            node.meta["shape"] = tuple(t.shape)
            self.bind(t, node)
        return node

    def bind(self, t: torch.Tensor, node: fx.Node) -> None:
        key = id(t)
        self.producer[key] = node
        if key not in self.alive and key not in self.named_tensors:  # the model's own tensors outlive the pass
            self.alive[key] = weakref.ref(t, functools.partial(self._forget, key))

    def _forget(self, key: int, ref: weakref.ref) -> None:
        if self.alive.get(key) is ref:
            del self.alive[key]
            self.producer.pop(key, None)

    def to_args(self, value: Any, skip_idx: Iterable[int] = ()) -> Any:
        """Tensors -> nodes; tensors at shape-only positions -> their shape (not an edge)."""
        skip = set(skip_idx)

        def conv(i, v):
            if i in skip:
                return _map_tensors(lambda x: tuple(x.shape), v)
            return _map_tensors(self.node_for, v)

        if isinstance(value, tuple):
            return tuple(conv(i, v) for i, v in enumerate(value))
        return conv(-1, value)

    def add_node(self, op: str, target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
        """``graph.create_node``, less its scan of every argument for symbolic ints (eager values are never
        symbolic): about two thirds of a node's cost. The arguments are set after, which keeps the users'
        bookkeeping fx does on assignment."""
        node = self.graph.create_node(op, target)
        node.args = args
        if kwargs:
            node.kwargs = kwargs
        return node

    def bind_outputs(self, node: fx.Node, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            node.meta["shape"] = tuple(out.shape)
            self.bind(out, node)
            return
        leaves = _tensors(out)
        for i, t in enumerate(leaves):
            item = self.add_node("call_function", operator.getitem, (node, i))
            item.meta.update(unpack=True, shape=tuple(t.shape))
            self.bind(t, item)

    # -- torch function calls between leaf modules --------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = None
        if self.stand_ins:
            stand_in = self.stand_ins.get(func)
            if stand_in is not None:
                out = stand_in(*args, **kwargs)
                self.stood_in = self.stood_in or out is not None
            elif self.stood_in and reads_values(func, args):
                raise _ValuesRead(func_name(func))
        if out is None:
            out = func(*args, **kwargs)
        if self.depth == 0:
            self.record_function(func, args, kwargs, out)
        return out

    def record_function(self, func, args, kwargs, out) -> None:
        name = func_name(func)
        short = _short(name)
        if short in _META_METHODS or (name.startswith("Tensor.") and short in _META_ATTRS):
            return
        if not isinstance(out, torch.Tensor) and not _tensors((args, kwargs, out)):
            return
        node_args = self.to_args(tuple(args), _SHAPE_ONLY_ARGS.get(short, ()))
        node_kwargs = self.to_args(kwargs)
        node = self.add_node("call_function", func, node_args, node_kwargs)
        node.meta["func_name"] = name
        if out is None and short == "__setitem__" and isinstance(args[0], torch.Tensor):
            out = args[0]  # the indexed tensor now holds a new value
        self.bind_outputs(node, out)

    # -- leaf-module calls (forward hooks) -----------------------------------
    def pre_hook(self, module, args, kwargs):
        if self.depth == 0:
            self.pending.append((module, args, kwargs))
        self.depth += 1

    def post_hook(self, module, args, kwargs, out):
        self.depth -= 1
        if self.depth != 0:
            return
        mod, in_args, in_kwargs = self.pending.pop()
        mc = self.paths[id(mod)]
        node_args = self.to_args(tuple(in_args))
        node_kwargs = self.to_args(in_kwargs)
        node = self.add_node("call_module", mc.path, node_args, node_kwargs)
        first = next(iter(_tensors((in_args, in_kwargs))), None)
        node.meta.update(
            module_type=type(mod).__name__,
            call_index=len(mc.nodes),
            input_shape=tuple(first.shape) if first is not None else None,
        )
        mc.nodes.append(node)
        if out is not None:
            self.bind_outputs(node, out)


class _Redo(BaseException):
    """The shape-only pass cannot be trusted; redo it for real. A BaseException, so that a model's own
    ``except Exception`` cannot swallow it."""


class _StateChanged(_Redo):
    """The shape-only forward wrote to the model: its values are placeholders, so it must not."""


class _ValuesRead(_Redo):
    """The shape-only forward read a value (a branch, a value-dependent shape): placeholders could mislead it."""


def record(model: nn.Module, example_inputs: Any) -> DataFlow:
    """Run ``model`` once on ``example_inputs`` (eval mode, no grad) and return its data flow.

    Convolutions, linear layers and matrix products compute only their output's shape
    (``shape_only``). If that pass fails or writes to the model (a cache filled with
    placeholder values), the model's attributes are put back and the pass is redone for real.
    The model is left as it was: hooks are removed and train/eval flags restored.
    """
    args = as_args(example_inputs)
    named = list(model.named_modules(remove_duplicate=False))
    unique = list({id(m): m for _, m in named}.values())
    leaves = [m for m in unique if is_leaf_module(m)]
    guard = StateGuard(unique)
    training = [m.training for m in unique]
    try:
        if any(training):
            model.eval()
        try:
            return _record(model, named, leaves, args, shapes_only=True, guard=guard)
        except InputSpecError:
            raise
        except (Exception, _Redo) as e:  # noqa: BLE001 - the real pass below reports what the model itself says
            guard.restore()
            why = f"{type(e).__name__}: {e}"
        if any(m.training for m in unique):  # the failed pass switched a layer to train mode
            model.eval()
        try:
            flow = _record(model, named, leaves, args, shapes_only=False, guard=None)
            flow.real_pass_because = why
            return flow
        except InputSpecError:
            raise
        except Exception as e:  # the user's model refused the example input
            shapes = [tuple(a.shape) for a in pytree.tree_leaves(args) if isinstance(a, torch.Tensor)]
            raise InputSpecError(
                f"the model's forward pass failed on an example input of shape {shapes}: {type(e).__name__}: {e}",
                fix="give the input size the model expects (--input-size 1,3,H,W / input_size=...)",
            ) from None
    finally:
        for m, was in zip(unique, training):
            if m.training != was:
                m.training = was


def _record(model: nn.Module, named: list[tuple[str, nn.Module]], leaves: list[nn.Module], args: tuple, *,
            shapes_only: bool, guard: StateGuard | None) -> DataFlow:
    """One recorded forward, the model already in eval mode; hooks on ``leaves`` for its duration."""
    rec = _Recorder(named, shapes_only)
    handles = []
    try:
        for m in leaves:  # first of the pre-hooks: the layer's own (pruning, legacy weight norm) are part of its call
            handles.append(m.register_forward_pre_hook(rec.pre_hook, with_kwargs=True, prepend=True))
            handles.append(m.register_forward_hook(rec.post_hook, with_kwargs=True, always_call=True))
        for leaf in pytree.tree_leaves(args):
            if isinstance(leaf, torch.Tensor):
                node = rec.graph.placeholder(f"x{len(rec.producer)}")
                node.meta["shape"] = tuple(leaf.shape)
                rec.bind(leaf, node)
        with torch.no_grad(), rec:
            out = run(model, args)
        if guard is not None and guard.changed():
            raise _StateChanged()
        outputs = pytree.tree_map(lambda x: rec.node_for(x) if isinstance(x, torch.Tensor) else None, out)
        rec.graph.output(outputs)
    finally:
        for h in handles:
            h.remove()
        rec.alive.clear()  # the callbacks of tensors still alive (the output, the inputs) do nothing now
    modules = {rec.paths[id(m)].path: rec.paths[id(m)] for m in leaves}
    return DataFlow(rec.graph, modules, frozenset(rec.read_outside))
