"""The recipe as data: frozen Rule and Recipe, parameters bound, options resolved against the registry."""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from dataclasses import replace as dc_replace
from typing import Any, Mapping

from .. import registry
from ..errors import Problem, RecipeError
from ..match import Selector

VERSION = 1
MAX_RECIPE_BYTES = 1 << 20
MAX_NODES = 20_000
MAX_DEPTH = 40

RECIPE_KEYS = ("version", "name", "description", "params", "rules", "check")
RULE_KEYS = ("name", "match", "replace", "with", "carry", "required", "when", "calibrate")
MATCH_KEYS = ("family", "type", "path", "exclude", "channels", "include_subclasses")
CHANNEL_KEYS = ("min", "max")
CHECK_MODES = ("numeric", "interface", "none")
PARAM_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")


@dataclass(frozen=True)
class Rule:
    index: int
    name: str
    selector: Selector
    replace: str
    options: Mapping[str, Any]  # as written; "${p}" refers to a recipe parameter
    carry: tuple[str, ...] | None
    required: bool
    line: int | None
    template: Selector | None = None  # the match as written, "${p}" in path/exclude unresolved
    when: Any = True  # true, false, or "${p}" naming a true/false parameter: whether the rule is used
    calibrate: bool | None = None  # fit the new layers on calibration data: None = when data is given

    def bind(self, params: Mapping[str, Any]) -> "Rule":
        """This rule with ``${p}`` in its match's path/exclude replaced by the parameter's value."""
        template = self.template or self.selector

        def resolve(patterns: tuple[str, ...]) -> tuple[str, ...]:
            out: list[str] = []
            for pat in patterns:
                ref = PARAM_REF.match(pat)
                value = params.get(ref.group(1)) if ref else pat
                out.extend([value] if isinstance(value, str) else list(value or ()))
            return tuple(out)

        selector = dc_replace(template, paths=resolve(template.paths), exclude=resolve(template.exclude))
        return dc_replace(self, selector=selector, template=template)

    def match_params(self) -> list[str]:
        """Names of the parameters this rule's path/exclude refer to."""
        return self.path_params() + self.exclude_params()

    def path_params(self) -> list[str]:
        template = self.template or self.selector
        return [m.group(1) for p in template.paths if (m := PARAM_REF.match(p))]

    def exclude_params(self) -> list[str]:
        template = self.template or self.selector
        return [m.group(1) for p in template.exclude if (m := PARAM_REF.match(p))]

    def label(self) -> str:
        return f"rule {self.index + 1} ({self.name})" if self.name else f"rule {self.index + 1}"


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    version: int
    params: Mapping[str, Any]
    rules: tuple[Rule, ...]
    check: str
    source: str
    data: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)

    def with_params(self, overrides: Mapping[str, Any] | None) -> "Recipe":
        """The recipe with parameter values replaced; unknown names and bad values are errors."""
        if not overrides:
            self.resolved_options(allow_unset=True)  # still validate "${p}" values against their options
            return self._bound()
        problems = []
        for key in overrides:
            if key not in self.params:
                hint = registry.suggest(key, sorted(self.params)) if self.params else "it declares no params"
                problems.append(Problem(self.source, None, f"unknown parameter '{key}' for recipe '{self.name}'; {hint}"))
        if problems:
            raise RecipeError(problems)
        params = dict(self.params)
        params.update(overrides)
        data = copy.deepcopy(dict(self.data))
        data["params"] = params
        out = dc_replace(self, params=params, data=data)
        out.resolved_options(allow_unset=True)
        return out._bound()

    def _bound(self) -> "Recipe":
        """Rules with path parameters resolved and rules turned off by ``when:`` dropped.

        A path parameter must be a glob or a list of globs; a ``when`` parameter true or false.
        """
        problems = []
        active = []
        for rule in self.rules:
            ref = PARAM_REF.match(rule.when) if isinstance(rule.when, str) else None
            value = self.params.get(ref.group(1)) if ref else rule.when
            if not isinstance(value, bool):
                problems.append(Problem(self.source, rule.line, f"{rule.label()}: parameter '{ref.group(1)}' is used "
                                        f"as the rule's 'when', so it must be true or false, got {value!r}"))
            elif value:
                active.append(rule)
        for rule in active:
            for name in rule.match_params():
                value = self.params.get(name)
                empty_ok = name not in rule.path_params()  # excluding nothing is fine; selecting nothing is not
                ok = (isinstance(value, str) and value) or (
                    isinstance(value, list) and (value or empty_ok) and all(isinstance(x, str) and x for x in value))
                if not ok:
                    what = "a glob or a list of globs" + (" (possibly empty)" if empty_ok else "")
                    problems.append(Problem(self.source, rule.line, f"{rule.label()}: parameter '{name}' is used as "
                                            f"a path glob, so it must be {what}, got {value!r}"))
        if problems:
            raise RecipeError(problems)
        return dc_replace(self, rules=tuple(r.bind(self.params) for r in active))

    def resolved_options(self, *, allow_unset: bool = False) -> list[dict[str, Any]]:
        """Each rule's options with parameters substituted and defaults filled in, type-checked.

        A parameter declared ``null`` for an option that needs a value must be set by the
        caller; ``allow_unset`` defers that (listing or validating a recipe is not using it).
        """
        out, problems = [], []
        for rule in self.rules:
            repl = registry.get(rule.replace)
            opts = repl.defaults()
            for key, value in rule.options.items():
                ref = PARAM_REF.match(value) if isinstance(value, str) else None
                if ref:
                    value = self.params[ref.group(1)]
                opt = repl.option(key)
                if ref and value is None and opt is not None and not opt.nullable:
                    if not allow_unset:
                        name = ref.group(1)
                        problems.append(Problem(self.source, rule.line, f"parameter '{name}' has no default and must "
                                                f"be set: --set {name}=... or {name}=... in Python"))
                    continue
                why = opt.problem(value) if opt else None
                if why:
                    via = f" (from parameter '{ref.group(1)}')" if ref else ""
                    problems.append(Problem(self.source, rule.line, f"{rule.label()}: {why}{via}"))
                opts[key] = value
            out.append(opts)
        if problems:
            raise RecipeError(problems)
        return out

    def to_data(self) -> dict:
        return copy.deepcopy(dict(self.data))
