"""Per-layer divergence: which layer, in execution order, is the first where two models part.

Both models run on the same input with forward hooks on the reference's leaf
layers (the units ``graph.record`` uses: leaf modules and norm-act layers), one
record per call, so a module called twice has two rows. Each row carries

- the *local* error: the candidate's layer run on the reference's recorded
  input, against the reference's output. Noise that flowed in from upstream
  cannot show up here, so the first row whose local error is beyond tolerance
  is the layer that is wrong;
- the *propagated* error: the candidate's own output at that point, against the
  reference's, which is what a plot along the network shows.

Rows are aligned by qualified name and by the fold's own map: when a BatchNorm
of the reference is parameter-free in the candidate (folded), ``folding.fold_site``
on the reference says where it went, and the conv it went into is compared with
the reference conv's output passed through that BN's affine.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from ..calls import run
from ..families import family_of
from ..fold_map import FoldLink
from ..fold_math import bn_affine
from ..graph import is_leaf_module
from .metrics import channel_affine, max_errors, scale_of

_BN_FAMILIES = ("batchnorm", "frozen_batchnorm")


@dataclass
class LayerRow:
    order: int
    path: str
    call: int
    reference: str
    candidate: str | None
    local_abs: float | None = None
    local_rel: float | None = None
    propagated_rel: float | None = None
    scale: float = 0.0
    compared: str | None = None  # how the row was aligned, when not by name alone
    note: str | None = None

    def to_json(self) -> dict:
        out = asdict(self)
        for k in ("local_abs", "local_rel", "propagated_rel"):
            if out[k] is not None and not math.isfinite(out[k]):
                out[k] = str(out[k])  # JSON has no inf
        return out


@dataclass
class Layerwise:
    rows: list[LayerRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    reference_output: Any = None
    candidate_output: Any = None

    def first_local(self, threshold: float, atol: float = 0.0) -> LayerRow | None:
        """The first row whose local error is beyond tolerance (or that could not run)."""
        for row in self.rows:
            if row.note and row.note.startswith("the candidate layer raised"):
                return row
            if row.local_abs is not None and row.local_abs > atol + threshold * row.scale:
                return row
        return None

    def first_propagated(self, threshold: float) -> LayerRow | None:
        return next((r for r in self.rows if r.propagated_rel is not None and r.propagated_rel > threshold), None)


def _units(model: nn.Module) -> dict[int, str]:
    """id(module) -> canonical path, for the leaf layers (not descending into a leaf)."""
    out: dict[int, str] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        if id(module) in out:
            return
        if is_leaf_module(module):
            out[id(module)] = prefix
            return
        for name, child in module._modules.items():
            if child is not None:
                walk(child, f"{prefix}.{name}" if prefix else name)

    walk(model, "")
    return out


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        return None


def _tensors(value: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(value) if isinstance(x, torch.Tensor)]


def _clone(value: Any) -> Any:
    return pytree.tree_map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, value)


def fold_links(reference: nn.Module, candidate: nn.Module, example_args: tuple) -> dict[str, FoldLink]:
    """Rows of a folded candidate that line up with the reference only through a folded BN's affine.

    Inferred, for two models from anywhere: a BN of the reference that is
    parameter-free in the candidate was folded where ``folding.fold_site`` says.
    """
    folded = []
    for path, module in reference.named_modules():
        if family_of(module) not in _BN_FAMILIES or getattr(module, "running_mean", None) is None:
            continue
        other = _submodule(candidate, path)
        if other is not None and family_of(other) is None and not any(True for _ in other.parameters()) \
                and not any(True for _ in other.buffers()):
            folded.append(path)
    if not folded:
        return {}
    from ..catalog.folding import fold_site, next_layer_site
    from ..graph import record

    flow = record(reference, example_args if len(example_args) != 1 else example_args[0])
    links: dict[str, FoldLink] = {}
    for path in folded:
        site = fold_site(flow, path, assume_eval=True, bake=True)
        if not site.foldable:
            site = next_layer_site(flow, path, assume_eval=True, bake=True)
        if site.foldable:
            bn = flow.modules[flow.canonical(path)].module
            s, t = bn_affine(bn.running_mean, bn.running_var, bn.weight, bn.bias, float(bn.eps))
            links.update(site.links(s, t, lambda p: flow.modules[p].module))
    return links


class _Run:
    """Hooks for one forward of a model: the outermost leaf call of each unit, in order."""

    def __init__(self, model: nn.Module, units: dict[int, str], on_call):
        self.depth = 0
        self.pending: list[tuple] = []
        self.on_call = on_call
        self.handles = []
        self.paused = False
        for module in {id(m): m for m in model.modules()}.values():
            if id(module) in units:
                path = units[id(module)]
                self.handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
                self.handles.append(module.register_forward_hook(
                    lambda m, a, k, o, path=path: self._post(path, m, a, k, o), with_kwargs=True, always_call=True))

    def _pre(self, module, args, kwargs):
        if self.paused:
            return
        if self.depth == 0:
            inplace = bool(getattr(module, "inplace", False))
            saved = _clone((args, kwargs)) if inplace else (args, kwargs)
            versions = [t._version for t in _tensors((args, kwargs))]
            self.pending.append((saved, versions, inplace))
        self.depth += 1

    def _post(self, path, module, args, kwargs, out):
        if self.paused:
            return
        self.depth -= 1
        if self.depth != 0:
            return
        (saved_args, saved_kwargs), versions, cloned = self.pending.pop()
        changed = not cloned and [t._version for t in _tensors((saved_args, saved_kwargs))] != versions
        self.on_call(path, module, saved_args, saved_kwargs, out, changed)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def compare_layers(reference: nn.Module, candidate: nn.Module, args: tuple,
                   fold_map: dict[str, FoldLink] | None = None) -> Layerwise:
    """Run both models on ``args`` and return one row per reference leaf call (see the module docstring).

    Both models must already be in the mode to compare (eval) and of the same dtype as ``args``.
    ``fold_map``: the rewrite's own map (``Plan.fold_map``); inferred from the models when not given.
    The two outputs are kept in ``reference_output`` / ``candidate_output``.
    """
    links = fold_map if fold_map is not None else fold_links(reference, candidate, args)
    return _Comparison(reference, candidate, links).run(args)


class _Comparison:
    """One per-layer comparison: the candidate's forward recorded first, then the reference's, row by row."""

    def __init__(self, reference: nn.Module, candidate: nn.Module, links: dict[str, FoldLink]):
        self.reference, self.candidate, self.links = reference, candidate, links
        self.result = Layerwise()
        self.units = _units(reference)
        self.paths = set(self.units.values())
        self.cand_modules = {p: _submodule(candidate, p) for p in self.paths}
        self.recorded: dict[tuple[str, int], list[torch.Tensor]] = {}  # (path, call) -> the candidate's outputs
        self.cand_calls: dict[str, int] = {}
        self.ref_calls: dict[str, int] = {}
        self.bn_inputs: dict[str, Any] = {}  # BN path -> its recorded input, for into_next links
        self.ref_run: _Run | None = None

    def run(self, args: tuple) -> Layerwise:
        cand_units = {id(m): p for p, m in self.cand_modules.items() if m is not None}
        recording = _Run(self.candidate, cand_units, self.on_candidate)
        try:
            self.result.candidate_output = run(self.candidate, args)
        finally:
            recording.remove()
        self.ref_run = _Run(self.reference, self.units, self.on_reference)
        try:
            self.result.reference_output = run(self.reference, args)
        finally:
            self.ref_run.remove()
        never = sorted(p for p in self.paths if p not in self.ref_calls)
        if never:
            self.result.notes.append(f"{len(never)} layer(s) never called in the forward pass")
        return self.result

    def on_candidate(self, path, module, a, k, out, changed) -> None:
        n = self.cand_calls.get(path, 0)
        self.cand_calls[path] = n + 1
        self.recorded[(path, n)] = [x.detach().clone() for x in _tensors(out)]

    def on_reference(self, path, module, a, k, out, changed) -> None:
        n = self.ref_calls.get(path, 0)
        self.ref_calls[path] = n + 1
        cand = self.cand_modules.get(path)
        link = self.links.get(path)
        row = LayerRow(len(self.result.rows), path, n, type(module).__name__,
                       type(cand).__name__ if cand is not None else None,
                       compared=link.describe() if link else None)
        self.result.rows.append(row)
        local_args, expected = self._aligned(link, path, a, [x.detach() for x in _tensors(out)])
        scales = [scale_of(y) if y.is_floating_point() else 0.0 for y in expected]
        row.scale = max(scales, default=0.0)
        cand_out = self.recorded.pop((path, n), None)
        if cand_out is not None and len(cand_out) == len(expected):
            row.propagated_rel = max((_rel(y, c, sc) for y, c, sc in zip(expected, cand_out, scales)), default=0.0)
        if cand is None:
            row.note = "not in the candidate"
        elif changed:
            row.note = "changed its input in place: local error not measured"
        else:
            self._local(row, cand, local_args, k, expected, scales)

    def _aligned(self, link: FoldLink | None, path: str, a: tuple, ref_out: list[torch.Tensor]):
        """(the candidate layer's inputs, the output it should give): through the fold's affine where linked."""
        if link is None:
            return a, ref_out
        if link.kind == "into":
            return a, [channel_affine(y, link.s, link.t, link.axis % y.ndim) for y in ref_out]
        if link.kind == "folded":
            return (channel_affine(a[0], link.s, link.t, 1), *a[1:]), ref_out
        if link.kind in ("normalized", "absorbs"):  # y = n·s + t  ->  n = (y - t) / s
            inv_s, inv_t = 1.0 / link.s, -link.t / link.s
            if link.kind == "normalized":
                return a, [channel_affine(y, inv_s, inv_t, link.axis % y.ndim) for y in ref_out]
            return (channel_affine(a[0], inv_s, inv_t, link.axis % a[0].ndim), *a[1:]), ref_out
        if link.kind == "before":
            self.bn_inputs[path] = _clone(a)
            return a, _tensors(a)[:1]
        return self.bn_inputs.get(link.bn, a), ref_out  # "next"

    def _local(self, row: LayerRow, cand: nn.Module, local_args: tuple, k: dict, expected: list, scales: list) -> None:
        """The candidate layer's own error, run on the reference's input."""
        self.ref_run.paused = True
        try:
            local = cand(*_clone(local_args), **_clone(k))
        except Exception as e:  # noqa: BLE001 - any failure of the candidate layer is the finding
            row.note = f"the candidate layer raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            row.local_abs = row.local_rel = math.inf
            return
        finally:
            self.ref_run.paused = False
        local_out = _tensors(local)
        if len(local_out) != len(expected) or any(x.shape != y.shape for x, y in zip(local_out, expected)):
            row.note = (f"output shapes differ: {[tuple(y.shape) for y in expected]} vs "
                        f"{[tuple(x.shape) for x in local_out]}")
            row.local_abs = row.local_rel = math.inf
            return
        errs = [max_errors(y, x, sc) for y, x, sc in zip(expected, local_out, scales) if y.is_floating_point()]
        row.local_abs = max((e[0] for e in errs), default=0.0)
        row.local_rel = max((e[1] for e in errs), default=0.0)
        if math.isinf(row.local_abs):
            row.note = "the candidate layer's output has NaN/Inf"


def _rel(ref: torch.Tensor, cand: torch.Tensor, scale: float) -> float:
    if ref.shape != cand.shape or not ref.is_floating_point():
        return math.inf if ref.shape != cand.shape else 0.0
    return max_errors(ref, cand, scale)[1]
