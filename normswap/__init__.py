"""normswap: model surgery for normalization layers.

    import normswap
    model = normswap.apply(model, "bn_to_gn")
"""
from . import catalog  # noqa: F401  (registers the built-in replacements)
from ._version import __version__
from .api import apply, bake, check, fold, list_recipes, load, migrate, plan, recipe
from .catalog.weight_norms import power_iteration_buffers
from .errors import (
    CheckFailedError,
    ModelLoadError,
    NormswapError,
    PlanError,
    RecipeError,
)
from .graph import DataFlow, record
from .passes.recalibration import RecalibrationReport, recalibrate
from .privacy import prepare_for_opacus
from .report import Report
from .verify.check import CheckResult

__all__ = [
    "apply", "plan", "fold", "bake", "migrate", "check", "load", "list_recipes", "recipe", "record",
    "prepare_for_opacus", "power_iteration_buffers", "recalibrate", "RecalibrationReport",
    "NormswapError", "RecipeError", "PlanError", "ModelLoadError", "CheckFailedError",
    "CheckResult", "DataFlow", "Report", "__version__",
]
