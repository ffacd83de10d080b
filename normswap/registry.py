"""Replacement registry: a name -> a factory that builds the new module for one layer.

Names are normalised (case, ``_`` and ``-`` ignored), so ``group_norm``,
``GroupNorm`` and ``group-norm`` are the same replacement. Each replacement
declares its options; the recipe validator and the JSON Schema read them from
here, so the three can never disagree.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

from .errors import RegistryError

Factory = Callable[..., Any]  # (LayerContext) -> Built; see factory.py

_KINDS = {int: "integer", float: "number", bool: "boolean", str: "string", dict: "object", list: "array"}


@dataclass(frozen=True)
class Option:
    """One option a replacement takes under a rule's ``with:``."""

    name: str
    kind: type | tuple[type, ...]
    default: Any
    doc: str
    nullable: bool = False
    minimum: float | None = None
    choices: tuple[Any, ...] = ()

    def kinds(self) -> tuple[type, ...]:
        return self.kind if isinstance(self.kind, tuple) else (self.kind,)

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not acceptable, or None."""
        if value is None:
            return None if self.nullable else f"'{self.name}' may not be null"
        kinds = self.kinds()
        ok = any(
            isinstance(value, k) and not (k in (int, float) and isinstance(value, bool)) for k in kinds
        ) or (float in kinds and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            want = " or ".join(_KINDS[k] for k in kinds)
            return f"'{self.name}' must be {want}, got {type(value).__name__} {value!r}"
        if self.minimum is not None and isinstance(value, (int, float)) and value < self.minimum:
            return f"'{self.name}' must be at least {self.minimum}, got {value!r}"
        if self.choices and value not in self.choices:
            return f"'{self.name}' must be one of {', '.join(map(str, self.choices))}; got {value!r}"
        return None

    def json_schema(self) -> dict:
        types = [_KINDS[k] for k in self.kinds()]
        if self.nullable:
            types.append("null")
        schema: dict[str, Any] = {"type": types if len(types) > 1 else types[0], "description": self.doc}
        if self.minimum is not None:
            schema["minimum"] = self.minimum
        if self.choices:
            schema["enum"] = list(self.choices)
        return schema


@dataclass(frozen=True)
class Replacement:
    name: str
    build: Factory
    options: tuple[Option, ...]
    families: tuple[str, ...]
    carries: tuple[str, ...]
    default_carry: tuple[str, ...]
    doc: str
    needs_analysis: bool = False
    # said once in the report when the replacement changed any layer; a callable gets the LayerContext and
    # returns the note or None (a note that depends on the model, such as "nothing to untie")
    note: str | Callable[[Any], str | None] | None = None
    keeps_function: bool = False  # the eval-mode output is unchanged: a recipe of these is checked numerically

    def option(self, name: str) -> Option | None:
        return next((o for o in self.options if o.name == name), None)

    def defaults(self) -> dict[str, Any]:
        return {o.name: o.default for o in self.options}


_REGISTRY: dict[str, Replacement] = {}


def normalise(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def register(
    name: str,
    *,
    options: tuple[Option, ...] = (),
    families: tuple[str, ...] = (),
    carries: tuple[str, ...] = (),
    default_carry: tuple[str, ...] | None = None,
    doc: str = "",
    needs_analysis: bool = False,
    note: str | Callable[[Any], str | None] | None = None,
    keeps_function: bool = False,
) -> Callable[[Factory], Factory]:
    """Register a factory (LayerContext -> Built, see factory.py) under ``name``."""

    def deco(fn: Factory) -> Factory:
        key = normalise(name)
        if key in _REGISTRY:
            raise RegistryError(f"replacement {name!r} registered twice",
                                fix="give the new replacement another name")
        _REGISTRY[key] = Replacement(
            name=name,
            build=fn,
            options=options,
            families=families,
            carries=carries,
            default_carry=tuple(carries if default_carry is None else default_carry),
            doc=doc,
            needs_analysis=needs_analysis,
            note=note,
            keeps_function=keeps_function,
        )
        return fn

    return deco


def names() -> list[str]:
    return sorted(r.name for r in _REGISTRY.values())


def lookup(name: str) -> Replacement | None:
    return _REGISTRY.get(normalise(name))


def get(name: str) -> Replacement:
    found = lookup(name)
    if found is None:
        raise RegistryError(f"unknown replacement {name!r}", fix=suggest(name, names()))
    return found


def suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.5)
    if close:
        return f"did you mean '{close[0]}'? (valid: {', '.join(choices)})"
    return f"valid: {', '.join(choices)}"
