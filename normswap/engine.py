"""Plan, then apply.

``plan`` reads the model and builds every replacement module up front, so every
way a rewrite can fail happens before anything is edited. ``apply`` then swaps
the prepared modules into the module tree (of a copy, or of the model itself
with ``inplace=True``); the swap is plain attribute assignment on parents that
were all looked up first, so it cannot stop halfway.
"""
from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn as nn

from . import registry
from .errors import NormswapError, PlanError
from .graph import DataFlow, record
from .inputs import make_inputs
from .module_copy import deepcopy_module
from .recipe import Recipe, Rule, load_recipe
from .registry import Built, SkipLayer


@dataclass
class LayerContext:
    """What a replacement factory may read about the layer it is building for."""

    path: str
    paths: list[str]
    module: nn.Module  # the caller's module: read it, never change it
    options: dict[str, Any]
    carry: frozenset[str]
    rule: Rule
    recipe: Recipe
    flow: DataFlow | None
    model: nn.Module = field(repr=False, default=None)
    prepared: dict = field(repr=False, default_factory=dict)  # canonical path -> Change planned so far
    defer_edits: bool = False  # edit other layers at commit, in place, instead of planning edited copies
    by_path: dict[str, nn.Module] = field(repr=False, default_factory=dict)  # every path of the model -> its module

    def layer(self, path: str) -> nn.Module:
        """The caller's module at ``path`` (any of its paths): a lookup, where ``get_submodule`` walks."""
        found = self.by_path.get(path)
        return found if found is not None else self.model.get_submodule(path)

    def editable(self, path: str, uninitialized: tuple[str, ...] = ()) -> nn.Module:
        """A private copy of another layer to edit (the planned one if an earlier rule already replaced it).

        ``uninitialized``: names of parameters the caller will overwrite whole; the copy gets new,
        uninitialized ones of the same shape, dtype and device instead of copies (one memory pass
        less per weight). Ignored for a layer already planned.
        """
        if path in self.prepared:
            return self.prepared[path].new
        live = self.layer(path)
        memo: dict[int, Any] = {}
        for name in uninitialized:
            p = live._parameters.get(name)
            if p is not None:
                memo[id(p)] = nn.Parameter(torch.empty_like(p, memory_format=torch.preserve_format),
                                           requires_grad=p.requires_grad)
        return deepcopy_module(live, memo)

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


@dataclass
class Change:
    rule: Rule
    path: str
    aliases: list[str]
    old: nn.Module = field(repr=False)
    new: nn.Module = field(repr=False)
    notes: list[str]
    carried: dict[str, str]
    edits: list = field(default_factory=list)  # in-place edits of ``old`` itself, run at commit (defer_edits)

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
    links: dict[str, dict] = field(default_factory=dict)  # the rewrite's map for per-layer checks (folds)

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


def _plan(model: nn.Module, recipe: Recipe | Mapping | str, *, example_inputs: Any, input_size: tuple[int, ...] | None,
          flow: DataFlow | None, defer_edits: bool, **params: Any) -> Plan:
    if not isinstance(model, nn.Module):
        raise NormswapError(f"expected a torch.nn.Module, got {type(model).__name__}", code="model_load")
    recipe = load_recipe(recipe, params)
    options = recipe.resolved_options()
    repls = [registry.get(r.replace) for r in recipe.rules]

    if flow is None and any(r.needs_analysis for r in repls):
        inputs = example_inputs if example_inputs is not None else make_inputs(model, input_size)
        flow = record(model, inputs)

    prepared: dict[str, Change] = {}  # canonical path -> Change, in planning order
    skipped: list[Skip] = []
    walk = module_paths(model)
    paths_of = {id(m): p for m, p in walk}
    by_path = {path: m for m, paths in walk for path in paths}
    counts = [0] * len(recipe.rules)
    replaced: set[str] = set()
    links: dict[str, dict] = {}
    plan_notes: list[str] = []
    errors: list[PlanError] = []
    for module, paths in walk:
        if (_under(paths[0], replaced) and paths[0] not in replaced) or paths[0] in prepared:
            continue  # inside a layer being replaced as a whole, or already replaced by an earlier rule
        rule_i = next((i for i, r in enumerate(recipe.rules) if r.selector.matches(module, paths)), None)
        if rule_i is None:
            for r in recipe.rules:
                why = r.selector.near_miss(module) if r.selector.path_matches(paths) else None
                if why:
                    skipped.append(Skip(paths[0], type(module).__name__, why, r.label()))
                    break
            continue
        rule, repl = recipe.rules[rule_i], repls[rule_i]
        counts[rule_i] += 1
        if paths[0] == "":
            skipped.append(Skip("(model)", type(module).__name__, "the model itself cannot be replaced", rule.label()))
            continue
        ctx = LayerContext(
            path=paths[0], paths=paths, module=module, options=dict(options[rule_i]),
            carry=frozenset(rule.carry if rule.carry is not None else repl.default_carry),
            rule=rule, recipe=recipe, flow=flow, model=model, prepared=prepared, defer_edits=defer_edits,
            by_path=by_path,
        )
        try:
            built: Built = repl.build(ctx)
        except SkipLayer as s:
            if not s.quiet:
                skipped.append(Skip(paths[0], type(module).__name__, s.reason, rule.label()))
            continue
        except NormswapError as e:
            errors.append(e if isinstance(e, PlanError) else PlanError(str(e)))
            continue
        except Exception as e:  # a factory that could not handle this layer
            errors.append(PlanError(
                f"recipe '{recipe.name}' {rule.label()}: {repl.name} failed on layer '{paths[0]}' "
                f"({type(module).__name__}): {type(e).__name__}: {e}",
                fix="exclude this layer with 'exclude:' in the rule's match",
            ))
            continue
        prepared[paths[0]] = Change(rule, paths[0], paths, module, built.module, built.notes, built.carried)
        replaced.update(paths)
        links.update(built.links)
        plan_notes.extend(n for n in built.plan_notes if n not in plan_notes)
        for path, edit, notes in built.edits:
            if path in prepared:
                prepared[path].edits.append(edit)
                prepared[path].notes.extend(notes)
            else:
                live = ctx.layer(path)
                same = {n: n for n, _ in live.named_parameters()}
                prepared[path] = Change(rule, path, paths_of[id(live)], live, live, list(notes), same, edits=[edit])
        for path, new, notes in built.also:
            if path in prepared:
                prepared[path].new = new
                prepared[path].notes.extend(notes)
            else:
                old = ctx.layer(path)
                same = {n: n for n, _ in old.named_parameters()}  # an edited copy keeps its names
                prepared[path] = Change(rule, path, paths_of[id(old)], old, new, list(notes), same)

    for rule, n in zip(recipe.rules, counts):
        if rule.required and n == 0:
            errors.append(PlanError(
                f"recipe '{recipe.name}' {rule.label()} is required but matched no layer of "
                f"{type(model).__name__}",
                fix=f"check its match block at {recipe.source}" + (f":{rule.line}" if rule.line else "")
                + ", or set 'required: false'",
            ))
    if errors:
        if len(errors) == 1:
            raise errors[0]
        raise PlanError(f"{len(errors)} problems:\n" + "\n".join(f"  - {e}" for e in errors))
    return Plan(recipe, type(model).__name__, list(prepared.values()), skipped, list(zip(recipe.rules, counts)),
                notes=plan_notes, links=links)


def _locate(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if attr not in parent._modules:
        raise AttributeError(path)
    return parent, attr


def commit(model: nn.Module, plan_: Plan) -> list[tuple[nn.Module, str, nn.Module]]:
    """Swap the prepared modules into ``model``; returns (parent, attr, old) for rollback."""
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
            slots.append((parent, attr, current, ch.new))
    for parent, attr, _, new in slots:  # assignment only: nothing here can fail halfway
        parent._modules[attr] = new
    done: list[str] = []
    for ch in plan_.changes:  # deferred edits (low_memory): tensor writes on live layers, validated in the plan
        for edit in ch.edits:
            try:
                edit(ch.new)
            except Exception as e:
                raise PlanError(f"the in-place edit of layer '{ch.path}' failed ({type(e).__name__}: {e}) after "
                                f"{len(done)} layer(s) were written ({', '.join(done[:5]) or 'none'}): the model "
                                "is partly edited", fix="reload the model; without low_memory the edits are "
                                "prepared on copies and nothing is written unless all succeed") from None
        if ch.edits:
            done.append(ch.path)
    return [(parent, attr, old) for parent, attr, old, _ in slots]


def rollback(undo: list[tuple[nn.Module, str, nn.Module]]) -> None:
    for parent, attr, old in reversed(undo):
        parent._modules[attr] = old


def copied_with(model: nn.Module, plan_: Plan) -> nn.Module:
    """A copy of ``model`` with the plan's changes in it; ``model`` is not touched.

    The replaced modules are not copied at all: the deep copy is told to use the
    prepared ones in their place, so a fold does not copy every conv weight twice.
    """
    if any(ch.edits for ch in plan_.changes):
        raise PlanError("a plan with deferred in-place edits can only be committed to the model itself")
    memo: dict[int, Any] = {id(ch.old): ch.new for ch in plan_.changes}
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
        raise NormswapError(
            f"cannot copy {type(model).__name__} to rewrite it: {type(e).__name__}: {e}",
            fix="pass inplace=True to rewrite the model itself",
            code="model_copy",
        ) from None
