"""The one orchestrator: plan, calibrate, commit or copy, check. The API, the CLI and replay all go through it.

``rewrite`` is the only place that decides the steps around the engine: which
layers a calibration covers, whether the check runs and in which mode, what is
rolled back when it fails. ``load`` lives here too, because replaying a
normswap output is a rewrite of the architecture its sidecar names.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch.nn as nn

from . import engine
from .engine import Plan
from .errors import CheckFailedError, InputSpecError, ModelLoadError
from .model_io import Loaded, build_spec, check_readable, is_spec, is_tied_alias, load_model, sidecar_of, sidecar_path
from .passes.calibration import calibrate, group_candidates, swaps_to_calibrate, with_chosen_groups
from .recipe import CHECK_MODES, Recipe
from .report import Report
from .verify.check import CheckResult
from .verify.check import check as run_check


@dataclass
class Rewrite:
    """The result of one rewrite: the model (a copy, or the caller's with ``inplace``), its plan, report, check."""

    model: nn.Module | None  # None for a dry run
    plan: Plan
    report: Report
    check: CheckResult | None = None

    def replay_step(self, *, eval_mode: bool = False) -> dict:
        """What a .safetensors sidecar records so that ``load`` rebuilds this model: the recipe as data (with
        any group counts calibration chose) and the class each changed layer must come out as."""
        step = {"recipe": with_chosen_groups(self.plan.recipe.to_data(), self.plan, self.report.calibration),
                "layers": {ch.path: ch.new_type for ch in self.plan.changes}}
        if eval_mode:
            step["eval_mode"] = True  # a replay must fold the same BNs, which only fold in eval mode
        return step


def rewrite(
    model: nn.Module,
    recipe: Recipe | Mapping | str,
    *,
    inplace: bool = False,
    check: bool = False,
    check_mode: str | None = None,
    dry_run: bool = False,
    example_inputs: Any = None,
    input_size: tuple[int, ...] | None = None,
    calibration: list | None = None,
    calibration_fit: str = "least_squares",
    calibration_groups: str | float = "keep",
    low_memory: bool = False,
    **params: Any,
) -> Rewrite:
    """Plan ``recipe`` on ``model``, then (unless ``dry_run``) calibrate, apply and check; see ``api.apply``.

    ``check_mode`` (numeric, interface, none) overrides the recipe's ``check``. A failed check raises
    CheckFailedError carrying the result and the report, with the caller's model as it was (an in-place
    rewrite is rolled back). ``calibration`` under torch.distributed: this process's own shard; the fit is
    pooled over every process of the default group, so each gets the same model.
    """
    if check_mode is not None and check_mode not in CHECK_MODES:
        raise InputSpecError(f"unknown check mode {check_mode!r}", fix=f"use one of {', '.join(CHECK_MODES)}")
    # low_memory: edits of neighbouring layers (folds) are written at commit straight into the live layers, so no
    # copy of each edited layer is held. The price: an edit that fails there (out of memory) leaves the model
    # partly edited, so it is opt-in, in place only, with nothing to roll back or calibrate.
    if low_memory and (not inplace or check or calibration is not None):
        raise InputSpecError("low_memory=True edits the model in place at commit: it needs inplace=True, "
                             "check=False and no calibration", fix="pass inplace=True, check=False")
    model, wrapped = _unwrapped(model, inplace)
    plan = engine.plan(model, recipe, example_inputs=example_inputs, input_size=input_size, defer_edits=low_memory,
                       **params)
    report = Report.from_plan(plan, model, applied=not dry_run)
    report.notes[:0] = wrapped
    if dry_run:
        return Rewrite(None, plan, report)
    reference = engine.copy_model(model) if (check and inplace) else model
    swaps = swaps_to_calibrate(plan, calibration is not None)
    work = None
    if swaps:  # fitted on a private copy holding the prepared layers, before anything touches the caller's model
        work = engine.copied_with(model, plan)
        groups, tolerance = group_candidates(plan, swaps, calibration_groups)
        report.calibration_result = calibrate(model, work, swaps, calibration, fit=calibration_fit, groups=groups,
                                              tolerance=tolerance)
    if inplace:
        target, undo = model, engine.commit(model, plan)
    else:
        target, undo = (work if work is not None else engine.copied_with(model, plan)), []
    result = None
    mode = check_mode or plan.recipe.check
    if check and mode != "none":
        result = run_check(reference, target, example_inputs, mode=mode, input_size=input_size,
                           fold_map=plan.fold_map, rounding=plan.rounding)
        report.check_result = result
        if not result.ok:
            engine.rollback(undo)
            raise CheckFailedError(
                f"recipe '{plan.recipe.name}': the rewritten model failed the {result.mode} check: {result.summary}",
                result=result, report=report,
            )
    return Rewrite(target, plan, report, result)


# Wrappers that hold the real model as an attribute: (class name, attribute). Their own forward adds process
# groups (DDP), device scatter (DataParallel) or compiled graphs (torch.compile) around the model's.
_WRAPPERS = (("DistributedDataParallel", "module"), ("DataParallel", "module"), ("OptimizedModule", "_orig_mod"))


def _unwrapped(model: nn.Module, inplace: bool) -> tuple[nn.Module, list[str]]:
    """The model inside a DDP / DataParallel / torch.compile wrapper, with a note; in place is refused, since
    the wrapper holds the old layers' parameters (gradient buckets, compiled graphs)."""
    notes = []
    for _ in range(3):  # a compiled DDP model is two wrappers deep
        kind = next(((name, attr) for name, attr in _WRAPPERS if type(model).__name__ == name
                     and isinstance(getattr(model, attr, None), nn.Module)), None)
        if kind is None:
            break
        name, attr = kind
        if inplace:
            raise InputSpecError(f"the model is wrapped in {name}, which keeps references to the layers a rewrite "
                                 "replaces", fix=f"rewrite model.{attr} before wrapping it (inplace=True on the "
                                                 f"unwrapped model), then wrap it again")
        model = getattr(model, attr)
        notes.append(f"rewrote the model inside {name} (.{attr}); the result is not wrapped: wrap it again")
    return model, notes


# ---------------------------------------------------------------- loading, with normswap outputs replayed


def load_input(source: str | os.PathLike, *, arch: str | None = None, weights: str | os.PathLike | None = None,
               trust_pickle: bool = False, ema: bool = False, pretrained: bool | str = False) -> Loaded:
    """Any model input normswap accepts -> Loaded (see the README's "model inputs"); a normswap
    ``.safetensors`` output is rebuilt by replaying the rewrites its sidecar records."""
    text = os.fspath(source)
    if not (is_spec(text) and not os.path.exists(text)):
        path = Path(text)
        check_readable(path)
        side = sidecar_of(path)
        if side is not None:
            return replay(path, side)
    return load_model(source, arch=arch, weights=weights, trust_pickle=trust_pickle, ema=ema, pretrained=pretrained)


def load(source: str | os.PathLike, *, arch: str | None = None, trust_pickle: bool = False, **kw: Any) -> nn.Module:
    """Public ``normswap.load``: a spec, a checkpoint (with ``arch``), a normswap output, or a trusted pickle.

    ``pretrained=True`` (or a torchvision weights name) loads a spec's pretrained weights through timm or
    torchvision, with their caches."""
    return load_input(source, arch=arch, trust_pickle=trust_pickle, **kw).model


def replay(path: Path, side: dict) -> Loaded:
    """Rebuild a normswap output: architecture from its spec, the recorded recipes, then the weights."""
    spec = side.get("arch")
    if not spec:
        raise ModelLoadError(f"{sidecar_path(path)} does not say which architecture to rebuild")
    model = build_spec(spec, arch_args=side.get("arch_args"))
    input_size = side.get("input_size")
    for step in side.get("steps", []):
        if step.get("eval_mode"):
            model.eval()
        if "recipe" not in step:  # a step that changed only weights (recalibration): they are in the file
            continue
        model = rewrite(model, step["recipe"], inplace=True, input_size=tuple(input_size) if input_size else None,
                        **step.get("params", {})).model
        _expect_layers(model, step.get("layers"), path)
    from safetensors.torch import load_file

    sd = load_file(str(path))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # safetensors drops the second name of a tied tensor; it must be one of the model's aliases
    missing = [k for k in missing if not is_tied_alias(model, k, sd)]
    if missing or unexpected:
        raise ModelLoadError(f"{path} does not fit the replayed model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    steps = list(side.get("steps", []))
    return Loaded(model, "normswap", spec, path, [f"rebuilt {spec} with {len(steps)} recorded step(s) and loaded {path}"],
                  steps=steps, input_size=input_size, arch_args=side.get("arch_args"))


def _expect_layers(model: nn.Module, expected: dict | None, path: Path) -> None:
    if expected is None:
        return
    got = {n: type(m).__name__ for n, m in model.named_modules()}
    wrong = [p for p, t in expected.items() if got.get(p) != t]
    if wrong:
        raise ModelLoadError(
            f"replaying {sidecar_path(path)} gave a different model at {', '.join(wrong[:3])}",
            fix="load it with the normswap and timm versions that wrote it",
        )
