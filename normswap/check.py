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
from .inputs import as_args, make_inputs, model_dtype_device

# Default relative tolerance by the models' native dtype (errors are measured in float64 where possible).
DEFAULT_RTOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
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
    noise_floor: float | None = None  # the reference's native-dtype forward vs its float64 forward
    rounding_floor: float | None = None  # effect of one rounding step on every reference tensor
    threshold: float | None = None  # what max_rel was judged against: max(rtol, 4 x rounding_floor)

    @property
    def summary(self) -> str:
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
            "first_divergence": self.first_divergence, "noise_floor": self.noise_floor,
            "rounding_floor": self.rounding_floor, "threshold": self.threshold, "summary": self.summary,
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


# Unit roundoff by dtype: the relative size of one rounding step.
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
NOISE_MULTIPLE = 4.0


def _float64_copy(model: nn.Module) -> nn.Module | None:
    try:
        return copy.deepcopy(model).double()
    except Exception:  # noqa: BLE001 - a model that cannot be copied or cast is compared as it is
        return None


@torch.no_grad()
def _perturbed(model64: nn.Module, names: set[str], u: float, seed: int) -> nn.Module:
    """A copy with the named floating tensors moved by a random relative ±u: rounding-sized noise."""
    out = copy.deepcopy(model64)
    gen = torch.Generator().manual_seed(seed)
    for name, t in out.state_dict(keep_vars=True).items():
        if name in names and t.is_floating_point():
            t.data.mul_(1 + u * (2 * torch.rand(t.shape, generator=gen, dtype=t.dtype) - 1))
    return out


def _changed_tensors(reference: nn.Module, candidate: nn.Module) -> set[str]:
    """Reference state the rewrite replaced or altered: where its rounding can show up."""
    ref, cand = reference.state_dict(), candidate.state_dict()
    return {n for n, t in ref.items()
            if n not in cand or cand[n].shape != t.shape or cand[n].dtype != t.dtype or not torch.equal(cand[n], t)}


def _numeric(reference, candidate, inputs, rtol, atol, input_size, dtype, n_inputs, seed) -> CheckResult:
    """Compare in float64 where both models allow it, against a tolerance that knows the rounding noise.

    The candidate's error is measured against the reference, both cast to float64
    (``dtype`` overrides the comparison dtype). A correct rewrite of a float32 model
    still differs by the rounding of its new weights, amplified by the network; that
    floor is estimated by perturbing the reference tensors the rewrite changed by one
    rounding step of their native dtype, and the check passes below max(rtol, 4 x floor). The native
    forward's own distance from float64 is reported beside it (``noise_floor``).
    """
    native, _ = model_dtype_device(reference)
    compare_dtype = dtype
    ref, cand = reference, candidate
    if compare_dtype is None and native != torch.float64:
        ref64, cand64 = _float64_copy(reference), _float64_copy(candidate)
        if ref64 is not None and cand64 is not None:
            ref, cand, compare_dtype = ref64, cand64, torch.float64
    elif compare_dtype is not None:
        ref, cand = copy.deepcopy(reference).to(compare_dtype), copy.deepcopy(candidate).to(compare_dtype)
    batches = _input_list(reference, inputs, input_size, n_inputs, seed, batch=2)
    tol = rtol if rtol is not None else DEFAULT_RTOL.get(native, 1e-4)
    result = CheckResult(ok=True, mode="numeric", atol=atol or 0.0, rtol=tol,
                         dtype=str(compare_dtype or native).replace("torch.", ""))
    noisy = None
    if compare_dtype == torch.float64 and native != torch.float64:
        noisy = _perturbed(ref, _changed_tensors(reference, candidate), UNIT_ROUNDOFF.get(native, 2.0**-24), seed)
    floor, native_noise = 0.0, 0.0
    with torch.no_grad(), eval_mode(reference, candidate, ref, cand, *( [noisy] if noisy is not None else [])):
        for b_i, args in enumerate(batches):
            cargs = _cast(args, compare_dtype)
            ref_leaves, ref_spec = _leaves(ref(*cargs))
            cand_leaves, cand_spec = _leaves(cand(*cargs))
            if ref_spec != cand_spec or len(ref_leaves) != len(cand_leaves):
                result.problems.append(f"output structure differs: {ref_spec} vs {cand_spec}")
                break
            if noisy is not None:
                for r, n in zip(ref_leaves, _leaves(noisy(*cargs))[0]):
                    floor = max(floor, _rel(r, n))
                for r, n in zip(ref_leaves, _leaves(reference(*args))[0]):
                    native_noise = max(native_noise, _rel(r, n))
            for i, (r, c) in enumerate(zip(ref_leaves, cand_leaves)):
                _compare_leaf(result, f"output[{i}]" if len(ref_leaves) > 1 else "output", b_i, r, c)
    result.noise_floor = native_noise
    result.rounding_floor = floor
    result.threshold = max(tol, NOISE_MULTIPLE * floor)
    for leaf in result.leaves:
        if leaf["max_abs"] > result.atol + result.threshold * leaf["scale"]:
            result.problems.append(
                f"{leaf['name']}: max rel error {leaf['max_rel']:.3g} above {result.threshold:.3g} (input {leaf['input']})")
    result.ok = not result.problems
    return result


def _rel(r: torch.Tensor, c: torch.Tensor) -> float:
    if not r.is_floating_point() or r.shape != c.shape or not r.numel():
        return 0.0
    scale = r.double().abs().max().item()
    diff = (r.double() - c.double()).abs().max().item()
    return diff / scale if scale > 0 else diff


def _compare_leaf(result: CheckResult, name: str, batch: int, r: torch.Tensor, c: torch.Tensor) -> None:
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
        return
    diff = (r.double() - c.double()).abs()
    max_abs = diff.max().item() if diff.numel() else 0.0
    scale = r.double().abs().max().item() if r.numel() else 0.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    result.max_abs = max(result.max_abs, max_abs)
    result.max_rel = max(result.max_rel, max_rel)
    result.leaves.append({"name": name, "input": batch, "shape": list(r.shape), "max_abs": max_abs,
                          "max_rel": max_rel, "scale": scale})


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
