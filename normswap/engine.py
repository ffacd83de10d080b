"""Plan, then apply.

``plan`` reads the model and builds every replacement module up front, so every
way a rewrite can fail happens before anything is edited. ``apply`` then swaps
the prepared modules into the module tree (of a copy, or of the model itself
with ``inplace=True``); the swap is plain attribute assignment on parents that
were all looked up first, so it cannot stop halfway.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import gc
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn

from . import registry
from .errors import ModelLoadError, NormswapError, PlanError
from .factory import LayerContext, NeighbourEdit, SkipLayer
from .fold_map import FoldLink
from .graph import DataFlow, record
from .inputs import make_inputs
from .match import glob_match
from .module_copy import deepcopy_module
from .recipe import Recipe, Rule, load_recipe


@dataclass
class Change:
    rule: Rule
    path: str
    aliases: list[str]
    old: nn.Module = field(repr=False)
    new: nn.Module = field(repr=False)
    notes: list[str]
    carried: dict[str, str]
    deferred: list[NeighbourEdit] = field(default_factory=list)  # written into ``old`` itself at commit (low_memory)
    edited: bool = False  # a neighbour another rule's replacement edited (the conv a BN folded into)

    @property
    def old_type(self) -> str:
        return type(self.old).__name__

    @property
    def new_type(self) -> str:
        return type(self.new).__name__


@dataclass
class Skip:
    path: str
    type: str
    reason: str
    rule: str | None = None


@dataclass
class Plan:
    """A dry run: every change with its prepared module, every skip with its reason."""

    recipe: Recipe
    model_type: str
    changes: list[Change]
    skipped: list[Skip]
    rule_matches: list[tuple[Rule, int]]
    notes: list[str] = field(default_factory=list)
    fold_map: dict[str, FoldLink] = field(default_factory=dict)  # how folded layers line up, for per-layer checks
    rounding: dict[str, torch.dtype] = field(default_factory=dict)  # see Built.rounding
    # (module path, parameter name) -> its new value (factory.ParameterEdit): swapped in at commit, mapped in copies
    parameters: dict[tuple[str, str], nn.Parameter] = field(default_factory=dict)

    def param_map(self, model: nn.Module) -> dict[str, str | None]:
        """Old parameter name -> new name (None where the parameter is gone), for the whole model."""
        moved: dict[str, str | None] = {}
        for ch in self.changes:
            new_names = {n for n, _ in ch.new.named_parameters()}
            for local, _ in ch.old.named_parameters():
                target = ch.carried.get(local, local if "." in local else None)
                moved[f"{ch.path}.{local}"] = (
                    f"{ch.path}.{target}" if target is not None and target in new_names else None
                )
        return {name: moved.get(name, name) for name, _ in model.named_parameters()}

    def new_params(self) -> list[str]:
        out = []
        for ch in self.changes:
            carried = set(ch.carried.values())
            for local, _ in ch.new.named_parameters():
                if local not in carried and not ("." in local and hasattr(ch.old, local.split(".")[0])):
                    out.append(f"{ch.path}.{local}")
        return out


def module_paths(model: nn.Module) -> list[tuple[nn.Module, list[str]]]:
    """Each distinct module once, with every path it is reachable at (first = canonical)."""
    seen: dict[int, tuple[nn.Module, list[str]]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        entry = seen.get(id(mod))
        if entry is None:
            seen[id(mod)] = (mod, [name])
        else:
            entry[1].append(name)
    return list(seen.values())


def _under(path: str, prefixes: set[str]) -> bool:
    """``path`` is one of ``prefixes`` or inside one: O(depth), not O(len(prefixes))."""
    parts = path.split(".")
    return any(".".join(parts[:i]) in prefixes for i in range(1, len(parts) + 1))


def plan(
    model: nn.Module,
    recipe: Recipe | Mapping | str,
    *,
    example_inputs: Any = None,
    input_size: tuple[int, ...] | None = None,
    flow: DataFlow | None = None,
    defer_edits: bool = False,
    **params: Any,
) -> Plan:
    """Everything ``apply`` would do, without touching ``model``.

    ``defer_edits`` (``apply(low_memory=True)``): a replacement that edits a
    neighbour (a fold writing into a conv) computes only what the edit needs and
    leaves the tensor work to ``commit``, on the live layer: no copy of each
    edited layer is held. The commit can then fail halfway (out of memory), so
    this is opt-in.
    """
    with gc_paused():
        return _plan(model, recipe, example_inputs=example_inputs, input_size=input_size, flow=flow,
                     defer_edits=defer_edits, **params)


class _Planner:
    """One planning pass: each module goes to the first rule that matches it; factories build, edits are made."""

    def __init__(self, model: nn.Module, recipe: Recipe, flow: DataFlow | None, defer_edits: bool):
        self.model, self.recipe, self.flow, self.defer_edits = model, recipe, flow, defer_edits
        self.options = recipe.resolved_options()
        self.replacements = [registry.get(r.replace) for r in recipe.rules]
        self.walk = module_paths(model)
        self.paths_of = {id(m): p for m, p in self.walk}
        self.layers = {path: m for m, paths in self.walk for path in paths}
        self.prepared: dict[str, Change] = {}  # canonical path -> Change, in planning order
        self.skipped: list[Skip] = []
        self.counts = [0] * len(recipe.rules)
        self.replaced: set[str] = set()
        self.fold_map: dict[str, FoldLink] = {}
        self.rounding: dict[str, torch.dtype] = {}
        self.parameters: dict[tuple[str, str], nn.Parameter] = {}
        self.notes: list[str] = []
        self.errors: list[NormswapError] = []

    def run(self) -> Plan:
        for module, paths in self.walk:
            if (_under(paths[0], self.replaced) and paths[0] not in self.replaced) or paths[0] in self.prepared:
                continue  # inside a layer being replaced as a whole, or already replaced by an earlier rule
            rule_i = next((i for i, r in enumerate(self.recipe.rules) if r.selector.matches(module, paths)), None)
            if rule_i is None:
                self._near_miss(module, paths)
            else:
                self.counts[rule_i] += 1
                self._build(rule_i, module, paths)
        self._required_rules()
        self._likely_typos()
        if self.errors:
            if len(self.errors) == 1:
                raise self.errors[0]
            raise PlanError(f"{len(self.errors)} problems:\n" + "\n".join(f"  - {e}" for e in self.errors))
        return Plan(self.recipe, type(self.model).__name__, list(self.prepared.values()), self.skipped,
                    list(zip(self.recipe.rules, self.counts)), notes=self.notes, fold_map=self.fold_map,
                    rounding=self.rounding, parameters=self.parameters)

    def _near_miss(self, module: nn.Module, paths: list[str]) -> None:
        for r in self.recipe.rules:
            why = r.selector.near_miss(module) if r.selector.path_matches(paths) else None
            if why:
                self.skipped.append(Skip(paths[0], type(module).__name__, why, r.label()))
                return

    def _build(self, rule_i: int, module: nn.Module, paths: list[str]) -> None:
        rule, repl = self.recipe.rules[rule_i], self.replacements[rule_i]
        if paths[0] == "":
            self.skipped.append(Skip("(model)", type(module).__name__, "the model itself cannot be replaced",
                                     rule.label()))
            return
        ctx = LayerContext(
            path=paths[0], paths=paths, module=module, options=dict(self.options[rule_i]),
            carry=frozenset(rule.carry if rule.carry is not None else repl.default_carry),
            rule=rule, recipe=self.recipe, flow=self.flow, layers=self.layers,
        )
        built = self._attempt(lambda: repl.build(ctx), rule, repl.name, module, paths)
        if built is None:
            return
        self.prepared[paths[0]] = Change(rule, paths[0], paths, module, built.module, built.notes, built.carried)
        self.replaced.update(paths)
        self.fold_map.update(built.fold_links)
        self.rounding.update(built.rounding)
        for edit in built.parameter_edits:
            self._parameter_edit(edit)
        note = repl.note(ctx) if callable(repl.note) else repl.note
        if note and note not in self.notes:
            self.notes.append(note)
        for edit in built.edits:
            self._attempt(lambda: self._edit(rule, edit), rule, repl.name, module, paths)

    def _attempt(self, step: Callable[[], Any], rule: Rule, name: str, module: nn.Module, paths: list[str]) -> Any:
        """Run one factory step; a problem is collected (every problem of every rule is raised at once)."""
        try:
            return step()
        except SkipLayer as s:
            if not s.quiet:
                self.skipped.append(Skip(paths[0], type(module).__name__, s.reason, rule.label()))
        except NormswapError as e:
            self.errors.append(e)
        except Exception as e:  # a factory that could not handle this layer
            self.errors.append(PlanError(
                f"recipe '{self.recipe.name}' {rule.label()}: {name} failed on layer '{paths[0]}' "
                f"({type(module).__name__}): {type(e).__name__}: {e}",
                fix="exclude this layer with 'exclude:' in the rule's match",
            ))
        return None

    def _edit(self, rule: Rule, edit: NeighbourEdit) -> None:
        """Make a factory's neighbour edit: on a private copy now, or (low_memory) on the live layer at commit."""
        planned = self.prepared.get(edit.path)
        if planned is not None:
            if planned.deferred:
                planned.deferred.append(edit)
                planned.notes.append(edit.note)
            else:  # already a private module of the plan's: edit it further
                planned.notes.extend(edit.write(planned.new, planned.new) + [edit.note])
            return
        live = self.layers[edit.path]
        same = {n: n for n, _ in live.named_parameters()}  # an edited layer keeps its parameter names
        change = Change(rule, edit.path, self.paths_of[id(live)], live, live, [], same, edited=True)
        if self.defer_edits and edit.in_place:
            change.deferred.append(edit)
            change.notes.append(edit.note)
        else:
            change.new = _private_copy(live, edit.overwrites)
            change.notes.extend(edit.write(change.new, live) + [edit.note])
        self.prepared[edit.path] = change

    def _parameter_edit(self, edit) -> None:
        """A new parameter holding ``edit.value`` of the live one (rounded once into its dtype); the live one
        is untouched until commit."""
        key = (edit.path, edit.name)
        if key in self.parameters:
            return  # the same parameter edited twice by one plan: the first edit stands
        owner = self.layers[edit.path] if edit.path else self.model
        old = owner._parameters.get(edit.name)
        if old is None:
            raise PlanError(f"'{edit.path or type(self.model).__name__}' has no parameter '{edit.name}' to edit")
        with torch.no_grad():
            new = nn.Parameter(edit.value(old.detach()).to(old.dtype), requires_grad=old.requires_grad)
        self.parameters[key] = new
        self.notes.append(f"{'.'.join(p for p in key if p)}: {edit.note}")

    def _required_rules(self) -> None:
        for rule, n in zip(self.recipe.rules, self.counts):
            if rule.required and n == 0:
                self.errors.append(PlanError(
                    f"recipe '{self.recipe.name}' {rule.label()} is required but matched no layer of "
                    f"{type(self.model).__name__}",
                    fix=f"check its match block at {self.recipe.source}" + (f":{rule.line}" if rule.line else "")
                    + ", or set 'required: false'",
                ))


    def _likely_typos(self) -> None:
        """A ``type:`` naming no class anywhere, or a ``path:`` list none of whose globs selects any module, is
        almost certainly a typo: an error with the nearest names. Anything else that matches nothing (a class
        this model lacks, a family it has none of) stays a note in the report."""
        known = None  # the class names to compare with, gathered only when a rule names a type
        paths = list(self.layers)
        for rule in self.recipe.rules:
            where = f"{self.recipe.source}" + (f":{rule.line}" if rule.line else "")
            for name in rule.selector.types:
                known = known if known is not None else _known_class_names(m for m, _ in self.walk)
                if name not in known and not _importable_class(name):
                    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
                    hint = f"did you mean '{close[0]}'? " if close else ""
                    self.errors.append(PlanError(
                        f"recipe '{self.recipe.name}' {rule.label()}: type '{name}' names no class of "
                        f"{type(self.model).__name__}, torch.nn, timm.layers or normswap.layers",
                        fix=f"{hint}(at {where}; class names are case-sensitive)", code="likely_typo"))
            globs = rule.selector.paths
            if globs and not any(glob_match(g, p) for g in globs for p in paths if p):
                near = sorted({c for g in globs for c in difflib.get_close_matches(g, paths, n=3, cutoff=0.5)})
                self.errors.append(PlanError(
                    f"recipe '{self.recipe.name}' {rule.label()}: no module of {type(self.model).__name__} is at "
                    f"path {', '.join(repr(g) for g in globs)}",
                    fix=(f"nearest paths: {', '.join(near[:3])}; " if near else "")
                    + f"paths are dotted module names, * one segment, ** any (at {where})", code="likely_typo"))


@functools.cache
def _library_class_names() -> frozenset[str]:
    import timm.layers

    from . import layers

    return frozenset(n for ns in (nn, timm.layers, layers) for n in dir(ns) if isinstance(getattr(ns, n, None), type))


def _known_class_names(modules: Iterable[nn.Module]) -> set[str]:
    names = set(_library_class_names())
    for cls in {type(m) for m in modules}:
        for c in cls.__mro__:
            names.update((c.__name__, f"{c.__module__}.{c.__qualname__}"))
    return names


def _importable_class(name: str) -> bool:
    """``package.module.Class`` that imports: a class this model does not use, not a typo."""
    module, _, attr = name.rpartition(".")
    if not module:
        return False
    try:
        return isinstance(getattr(importlib.import_module(module), attr, None), type)
    except Exception:  # noqa: BLE001 - not importable: then it is no class anywhere
        return False


def _private_copy(live: nn.Module, overwrites: tuple[str, ...]) -> nn.Module:
    """A copy of ``live`` to edit; the parameters named in ``overwrites`` are new and uninitialized (the edit
    writes them whole, reading the originals from ``live``): one memory pass less per weight."""
    memo: dict[int, Any] = {}
    for name in overwrites:
        p = live._parameters.get(name)
        if p is not None:
            memo[id(p)] = nn.Parameter(torch.empty_like(p, memory_format=torch.preserve_format),
                                       requires_grad=p.requires_grad)
    return deepcopy_module(live, memo)


def _plan(model: nn.Module, recipe: Recipe | Mapping | str, *, example_inputs: Any, input_size: tuple[int, ...] | None,
          flow: DataFlow | None, defer_edits: bool, **params: Any) -> Plan:
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"expected a torch.nn.Module, got {type(model).__name__}")
    recipe = load_recipe(recipe, params)
    if flow is None and any(registry.get(r.replace).needs_analysis for r in recipe.rules):
        inputs = example_inputs if example_inputs is not None else make_inputs(model, input_size)
        flow = record(model, inputs)
    return _Planner(model, recipe, flow, defer_edits).run()

def _locate(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if attr not in parent._modules:
        raise AttributeError(path)
    return parent, attr


def commit(model: nn.Module, plan_: Plan) -> list[tuple[dict, str, Any]]:
    """Swap the prepared modules (and edited parameters) into ``model``; returns (table, key, old) for
    rollback, where table is a module's ``_modules`` or ``_parameters``."""
    slots = []
    for ch in plan_.changes:
        for path in ch.aliases:
            try:
                parent, attr = _locate(model, path)
            except AttributeError:
                raise PlanError(f"layer '{path}' is not in the model the plan is applied to") from None
            current = parent._modules[attr]
            if type(current) is not type(ch.old):
                raise PlanError(
                    f"layer '{path}' is a {type(current).__name__}, the plan expected {ch.old_type}: "
                    "the model changed since it was planned"
                )
            slots.append((parent._modules, attr, current, ch.new))
    for (path, name), new in plan_.parameters.items():
        owner = model.get_submodule(path) if path else model
        slots.append((owner._parameters, name, owner._parameters[name], new))
    for table, key, _, new in slots:  # assignment only: nothing here can fail halfway
        table[key] = new
    done: list[str] = []
    for ch in plan_.changes:  # deferred edits (low_memory): tensor writes on live layers, validated in the plan
        for edit in ch.deferred:
            try:
                edit.write(ch.new, ch.new)
            except Exception as e:
                raise PlanError(f"the in-place edit of layer '{ch.path}' failed ({type(e).__name__}: {e}) after "
                                f"{len(done)} layer(s) were written ({', '.join(done[:5]) or 'none'}): the model "
                                "is partly edited", fix="reload the model; without low_memory the edits are "
                                "prepared on copies and nothing is written unless all succeed") from None
        if ch.deferred:
            done.append(ch.path)
    return [(table, key, old) for table, key, old, _ in slots]


def rollback(undo: list[tuple[dict, str, Any]]) -> None:
    for table, key, old in reversed(undo):
        table[key] = old


def copied_with(model: nn.Module, plan_: Plan) -> nn.Module:
    """A copy of ``model`` with the plan's changes in it; ``model`` is not touched.

    The replaced modules are not copied at all: the deep copy is told to use the
    prepared ones in their place, so a fold does not copy every conv weight twice.
    """
    if any(ch.deferred for ch in plan_.changes):
        raise PlanError("a plan with deferred in-place edits can only be committed to the model itself")
    memo: dict[int, Any] = {id(ch.old): ch.new for ch in plan_.changes}
    for (path, name), new in plan_.parameters.items():  # the copy takes the new parameter for the old one
        owner = model.get_submodule(path) if path else model
        memo[id(owner._parameters[name])] = new
    return copy_model(model, memo)


@contextlib.contextmanager
def gc_paused():
    """The cyclic garbage collector off for a bounded burst of allocations (a copy, a recorded forward,
    the plan's factories): they allocate objects by the hundred thousand, and each collection they
    trigger rescans every object the model holds (quadratic in the model's size)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def copy_model(model: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """A deep copy, with the garbage collector paused."""
    try:
        with gc_paused():
            return deepcopy_module(model, memo)
    except Exception as e:
        raise PlanError(
            f"cannot copy {type(model).__name__} to rewrite it: {type(e).__name__}: {e}",
            fix="pass inplace=True to rewrite the model itself",
            code="model_copy",
        ) from None
