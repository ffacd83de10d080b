"""The public functions: apply, plan, check, load, list_recipes."""
from __future__ import annotations

from typing import Any, Mapping

import torch.nn as nn

from .errors import InputSpecError
from .families import family_of
from .recipe import Recipe, list_recipes, load_recipe
from .report import Report
from .rewrite import load, rewrite
from .verify.check import CheckResult
from .verify.check import check as run_check

__all__ = ["apply", "plan", "fold", "bake", "migrate", "check", "load", "list_recipes"]


def plan(model: nn.Module, recipe: Recipe | Mapping | str, **kwargs: Any) -> Report:
    """What ``apply`` would do, as a Report, without touching ``model``."""
    return rewrite(model, recipe, dry_run=True, **kwargs).report


def apply(
    model: nn.Module,
    recipe: Recipe | Mapping | str,
    *,
    inplace: bool = False,
    return_report: bool = False,
    check: bool = False,
    example_inputs: Any = None,
    input_size: tuple[int, ...] | None = None,
    calibration: Any = None,
    calibration_fit: str = "least_squares",
    calibration_groups: str | float = "keep",
    low_memory: bool = False,
    **params: Any,
):
    """Rewrite ``model`` by ``recipe`` (a built-in name, a YAML path, a dict or a Recipe).

    Returns a rewritten copy, or ``model`` itself with ``inplace=True``; with
    ``return_report=True`` a ``(model, Report)`` pair. Recipe parameters are
    keyword arguments (``num_groups=16``). With ``check=True`` the recipe's
    check runs on the result; if it fails, CheckFailedError is raised and the
    caller's model is left as it was. Any error leaves the caller's model unchanged.
    ``low_memory=True`` (with ``inplace=True, check=False``): a fold writes each conv in
    place at commit instead of preparing a copy of it, for models near the memory limit.
    ``calibration``: batches (a list of input tensors) on which each new normalization
    layer's affine is fitted so the swapped model starts where the original was
    (``normswap.passes.calibration``; ``calibration_fit`` picks the fit); the report's
    ``calibration`` entry says how much of the original function survived. Under an
    initialized torch.distributed process group every process calls ``apply`` with its own
    shard of the batches (at least one) and all get the same model, bit for bit.
    """
    if calibration is not None:
        calibration = list(calibration)
        if example_inputs is None and input_size is None and calibration:
            example_inputs = calibration[0]  # the data says what the model takes
    done = rewrite(model, recipe, inplace=inplace, check=check, example_inputs=example_inputs, input_size=input_size,
                   calibration=calibration, calibration_fit=calibration_fit, calibration_groups=calibration_groups,
                   low_memory=low_memory, **params)
    return (done.model, done.report) if return_report else done.model


def check(reference: nn.Module, candidate: nn.Module, inputs: Any = None, **kwargs: Any) -> CheckResult:
    """Compare two models; see normswap.verify.check.check for the options."""
    return run_check(reference, candidate, inputs, **kwargs)


def recipe(ref: Recipe | Mapping | str, **params: Any) -> Recipe:
    """Load and validate a recipe without applying it."""
    return load_recipe(ref, params)


def fold(
    model: nn.Module,
    *,
    inplace: bool = False,
    return_report: bool = False,
    check: bool = True,
    example_inputs: Any = None,
    input_size: tuple[int, ...] | None = None,
    low_memory: bool = False,
    **params: Any,
):
    """Fold eval-mode BatchNorms into their conv/linear layers: ``apply(model, "fold_bn", check=True)``.

    BatchNorms in train mode normalize with batch statistics and cannot fold: as torch's
    ``fuse_conv_bn_eval`` does, this refuses them (NormswapError naming them): call ``model.eval()``
    first. The numeric check runs by default; a failure raises CheckFailedError and leaves ``model``
    as it was.
    """
    training = [path or "(model)" for path, m in model.named_modules()
                if m.training and family_of(m) == "batchnorm" and getattr(m, "running_mean", None) is not None]
    if training:
        raise InputSpecError(f"fold: {len(training)} BatchNorm layer(s) are in train mode, where they normalize "
                             f"with batch statistics and cannot fold: {', '.join(training[:4])}"
                             + (", ..." if len(training) > 4 else ""),
                             fix="call model.eval() first (timm and torchvision models start in train mode)")
    return apply(model, "fold_bn", inplace=inplace, return_report=return_report, check=check,
                 example_inputs=example_inputs, input_size=input_size, low_memory=low_memory, **params)


def bake(model: nn.Module, *, inplace: bool = False, return_report: bool = False, check: bool = True,
         example_inputs: Any = None, input_size: tuple[int, ...] | None = None):
    """Replace every spectral/weight-norm parametrization by its eval-mode value: ``apply(model, "bake")``.

    The result pickles, exports and folds; its eval-mode output is the original's.
    """
    return apply(model, "bake", inplace=inplace, return_report=return_report, check=check,
                 example_inputs=example_inputs, input_size=input_size)


def migrate(state_dict: Mapping[str, Any], to: str | None = None) -> dict:
    """A state dict with its spectral/weight-norm keys renamed between torch's formats.

    ``to``: "parametrized" (torch.nn.utils.parametrizations) or "legacy" (the old
    ``weight_orig``/``weight_u``/``weight_v`` and ``weight_g``/``weight_v`` hooks); by
    default the other one from what ``state_dict`` holds. See the table in ``normswap/norm_keys.py``.
    """
    from .norm_keys import convert, detect

    found = detect(state_dict)
    if found is None:
        raise InputSpecError("the state dict has no spectral-norm or weight-norm keys to rename",
                             fix="pass the state dict of a spectral- or weight-normalized model")
    converted, _ = convert(state_dict, to or ("parametrized" if found == "legacy" else "legacy"))
    return dict(converted)
