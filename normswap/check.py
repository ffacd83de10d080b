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
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from .errors import NormswapError
from .inputs import as_args, make_inputs

# Default relative tolerance by the dtype the comparison runs in.
DEFAULT_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
MODES = ("numeric", "interface", "none")


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

    @property
    def summary(self) -> str:
        if self.mode == "none":
            return "not checked (check: none)"
        verdict = "passed" if self.ok else "FAILED"
        if self.mode == "numeric":
            text = f"{verdict}: max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g} (rtol {self.rtol:g}, {self.dtype})"
        else:
            text = f"{verdict}: outputs and gradients"
        if self.problems:
            text += "; " + "; ".join(self.problems[:5])
            if len(self.problems) > 5:
                text += f"; and {len(self.problems) - 5} more"
        return text

    def to_json(self) -> dict:
        return {
            "ok": self.ok, "mode": self.mode, "max_abs": self.max_abs, "max_rel": self.max_rel,
            "rtol": self.rtol, "atol": self.atol, "dtype": self.dtype, "leaves": self.leaves,
            "problems": self.problems, "state_dict": self.state_dict,
            "first_divergence": self.first_divergence, "summary": self.summary,
        }


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


def _input_list(reference: nn.Module, inputs: Any, input_size, n_inputs: int, seed: int, batch: int) -> list[tuple]:
    if inputs is None:
        return [as_args(make_inputs(reference, input_size, batch=batch, seed=seed + i)) for i in range(n_inputs)]
    if isinstance(inputs, list):
        return [as_args(x) for x in inputs]
    return [as_args(inputs)]


def _cast(args: tuple, dtype: torch.dtype | None) -> tuple:
    if dtype is None:
        return args
    return pytree.tree_map(lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x, args)


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
) -> CheckResult:
    """Compare ``candidate`` with ``reference`` on the same inputs (see the module docstring).

    ``inputs``: a tensor, a tuple of arguments, or a list of those; by default
    ``n_inputs`` seeded normal inputs shaped from ``input_size`` or the model.
    ``dtype=torch.float64`` compares float64 copies, which separates a real
    difference from float32 rounding noise on deep models.
    """
    if mode not in MODES:
        raise NormswapError(f"unknown check mode {mode!r}", fix=f"use one of {', '.join(MODES)}", code="input_invalid")
    for name, m in (("reference", reference), ("candidate", candidate)):
        if not isinstance(m, nn.Module):
            raise NormswapError(f"{name} must be a torch.nn.Module, got {type(m).__name__}", code="input_invalid")
    if mode == "none":
        return CheckResult(ok=True, mode="none")
    if mode == "interface":
        return _interface(reference, candidate, inputs, input_size, seed)
    return _numeric(reference, candidate, inputs, rtol, atol, input_size, dtype, n_inputs, seed)


def _numeric(reference, candidate, inputs, rtol, atol, input_size, dtype, n_inputs, seed) -> CheckResult:
    if dtype is not None:
        reference = copy.deepcopy(reference).to(dtype)
        candidate = copy.deepcopy(candidate).to(dtype)
    batches = _input_list(reference, inputs, input_size, n_inputs, seed, batch=2)
    batches = [_cast(b, dtype) for b in batches]
    result = CheckResult(ok=True, mode="numeric", atol=atol or 0.0)
    with torch.no_grad(), eval_mode(reference, candidate):
        for b_i, args in enumerate(batches):
            ref_leaves, ref_spec = _leaves(reference(*args))
            cand_leaves, cand_spec = _leaves(candidate(*args))
            if ref_spec != cand_spec or len(ref_leaves) != len(cand_leaves):
                result.problems.append(f"output structure differs: {ref_spec} vs {cand_spec}")
                break
            for i, (r, c) in enumerate(zip(ref_leaves, cand_leaves)):
                _compare_leaf(result, f"output[{i}]" if len(ref_leaves) > 1 else "output", b_i, r, c, rtol)
    result.ok = not result.problems
    return result


def _compare_leaf(result: CheckResult, name: str, batch: int, r: torch.Tensor, c: torch.Tensor, rtol) -> None:
    if r.shape != c.shape or r.dtype != c.dtype:
        result.problems.append(f"{name}: reference {tuple(r.shape)} {r.dtype}, candidate {tuple(c.shape)} {c.dtype}")
        return
    tol = rtol if rtol is not None else DEFAULT_RTOL.get(r.dtype, 1e-4)
    result.rtol, result.dtype = tol, str(r.dtype).replace("torch.", "")
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
        return
    diff = (r.double() - c.double()).abs()
    max_abs = diff.max().item() if diff.numel() else 0.0
    scale = r.double().abs().max().item() if r.numel() else 0.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    result.max_abs = max(result.max_abs, max_abs)
    result.max_rel = max(result.max_rel, max_rel)
    result.leaves.append({"name": name, "input": batch, "shape": list(r.shape), "max_abs": max_abs, "max_rel": max_rel})
    if max_abs > (result.atol or 0.0) + tol * scale:
        result.problems.append(f"{name}: max rel error {max_rel:.3g} above rtol {tol:g} (input {batch})")


def _interface(reference, candidate, inputs, input_size, seed) -> CheckResult:
    result = CheckResult(ok=True, mode="interface")
    args = _input_list(reference, inputs, input_size, 1, seed, batch=2)[0]
    with torch.no_grad(), eval_mode(reference, candidate):
        ref_leaves, ref_spec = _leaves(reference(*args))
        cand_leaves, cand_spec = _leaves(candidate(*args))
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


def _grads(model: nn.Module, args: tuple) -> dict[str, str]:
    """Train-mode forward/backward on a private copy: name -> ok | none | nonfinite."""
    work = copy.deepcopy(model).train()
    for p in work.parameters():
        p.grad = None
    leaves, _ = _leaves(work(*args))
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
