"""The contract between the engine and a replacement factory: what a factory sees and what it returns.

A factory reads one layer of the caller's model (``LayerContext``) and returns
the module to put in its place (``Built``). A factory that must change a
neighbouring layer too (a fold writes its BN into the conv next to it) declares
that as a ``NeighbourEdit``; only the engine decides whether the edit is made on
a private copy now or written into the live layer at commit (``low_memory``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from .errors import PlanError
from .fold_map import FoldLink
from .graph import DataFlow
from .recipe.model import Recipe, Rule


@dataclass(frozen=True)
class NeighbourEdit:
    """A change to another layer than the one being replaced.

    ``write(target, source)`` edits ``target`` in place and returns notes for the report. It reads the
    layer's original tensors from ``source``: ``target`` itself, except that parameters named in
    ``overwrites`` (which the write replaces whole) may be left uninitialized on ``target`` and read from
    the caller's layer instead, so a copy need not copy them first. ``in_place``: the write may run on the
    live layer at commit (``apply(low_memory=True)``); false when the write must see a private copy.
    """

    path: str
    write: Callable[[nn.Module, nn.Module], list[str]]
    note: str
    overwrites: tuple[str, ...] = ()
    in_place: bool = True


@dataclass(frozen=True)
class ParameterEdit:
    """A new value for one parameter of another layer, or of the model itself (a class token, a position
    embedding held by the model), where copying the module that holds it would copy the whole model.
    ``value(old)`` returns the new value (float64 is fine: it is rounded once into the parameter's dtype)."""

    path: str  # the module holding it ("" for the model itself)
    name: str
    value: Callable[[torch.Tensor], torch.Tensor]
    note: str


@dataclass
class Built:
    """What a factory returns: the new module, what the report says about it, and any neighbour edits."""

    module: nn.Module
    notes: list[str] = field(default_factory=list)
    carried: dict[str, str] = field(default_factory=dict)  # old local tensor name -> new local name
    edits: list[NeighbourEdit] = field(default_factory=list)
    fold_links: dict[str, FoldLink] = field(default_factory=dict)  # path -> how it lines up (verify/layerwise)
    # path -> the dtype of arithmetic the rewrite took out of that layer (a norm computing in float32 inside a
    # float64 model): the check's rounding floor moves those layers' tensors by that dtype's rounding step
    rounding: dict[str, torch.dtype] = field(default_factory=dict)
    parameter_edits: list[ParameterEdit] = field(default_factory=list)


class SkipLayer(Exception):
    """Raised by a factory when a target cannot work on this layer; the layer stays as it is."""

    def __init__(self, reason: str, *, quiet: bool = False):
        self.reason = reason
        self.quiet = quiet  # nothing to do here (e.g. bake on a plain layer): not listed as skipped
        super().__init__(reason)


@dataclass
class LayerContext:
    """What a replacement factory may read about the layer it is building for. Read only."""

    path: str  # the canonical path
    paths: list[str]  # every path the module is reachable at
    module: nn.Module  # the caller's module: read it, never change it
    options: dict[str, Any]  # the rule's options, resolved and type-checked
    carry: frozenset[str]  # what the rule carries (the replacement's default_carry unless the rule says)
    rule: Rule
    recipe: Recipe
    flow: DataFlow | None  # the recorded data flow, when the replacement needs analysis
    layers: Mapping[str, nn.Module] = field(repr=False, default_factory=dict)  # every path -> its module

    def layer(self, path: str) -> nn.Module:
        """The caller's module at ``path`` (any of its paths)."""
        return self.layers[path]

    def fail(self, message: str, fix: str | None = None) -> None:
        raise PlanError(
            f"recipe '{self.recipe.name}' {self.rule.label()}, layer '{self.path}' "
            f"({type(self.module).__name__}): {message}",
            fix=fix or f"change the rule in {self.recipe.source}",
        )

    def input_shape(self) -> tuple[int, ...] | None:
        """The input shape of the layer's first call in the recorded forward (None if unknown)."""
        shapes = self.input_shapes()
        return shapes[0] if shapes else None

    def input_shapes(self) -> list[tuple[int, ...]]:
        """The input shape of every call: a layer called twice may see two shapes."""
        if self.flow is None:
            return []
        try:
            n = self.flow.call_count(self.path)
            return [s for s in (self.flow.input_shape(self.path, i) for i in range(n)) if s is not None]
        except KeyError:
            return []
