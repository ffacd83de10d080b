"""Equivalence checks between a reference model and a rewritten candidate.

``numeric``: same outputs within tolerance, leaf by leaf over nested outputs.
``interface``: for rewrites that change the function on purpose (BN -> GN): same
output structure, shapes and dtypes, finite outputs, and a backward pass that
reaches every trainable parameter.

Errors are relative to the reference's scale: ``max_rel = max|ref - cand| / max|ref|``
(an element-wise ratio explodes wherever the reference is near zero).
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from ..calls import as_args, run
from ..devices import to_device
from ..errors import InputSpecError, NormswapError
from ..fold_map import FoldLink
from ..inputs import infer_input_size, make_inputs, model_dtype_device
from .artifact import ExportedModule
from .layerwise import Layerwise, compare_layers
from .metrics import (
    cosine,
    distribution,
    looks_like_logits,
    max_errors,
    scale_of,
    top1_matches,
)

# Default relative tolerance by the models' native dtype (errors are measured in float64 where possible).
DEFAULT_RTOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
MODES = ("numeric", "interface", "none")
CHECK_BATCH = 2  # the batch of generated inputs: 2, so a layer that mixes samples shows


@dataclass
class CheckResult:
    ok: bool
    mode: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    rtol: float | None = None
    atol: float | None = None
    dtype: str | None = None
    leaves: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    state_dict: dict | None = None
    first_divergence: dict | None = None
    noise_floor: float | None = None  # the reference's native-dtype forward vs its float64 forward
    rounding_floor: float | None = None  # effect of one rounding step on every reference tensor
    threshold: float | None = None  # what max_rel was judged against: max(rtol, 4 x rounding_floor)
    abs_error: dict[str, float] = field(default_factory=dict)  # mean / median / p99 over every output element
    rel_error: dict[str, float] = field(default_factory=dict)  # the same, relative to each output's max |ref|
    cosine: float | None = None  # the lowest cosine similarity of any output, over the inputs
    top1: tuple[int, int] | None = None  # (rows whose argmax agrees, rows) for classifier outputs
    inputs: list[list[int]] = field(default_factory=list)  # shapes of the inputs compared
    layers: list[dict] = field(default_factory=list)  # per-layer rows, in execution order, when recorded
    notes: list[str] = field(default_factory=list)
    exported: dict | None = None  # the candidate was an exported file: its path, format, runtime and dtype

    @property
    def summary(self) -> str:
        """One line: the verdict, the figures it rests on, and the first problems."""
        if self.mode == "none":
            return "not checked (check: none)"
        verdict = "passed" if self.ok else "FAILED"
        if self.mode == "numeric":
            text = (f"{verdict}: max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g} "
                    f"(allowed {self.threshold:.3g}, compared in {self.dtype}")
            if self.noise_floor:
                text += f"; float32-level noise {self.noise_floor:.3g}"
            text += ")"
        else:
            text = f"{verdict}: outputs and gradients"
        if self.first_divergence:
            text += f"; first divergence at {_where(self.first_divergence)}"
        if self.problems:
            text += "; " + "; ".join(self.problems[:5])
            if len(self.problems) > 5:
                text += f"; and {len(self.problems) - 5} more"
        return text

    def lines(self) -> list[str]:
        """The human-readable report (``normswap check`` prints it; a golden test fixes its format)."""
        out = [f"check ({self.mode}): {'passed' if self.ok else 'FAILED'}"]
        distinct = list(dict.fromkeys(tuple(s) for s in self.inputs))
        shapes = f"{len(self.inputs)} x {distinct[0]}" if len(distinct) == 1 else ", ".join(map(str, distinct))
        if self.mode == "numeric":
            out.append(f"  inputs           {shapes}")
            out.append(f"  compared in      {self.dtype}")
            if self.exported:
                e = self.exported
                out.append(f"  candidate        {e['format']} file run in {e['runtime']}, {e['dtype']}: {e['path']}")
            out.append(f"  max error        abs {self.max_abs:.3g}  rel {self.max_rel:.3g}")
            if self.abs_error:
                a, r = self.abs_error, self.rel_error
                out.append(f"  abs error        mean {a['mean']:.3g}  median {a['median']:.3g}  p99 {a['p99']:.3g}")
                out.append(f"  rel error        mean {r['mean']:.3g}  median {r['median']:.3g}  p99 {r['p99']:.3g}")
            if self.cosine is not None:
                out.append(f"  cosine           {self.cosine:.6f}")
            if self.top1 is not None:
                out.append(f"  top-1 agreement  {self.top1[0]} of {self.top1[1]}")
            allowed = f"  allowed          rel {self.threshold:.3g} (rtol {self.rtol:.3g}"
            if self.rounding_floor:
                allowed += f"; {NOISE_MULTIPLE:g} x rounding floor {self.rounding_floor:.3g}"
            if self.exported and self.noise_floor:
                allowed += f"; {NOISE_MULTIPLE:g} x native noise, the file computing in {self.exported['dtype']}"
            if self.atol:
                allowed += f"; atol {self.atol:.3g}"
            out.append(allowed + ")")
            if self.noise_floor:
                run = (f"the reference run in {self.exported['dtype']}" if self.exported
                       else "the reference's own forward")
                out.append(f"  native noise     {self.noise_floor:.3g} ({run} vs float64)")
        elif self.state_dict is not None:
            sd = self.state_dict
            out.append(f"  inputs           {shapes}")
            out.append(f"  state dict       {sd['kept']} kept, {len(sd['dropped'])} dropped, {len(sd['new'])} new")
            out.append(f"  parameters       {sd['params_before']:,} -> {sd['params_after']:,}")
        if self.first_divergence:
            d = self.first_divergence
            out.append(f"  first divergence {_where(d)}")
            if d.get("hint"):
                out.append(f"                   {d['hint']}")
        if self.layers:
            out.append(f"  layers compared  {len(self.layers)}")
            out += _most_divergent(self.layers)
        for p in self.problems:
            out.append(f"  problem: {p}")
        for n in self.notes:
            out.append(f"  note: {n}")
        return out

    def to_json(self) -> dict:
        return {
            "ok": self.ok, "mode": self.mode, "max_abs": _finite(self.max_abs), "max_rel": _finite(self.max_rel),
            "abs_error": self.abs_error, "rel_error": self.rel_error, "cosine": self.cosine,
            "top1": list(self.top1) if self.top1 else None,
            "rtol": self.rtol, "atol": self.atol, "dtype": self.dtype, "inputs": self.inputs, "leaves": self.leaves,
            "problems": self.problems, "notes": self.notes, "state_dict": self.state_dict,
            "first_divergence": self.first_divergence, "layers": self.layers, "noise_floor": self.noise_floor,
            "rounding_floor": self.rounding_floor, "threshold": self.threshold, "summary": self.summary,
            "exported": self.exported,
        }


def _most_divergent(rows: list[dict], n: int = 5) -> list[str]:
    """The ``n`` layer calls with the largest local error (each run on the reference's input), as text rows."""
    def local(row: dict) -> float:
        value = row.get("local_rel")
        return float(value) if value is not None else -1.0  # "inf" (a JSON-safe infinity) reads back as inf

    ranked = sorted((r for r in rows if r.get("local_rel") is not None), key=local, reverse=True)[:n]
    if not ranked:
        return []
    out = ["  most divergent   layer (reference -> candidate): local rel error, propagated"]
    for r in ranked:
        call = f"#{r['call'] + 1}" if r.get("call") else ""
        swap = r["reference"] if r.get("candidate") in (None, r["reference"]) else f"{r['reference']} -> {r['candidate']}"
        prop = r.get("propagated_rel")
        prop_text = f"{float(prop):.3g}" if prop is not None else "-"
        out.append(f"    {r['path']}{call} ({swap}): {local(r):.3g}, {prop_text}")
    return out


def _finite(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def _finite_or_none(x: float | None) -> float | str | None:
    return None if x is None else _finite(x)


def _where(d: dict) -> str:
    call = f" call {d['call'] + 1} of {d['calls']}" if d.get("calls", 1) > 1 else ""
    cls = d["reference"] if d.get("candidate") in (None, d["reference"]) else f"{d['reference']} -> {d['candidate']}"
    if d["kind"] == "local":
        rel = d["local_rel"]
        figure = f"local rel error {rel:.3g}" if isinstance(rel, float) else "its output is non-finite or it fails"
    else:
        figure = f"propagated rel error {d['propagated_rel']:.3g}; no layer departs on its own input"
    return f"{d['path'] or '(the model)'} ({cls}{call}): {figure}"


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Eval mode for the duration; every module's own flag restored afterwards."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def _leaves(out: Any) -> tuple[list[torch.Tensor], Any]:
    leaves, spec = pytree.tree_flatten(out)
    return [x for x in leaves if isinstance(x, torch.Tensor)], spec


def _leaf_names(out: Any) -> list[str]:
    """``output``, or ``output['logits']`` / ``output[1][0]`` for each tensor of a nested output."""
    pairs, _ = pytree.tree_flatten_with_path(out)
    names = [f"output{pytree.keystr(path)}" for path, x in pairs if isinstance(x, torch.Tensor)]
    return names


def _input_list(reference: nn.Module, inputs: Any, input_size, n_inputs: int, seed: int, batch: int) -> list[tuple]:
    if inputs is None:
        return [as_args(make_inputs(reference, input_size, batch=batch, seed=seed + i)) for i in range(n_inputs)]
    device = model_dtype_device(reference)[1]  # the user's inputs go where the model is
    return [to_device(as_args(x), device) for x in (inputs if isinstance(inputs, list) else [inputs])]


def _cast(args: tuple, dtype: torch.dtype | None) -> tuple:
    if dtype is None:
        return args
    return pytree.tree_map(lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x, args)


def _for_exported(exported: ExportedModule, reference: nn.Module, mode: str, layers: bool | None, inputs: Any,
                  input_size: tuple[int, ...] | None) -> tuple[bool, tuple[int, ...] | None]:
    """What a check of an exported file can do: compare outputs, on inputs of the shape the file fixes.

    No interface check (a file runs forward only, no backward pass reaches its weights) and no per-layer
    rows (it has no layers to hook): both refused when asked for, and ``layers`` is False from here.
    """
    if mode == "interface":
        raise InputSpecError(f"an interface check (--mode interface) runs a backward pass through the candidate; "
                             f"{exported.path} is an exported file, which runs forward only",
                             fix="compare its outputs with --mode numeric, or check the PyTorch model it was "
                                 "exported from with --mode interface")
    if layers:
        raise InputSpecError(f"a per-layer comparison (--layers, --plot) hooks the candidate's layers; "
                             f"{exported.path} is an exported file, which has none to hook",
                             fix="drop --layers and --plot, or compare the PyTorch model it was exported from "
                                 "layer by layer")
    if inputs is None and input_size is None:
        try:
            guessed = (CHECK_BATCH, *infer_input_size(reference)[0])
        except InputSpecError:
            guessed = None
        input_size = exported.default_input_size(guessed)
    return False, input_size


def check(
    reference: nn.Module,
    candidate: nn.Module,
    inputs: Any = None,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    mode: str = "numeric",
    input_size: tuple[int, ...] | None = None,
    dtype: torch.dtype | None = None,
    n_inputs: int = 2,
    seed: int = 0,
    layers: bool | None = None,
    fold_map: dict[str, FoldLink] | None = None,
    rounding: dict[str, torch.dtype] | None = None,
) -> CheckResult:
    """Compare ``candidate`` with ``reference`` on the same inputs (see the module docstring).

    ``inputs``: a tensor, a tuple of arguments, or a list of those; by default
    ``n_inputs`` seeded normal inputs shaped from ``input_size`` or the model.
    ``dtype=torch.float64`` compares float64 copies, which separates a real
    difference from float32 rounding noise on deep models.
    ``layers``: record every layer and find the first divergence (``layerwise``);
    ``None`` does it only when the outputs disagree, to say where.
    ``fold_map``: the rewrite's own map of folded layers (``Plan.fold_map``); inferred when not given.
    ``rounding``: layer path -> the dtype of arithmetic the rewrite took out of it (``Plan.rounding``): the
    rounding floor moves those layers' changed tensors by that dtype's rounding step, float64 models included.
    A candidate may be an exported file (``artifact.ExportedModule``): see ``_for_exported``.
    """
    if mode not in MODES:
        raise InputSpecError(f"unknown check mode {mode!r}", fix=f"use one of {', '.join(MODES)}")
    for name, m in (("reference", reference), ("candidate", candidate)):
        if not isinstance(m, nn.Module):
            raise InputSpecError(f"{name} must be a torch.nn.Module, got {type(m).__name__}")
    if mode == "none":
        return CheckResult(ok=True, mode="none")
    if isinstance(candidate, ExportedModule):
        layers, input_size = _for_exported(candidate, reference, mode, layers, inputs, input_size)
    try:
        if mode == "interface":
            return _interface(reference, candidate, inputs, input_size, seed)
        try:
            return _numeric(reference, candidate, inputs, rtol, atol, input_size, dtype, n_inputs, seed, layers,
                            fold_map, rounding)
        except NormswapError:
            raise
        except Exception as e:
            native, _ = model_dtype_device(reference)
            if dtype is not None or native == torch.float64:
                raise
            # the float64 copies cannot run (a forward that casts its input itself, x.float()): compare natively
            result = _numeric(reference, candidate, inputs, rtol, atol, input_size, native, n_inputs, seed, layers,
                              fold_map, rounding)
            first = str(e).splitlines()[0][:120] if str(e) else ""
            result.notes.append(f"the float64 copies could not run ({type(e).__name__}: {first}): compared in "
                                f"{str(native).replace('torch.', '')}")
            return result
    except NormswapError:
        raise
    except Exception as e:  # a forward that cannot run on the check's inputs is an input problem, not a crash
        shape = f" of shape {list(input_size)}" if input_size else ""
        raise InputSpecError(f"the check's forward pass failed on its inputs{shape}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}",
                            fix="give the input size the model expects (--input-size 1,3,H,W / input_size=...) "
                                "or inputs") from None


# Unit roundoff by dtype: the relative size of one rounding step.
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
NOISE_MULTIPLE = 4.0


def _float64_copy(model: nn.Module) -> nn.Module | None:
    try:
        return copy.deepcopy(model).double()
    except Exception:  # noqa: BLE001 - a model that cannot be copied or cast is compared as it is
        return None


@torch.no_grad()
def _perturbed(model64: nn.Module, units: dict[str, float], seed: int) -> nn.Module:
    """A copy with each named floating tensor moved by a random relative ±u (its ``units`` entry): rounding-sized
    noise."""
    out = copy.deepcopy(model64)
    gen = torch.Generator().manual_seed(seed)
    for name, t in out.state_dict(keep_vars=True).items():
        u = units.get(name)
        if u is not None and t.is_floating_point():
            t.data.mul_(1 + u * (2 * torch.rand(t.shape, generator=gen, dtype=t.dtype).to(t.device) - 1))
    return out


def _changed_tensors(reference: nn.Module, candidate: nn.Module) -> set[str]:
    """Reference state the rewrite replaced or altered: where its rounding can show up."""
    ref, cand = reference.state_dict(), candidate.state_dict()
    return {n for n, t in ref.items()
            if n not in cand or cand[n].shape != t.shape or cand[n].dtype != t.dtype or not torch.equal(cand[n], t)}


def _numeric(reference, candidate, inputs, rtol, atol, input_size, dtype, n_inputs, seed, layers, fold_map,
             rounding=None) -> CheckResult:
    """Compare in float64 where both models allow it, against a tolerance that knows the rounding noise.

    The candidate's error is measured against the reference, both cast to float64
    (``dtype`` overrides the comparison dtype). A correct rewrite of a float32 model
    still differs by the rounding of its new weights, amplified by the network; that
    floor is estimated by perturbing the reference tensors the rewrite changed by one
    rounding step of their native dtype, and the check passes below max(rtol, 4 x floor). The native
    forward's own distance from float64 is reported beside it (``noise_floor``).
    An exported file keeps its own dtype (float32 against the float64 reference): the tolerance and the
    rounding step are that dtype's, and every reference tensor is perturbed, since the file holds them all.
    """
    native, _ = model_dtype_device(reference)
    exported = candidate if isinstance(candidate, ExportedModule) else None
    precision = _coarser(native, exported.dtype) if exported is not None else native
    ref, cand, compare_dtype = _models_to_compare(reference, candidate, dtype, native)
    batches = _input_list(reference, inputs, input_size, n_inputs, seed, batch=CHECK_BATCH)
    tol = rtol if rtol is not None else DEFAULT_RTOL.get(precision, 1e-4)
    result = CheckResult(ok=True, mode="numeric", atol=atol or 0.0, rtol=tol,
                         dtype=str(compare_dtype or native).replace("torch.", ""),
                         inputs=[_shape_of(args) for args in batches],
                         exported=exported.describe() if exported is not None else None)
    if compare_dtype is None and native != torch.float64:
        result.notes.append("the models could not be cast to float64: compared in their own dtype, "
                            "where deep networks carry more rounding noise")
    noisy, at_precision = _noise_models(reference, candidate, ref, compare_dtype, native, precision, seed, rounding)
    floor, native_noise = 0.0, 0.0
    stats = _Stats()
    structure_ok = True
    lw: Layerwise | None = None
    extra = [m for m in (noisy, at_precision) if m is not None]
    with torch.no_grad(), eval_mode(reference, candidate, ref, cand, *extra):
        for b_i, args in enumerate(batches):
            cargs = _cast(args, compare_dtype)
            if b_i == 0 and layers:  # the recorded run is also the first comparison
                lw = _layerwise(result, ref, cand, cargs, fold_map)
            if lw is not None and b_i == 0:
                ref_out, cand_out = lw.reference_output, lw.candidate_output
            else:
                ref_out, cand_out = run(ref, cargs), run(cand, cargs)
            ref_leaves, ref_spec = _leaves(ref_out)
            cand_leaves, cand_spec = _leaves(cand_out)
            if exported is not None:
                cand_leaves, cand_spec = _flat_like(cand_leaves, cand_spec, ref_leaves, ref_spec)
            if ref_spec != cand_spec or len(ref_leaves) != len(cand_leaves):
                result.problems.append(f"output structure differs: {ref_spec} vs {cand_spec}")
                structure_ok = False
                break
            if noisy is not None:
                for r, n in zip(ref_leaves, _leaves(run(noisy, cargs))[0]):
                    floor = max(floor, _rel(r, n))
                for r, n in zip(ref_leaves, _leaves(run(at_precision, _cast(args, precision)))[0] if at_precision
                                else []):
                    native_noise = max(native_noise, _rel(r, n))
            for i, (name, r, c) in enumerate(zip(_leaf_names(ref_out), ref_leaves, cand_leaves)):
                _compare_leaf(result, stats, name, b_i, r, c, first=i == 0)
        _judge(result, stats, tol, floor, native_noise, exported is not None)
        if lw is None and structure_ok and layers is None and not result.ok:
            lw = _layerwise(result, ref, cand, _cast(batches[0], compare_dtype), fold_map)
        if lw is not None:
            _locate(result, lw)
    if exported is not None and not result.ok:
        result.notes.append("where the outputs part is not shown for an exported file (it has no layers to hook): "
                            "compare the PyTorch model it was exported from to find the first divergence")
    return result


def _noise_models(reference: nn.Module, candidate: nn.Module, ref: nn.Module, compare_dtype: torch.dtype | None,
                  native: torch.dtype, precision: torch.dtype, seed: int,
                  rounding: dict[str, torch.dtype] | None = None) -> tuple[nn.Module | None, nn.Module | None]:
    """(the float64 reference with the changed tensors moved by one rounding step of ``precision``, the
    reference as it runs in ``precision``), or (None, None) when the comparison is not in float64 or the
    models are float64 themselves. The second is the reference itself unless an exported candidate computes
    in a coarser dtype than the reference (a float32 file against a float64 model)."""
    if (compare_dtype or native) != torch.float64 or (precision == torch.float64 and not rounding):
        return None, None
    unit = UNIT_ROUNDOFF.get(precision, 2.0**-24)
    units = {name: max([unit] + [UNIT_ROUNDOFF[dt] for path, dt in (rounding or {}).items()
                                 if name.startswith(path + ".")])
             for name in _changed_tensors(reference, candidate)}
    noisy = _perturbed(ref, units, seed)
    if precision == torch.float64:  # a float64 model: no coarser forward of its own to measure
        return noisy, None
    return noisy, reference if precision == native else copy.deepcopy(reference).to(precision)


def _coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The dtype with the larger rounding step: what a comparison of the two can be held to."""
    return b if UNIT_ROUNDOFF.get(b, 0.0) > UNIT_ROUNDOFF.get(a, 0.0) else a


def _models_to_compare(reference: nn.Module, candidate: nn.Module, dtype: torch.dtype | None,
                       native: torch.dtype) -> tuple[nn.Module, nn.Module, torch.dtype | None]:
    """(reference, candidate, dtype) as compared: float64 copies by default, copies in ``dtype`` when asked,
    the models themselves (dtype None) when they cannot be cast or are float64 already."""
    if dtype is None and native != torch.float64:
        ref64, cand64 = _float64_copy(reference), _float64_copy(candidate)
        if ref64 is not None and cand64 is not None:
            return ref64, cand64, torch.float64
        return reference, candidate, None
    if dtype is not None:
        return copy.deepcopy(reference).to(dtype), copy.deepcopy(candidate).to(dtype), dtype
    return reference, candidate, None


def _flat_like(cand_leaves: list[torch.Tensor], cand_spec: Any, ref_leaves: list[torch.Tensor],
               ref_spec: Any) -> tuple[list[torch.Tensor], Any]:
    """An exported file's outputs, leaf for leaf with the reference's: ONNX returns nested outputs flat, and
    the file computes in its own dtype, widened here (exactly) to the reference's."""
    if len(cand_leaves) != len(ref_leaves):
        return cand_leaves, cand_spec
    return [c.to(r.dtype) if c.is_floating_point() and r.is_floating_point() else c
            for c, r in zip(cand_leaves, ref_leaves)], ref_spec


def _judge(result: CheckResult, stats: _Stats, tol: float, floor: float, native_noise: float,
           exported: bool) -> None:
    """The verdict: every output leaf within atol + threshold x its scale.

    The threshold is max(tol, 4 x rounding floor); for an ``exported`` file also 4 x the native noise: the
    file does its arithmetic in float32, as the reference's own float32 forward does, so it may sit as far
    from the float64 reference as that forward does (resnet18 at 32x32: a correct .pt2 6.1e-6, the native
    noise 7.1e-6, against an rtol of 1e-5 and a rounding floor of 9e-7)."""
    result.noise_floor = native_noise
    result.rounding_floor = floor
    result.threshold = max(tol, NOISE_MULTIPLE * floor, NOISE_MULTIPLE * native_noise if exported else 0.0)
    for leaf in result.leaves:
        if leaf["max_abs"] > result.atol + result.threshold * leaf["scale"]:
            result.problems.append(
                f"{leaf['name']}: max rel error {leaf['max_rel']:.3g} above {result.threshold:.3g} "
                f"(input {leaf['input']})")
    stats.finish(result)
    result.ok = not result.problems


def _layerwise(result: CheckResult, ref: nn.Module, cand: nn.Module, args: tuple, fold_map) -> Layerwise | None:
    try:
        return compare_layers(ref, cand, args, fold_map)
    except Exception as e:  # noqa: BLE001 - the verdict stands without the per-layer view
        result.notes.append(f"per-layer comparison unavailable: {type(e).__name__}: {str(e).splitlines()[0]}")
        return None


def _locate(result: CheckResult, lw: Layerwise) -> None:
    """Per-layer rows and the first divergence (see layerwise.py), on the first input."""
    result.layers = [r.to_json() for r in lw.rows]
    result.notes.extend(lw.notes)
    kind, row = "local", lw.first_local(result.rtol, result.atol)
    if row is None and not result.ok:
        kind, row = "propagated", lw.first_propagated(result.threshold)
    if row is None:
        if not result.ok:
            result.notes.append("no layer departs from the reference on its own input, and no layer output does: "
                                "the difference enters outside the layers (in the forward code between them)")
        return
    calls = sum(1 for r in lw.rows if r.path == row.path)
    hint = None
    if row.compared is None and row.candidate not in (None, row.reference):
        hint = (f"{row.reference} was replaced by {row.candidate}, which computes another function: "
                "check such rewrites with mode='interface' (CLI: normswap apply --check interface, normswap "
                "check --mode interface, or `check: interface` in the recipe)")
    elif row.note:
        hint = row.note
    elif row.compared:
        hint = row.compared
    result.first_divergence = {
        "kind": kind, "path": row.path, "call": row.call, "calls": calls, "order": row.order,
        "reference": row.reference, "candidate": row.candidate, "local_abs": _finite_or_none(row.local_abs),
        "local_rel": _finite_or_none(row.local_rel), "propagated_rel": _finite_or_none(row.propagated_rel),
        "allowed": result.rtol if kind == "local" else result.threshold, "hint": hint,
    }
    if kind == "local" and result.ok:
        result.notes.append(f"{row.path} departs on its own input, but the outputs agree within tolerance")


def _shape_of(args: tuple) -> list[int]:
    first = next((x for x in pytree.tree_leaves(args) if isinstance(x, torch.Tensor)), None)
    return list(first.shape) if first is not None else []


class _Stats:
    """Element-wise error distributions, cosine and top-1 agreement, pooled over outputs and inputs."""

    def __init__(self) -> None:
        self.abs: list[torch.Tensor] = []
        self.rel: list[torch.Tensor] = []
        self.cosine: float | None = None
        self.top1 = [0, 0]

    def add(self, r: torch.Tensor, c: torch.Tensor, diff: torch.Tensor, scale: float, first: bool) -> None:
        """``first``: the first tensor of this input's output, the one top-1 agreement is read from."""
        self.abs.append(diff.flatten())
        self.rel.append(diff.flatten() / scale if scale > 0 else diff.flatten())
        cos = cosine(r, c)
        self.cosine = cos if self.cosine is None else min(self.cosine, cos)
        if first and looks_like_logits(r):
            hit, n = top1_matches(r, c)
            self.top1[0] += hit
            self.top1[1] += n

    def finish(self, result: CheckResult) -> None:
        if self.abs:
            result.abs_error = distribution(torch.cat(self.abs))
            result.rel_error = distribution(torch.cat(self.rel))
        result.cosine = self.cosine
        result.top1 = tuple(self.top1) if self.top1[1] else None


def _rel(r: torch.Tensor, c: torch.Tensor) -> float:
    if not r.is_floating_point() or r.shape != c.shape or not r.numel():
        return 0.0
    return max_errors(r, c)[1]


def _compare_leaf(result: CheckResult, stats: _Stats, name: str, batch: int, r: torch.Tensor, c: torch.Tensor,
                  first: bool) -> None:
    if r.shape != c.shape or r.dtype != c.dtype:
        result.problems.append(f"{name}: reference {tuple(r.shape)} {r.dtype}, candidate {tuple(c.shape)} {c.dtype}")
        return
    if not r.is_floating_point() and not r.is_complex():
        if not torch.equal(r, c):
            result.problems.append(f"{name}: integer outputs differ")
        return
    if not torch.isfinite(r).all():
        result.problems.append(f"{name}: the reference output has NaN or Inf (input {batch})")
        return
    bad = (~torch.isfinite(c)).sum().item()
    if bad:
        result.problems.append(f"{name}: the candidate output has {bad} NaN/Inf value(s) (input {batch})")
        result.max_abs = result.max_rel = math.inf
        return
    diff = (r.double() - c.double()).abs()
    max_abs = diff.max().item() if diff.numel() else 0.0
    scale = scale_of(r)
    max_rel = max_abs / scale if scale > 0 else max_abs
    result.max_abs = max(result.max_abs, max_abs)
    result.max_rel = max(result.max_rel, max_rel)
    stats.add(r, c, diff, scale, first)
    result.leaves.append({"name": name, "input": batch, "shape": list(r.shape), "max_abs": max_abs,
                          "max_rel": max_rel, "scale": scale})


def _interface(reference, candidate, inputs, input_size, seed) -> CheckResult:
    args = _input_list(reference, inputs, input_size, 1, seed, batch=CHECK_BATCH)[0]
    result = CheckResult(ok=True, mode="interface", inputs=[_shape_of(args)])
    with torch.no_grad(), eval_mode(reference, candidate):
        ref_leaves, ref_spec = _leaves(run(reference, args))
        cand_leaves, cand_spec = _leaves(run(candidate, args))
    if ref_spec != cand_spec:
        result.problems.append(f"output structure differs: {ref_spec} vs {cand_spec}")
    for i, (r, c) in enumerate(zip(ref_leaves, cand_leaves)):
        if r.shape != c.shape or r.dtype != c.dtype:
            result.problems.append(f"output[{i}]: reference {tuple(r.shape)} {r.dtype}, candidate {tuple(c.shape)} {c.dtype}")
        if c.is_floating_point() and not torch.isfinite(c).all():
            result.problems.append(f"output[{i}]: candidate has NaN or Inf")
    ref_grads = _grads(reference, args)
    cand_grads = _grads(candidate, args)
    for name, state in cand_grads.items():
        if state == "none" and ref_grads.get(name, "missing") != "none":
            result.problems.append(f"no gradient reaches {name}")
        elif state == "nonfinite":
            result.problems.append(f"gradient of {name} is not finite")
    ref_sd, cand_sd = set(reference.state_dict()), set(candidate.state_dict())
    result.state_dict = {
        "kept": len(ref_sd & cand_sd),
        "dropped": sorted(ref_sd - cand_sd),
        "new": sorted(cand_sd - ref_sd),
        "params_before": sum(p.numel() for p in reference.parameters()),
        "params_after": sum(p.numel() for p in candidate.parameters()),
    }
    result.ok = not result.problems
    return result


def _two_samples(args: tuple | dict) -> tuple | dict:
    """A batch of one made two (the sample and its negation; a copy for integer inputs such as token ids):
    train-mode BatchNorm refuses one value per channel, which a 1x1 map at batch 1 gives (resnet18 at 32x32)."""
    first = next((x for x in pytree.tree_leaves(args) if isinstance(x, torch.Tensor)), None)
    if first is None or first.ndim == 0 or first.shape[0] != 1:
        return args
    return pytree.tree_map(lambda x: torch.cat([x, -x if x.is_floating_point() else x])
                           if isinstance(x, torch.Tensor) and x.ndim and x.shape[0] == 1 else x, args)


def _grads(model: nn.Module, args: tuple) -> dict[str, str]:
    """Train-mode forward/backward on a private copy: name -> ok | none | nonfinite."""
    work = copy.deepcopy(model).train()
    for p in work.parameters():
        p.grad = None
    leaves, _ = _leaves(run(work, _two_samples(args)))
    loss = sum(x.float().square().mean() for x in leaves if x.is_floating_point() and x.requires_grad)
    if isinstance(loss, torch.Tensor):
        loss.backward()
    out = {}
    for name, p in work.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            out[name] = "none"
        else:
            out[name] = "ok" if torch.isfinite(p.grad).all() else "nonfinite"
    return out
