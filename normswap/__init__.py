"""normswap: model surgery for normalization layers.

    import normswap
    model = normswap.apply(model, "bn_to_gn")
"""
__version__ = "0.1.0"

from .errors import CheckFailedError, ModelLoadError, NormswapError, PlanError, RecipeError  # noqa: E402
from .api import apply, bake, check, fold, list_recipes, load, migrate, plan, recipe  # noqa: E402
from .weight_norms import power_iteration_buffers  # noqa: E402
from .check import CheckResult  # noqa: E402
from .graph import DataFlow, record  # noqa: E402
from .privacy import prepare_for_opacus  # noqa: E402
from .recalibration import RecalibrationReport, recalibrate  # noqa: E402
from .report import Report  # noqa: E402

__all__ = [
    "apply", "plan", "fold", "bake", "migrate", "check", "load", "list_recipes", "recipe", "record",
    "prepare_for_opacus", "power_iteration_buffers", "recalibrate", "RecalibrationReport",
    "NormswapError", "RecipeError", "PlanError", "ModelLoadError", "CheckFailedError",
    "CheckResult", "DataFlow", "Report", "__version__",
]
