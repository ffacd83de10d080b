"""Errors a user can cause. Every one derives from NormswapError and says where and how to fix it."""
from __future__ import annotations

from dataclasses import dataclass


class NormswapError(Exception):
    """A problem with the user's input: a recipe, a model, a path, an option.

    ``code`` is stable and machine-readable (the CLI puts it in ``--json`` errors);
    the message names the file, rule or layer and, where one exists, the fix.
    """

    code = "error"

    def __init__(self, message: str, *, fix: str | None = None, code: str | None = None):
        self.message = message
        self.fix = fix
        if code is not None:
            self.code = code
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return self.message if not self.fix else f"{self.message}\n  fix: {self.fix}"

    def to_json(self) -> dict:
        return {"code": self.code, "message": self.message, "fix": self.fix}


@dataclass(frozen=True)
class Problem:
    """One problem found in a recipe, with the place it was found."""

    source: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        return f"{where}: {self.message}"


class RecipeError(NormswapError):
    """Every problem in one recipe, reported at once."""

    code = "recipe_invalid"

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        n = len(self.problems)
        head = f"recipe has {n} problem{'s' if n != 1 else ''}:"
        super().__init__("\n".join([head] + [f"  {p}" for p in self.problems]))

    def to_json(self) -> dict:
        out = super().to_json()
        out["problems"] = [{"source": p.source, "line": p.line, "message": p.message} for p in self.problems]
        return out


class RecipeFileError(NormswapError):
    """A recipe file that cannot be read as a recipe at all (too large, a directory, unreadable)."""

    code = "recipe_invalid"


class RecipeNotFoundError(RecipeFileError):
    code = "recipe_not_found"


class RegistryError(NormswapError):
    """A replacement name that is unknown, or registered twice."""

    code = "registry"


class ModelLoadError(NormswapError):
    code = "model_load"


class UnsafePickleError(ModelLoadError):
    code = "unsafe_pickle"


class PlanError(NormswapError):
    """A rewrite that cannot be carried out on this model (raised before anything is edited)."""

    code = "plan_failed"


class OutputError(NormswapError):
    code = "output_invalid"


class InputSpecError(NormswapError):
    code = "input_invalid"


class CheckFailedError(NormswapError):
    """The rewritten model failed the check the recipe asked for; the caller's model is unchanged."""

    code = "check_failed"

    def __init__(self, message: str, result=None, report=None, fix: str | None = None):
        self.result = result
        self.report = report
        super().__init__(message, fix=fix)
