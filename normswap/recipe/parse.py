"""Recipes from YAML: found by name or path, composed with line numbers, validated all at once.

Every problem in a recipe is collected and raised at once as a RecipeError, each
with its file and line. Option names and types come from the replacement registry.
"""
from __future__ import annotations

import copy
import functools
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from .. import registry
from ..errors import NormswapError, Problem, RecipeError, RecipeFileError, RecipeNotFoundError
from ..families import family_classes
from ..match import ChannelRange, Selector
from .model import (
    CHANNEL_KEYS,
    CHECK_MODES,
    MATCH_KEYS,
    MAX_DEPTH,
    MAX_NODES,
    MAX_RECIPE_BYTES,
    PARAM_REF,
    RECIPE_KEYS,
    RULE_KEYS,
    VERSION,
    Recipe,
    Rule,
)

# ---------------------------------------------------------------- finding recipes


def builtin_dir():
    return resources.files("normswap.recipes")


def list_recipes() -> list[str]:
    """Names of the built-in recipes."""
    return sorted(p.name[:-5] for p in builtin_dir().iterdir() if p.name.endswith(".yaml"))


def load_recipe(ref: "Recipe | Mapping | str | os.PathLike", params: Mapping[str, Any] | None = None) -> Recipe:
    """A Recipe from a Recipe, a dict, a built-in name or a YAML file path, with ``params`` applied."""
    if isinstance(ref, Recipe):
        recipe = ref
    elif isinstance(ref, Mapping):
        recipe = parse_data(dict(ref), source="<recipe dict>", lines={})
    elif isinstance(ref, (str, os.PathLike)):
        recipe = _load_named(os.fspath(ref))
    else:
        raise NormswapError(f"a recipe must be a name, a path, a dict or a Recipe, not {type(ref).__name__}")
    return recipe.with_params(params)


def _load_named(ref: str) -> Recipe:
    looks_like_path = ref.endswith((".yaml", ".yml")) or os.sep in ref or "/" in ref
    if not looks_like_path:
        if ref in list_recipes():
            entry = builtin_dir() / f"{ref}.yaml"
            return _parse_builtin(entry.read_text(encoding="utf-8"), ref)
        if not os.path.exists(ref):
            raise RecipeNotFoundError(
                f"no built-in recipe named '{ref}' and no such file",
                fix=registry.suggest(ref, list_recipes()) + "; or give a path to a YAML recipe",
            )
    return read_recipe_file(ref)


@functools.lru_cache(maxsize=64)
def _parse_builtin(text: str, name: str) -> Recipe:
    """Built-in recipes are parsed once per text: a Recipe is frozen, and the parse is most of a small fold."""
    return parse_text(text, source=f"<built-in {name}>")


def read_recipe_file(path: str) -> Recipe:
    p = Path(path)
    if not p.exists():
        raise RecipeNotFoundError(f"recipe file {path} does not exist", fix="check the path")
    if p.is_dir():
        raise RecipeNotFoundError(f"recipe {path} is a directory, not a YAML file")
    try:
        size = p.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeFileError(
                f"recipe {path} is {size} bytes; recipes are limited to {MAX_RECIPE_BYTES} bytes",
            )
        raw = p.read_bytes()
    except OSError as e:
        raise RecipeNotFoundError(f"cannot read recipe {path}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError([Problem(path, None, f"not UTF-8 text (byte {e.start})")]) from None
    return parse_text(text, source=path)


# ---------------------------------------------------------------- YAML with line numbers


def parse_text(text: str, source: str) -> Recipe:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = mark.line + 1 if mark is not None else None
        what = getattr(e, "problem", None) or str(e)
        raise RecipeError([Problem(source, line, f"YAML syntax error: {what}")]) from None
    if node is None:
        raise RecipeError([Problem(source, None, "the recipe is empty")])
    lines: dict[tuple, int] = {}
    problems: list[Problem] = []
    data = _Converter(source, lines, problems).convert(node, ())
    if problems:
        raise RecipeError(problems)
    return parse_data(data, source, lines)


_PLAIN_TAGS = {"map", "seq", "str", "int", "float", "bool", "null", "timestamp"}


class _Converter:
    """YAML node tree -> plain data, recording the line of every key; bounded against alias bombs."""

    def __init__(self, source: str, lines: dict, problems: list):
        self.source, self.lines, self.problems = source, lines, problems
        self.loader = yaml.SafeLoader("")
        self.count = 0

    def convert(self, node, path: tuple, depth: int = 0):
        self.count += 1
        if self.count > MAX_NODES or depth > MAX_DEPTH:
            if self.count == MAX_NODES + 1 or depth == MAX_DEPTH + 1:
                self.problems.append(Problem(
                    self.source, node.start_mark.line + 1,
                    f"recipe too large or too deeply nested (over {MAX_NODES} values or {MAX_DEPTH} levels; "
                    "aliases are expanded)",
                ))
            return None
        if not node.tag.startswith("tag:yaml.org,2002:") or node.tag.rsplit(":", 1)[1] not in _PLAIN_TAGS:
            self.problems.append(Problem(self.source, node.start_mark.line + 1,
                                         f"YAML tag {node.tag!r} is not allowed: a recipe is plain data"))
            return None
        if isinstance(node, yaml.MappingNode):
            out = {}
            for knode, vnode in node.value:
                line = knode.start_mark.line + 1
                if not isinstance(knode, yaml.ScalarNode):
                    self.problems.append(Problem(self.source, line, "mapping keys must be plain names"))
                    continue
                key = self.loader.construct_object(knode)
                if not isinstance(key, str):
                    key = str(key)
                if key in out:
                    self.problems.append(Problem(self.source, line, f"duplicate key '{key}'"))
                self.lines[path + (key,)] = line
                out[key] = self.convert(vnode, path + (key,), depth + 1)
            return out
        if isinstance(node, yaml.SequenceNode):
            out_list = []
            for i, item in enumerate(node.value):
                self.lines[path + (i,)] = item.start_mark.line + 1
                out_list.append(self.convert(item, path + (i,), depth + 1))
            return out_list
        try:
            return self.loader.construct_object(node)
        except yaml.YAMLError as e:
            self.problems.append(Problem(self.source, node.start_mark.line + 1, f"bad value: {e}"))
            return None


# ---------------------------------------------------------------- validation


class _Validator:
    def __init__(self, source: str, lines: dict):
        self.source, self.lines = source, lines
        self.problems: list[Problem] = []

    def line(self, path: tuple) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None

    def add(self, path: tuple, message: str) -> None:
        self.problems.append(Problem(self.source, self.line(path), message))

    def keys(self, data: dict, allowed: tuple[str, ...], path: tuple, what: str) -> None:
        for key in data:
            if key not in allowed:
                self.add(path + (key,), f"unknown key '{key}' in {what}; {registry.suggest(key, list(allowed))}")

    def str_list(self, value, path: tuple, what: str) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(isinstance(v, str) and v for v in items):
            self.add(path, f"{what} must be a non-empty string or a list of them, got {value!r}")
            return ()
        return tuple(items)


def parse_data(data: Any, source: str, lines: dict) -> Recipe:
    v = _Validator(source, lines)
    if not isinstance(data, dict):
        raise RecipeError([Problem(source, 1 if lines is not None else None, "a recipe must be a mapping with 'version' and 'rules'")])
    v.keys(data, RECIPE_KEYS, (), "the recipe")

    version = data.get("version")
    if "version" not in data:
        v.add((), f"missing 'version'; add 'version: {VERSION}'")
    elif version != VERSION or isinstance(version, bool):
        v.add(("version",), f"unsupported version {version!r}; this normswap reads version {VERSION}")

    name = data.get("name", Path(source).stem if not source.startswith("<") else "recipe")
    if not isinstance(name, str) or not name:
        v.add(("name",), f"'name' must be a non-empty string, got {name!r}")
        name = "recipe"
    description = data.get("description", "")
    if not isinstance(description, str):
        v.add(("description",), "'description' must be a string")
        description = ""

    params = data.get("params") or {}
    if not isinstance(params, dict):
        v.add(("params",), f"'params' must be a mapping of name: default, got {type(params).__name__}")
        params = {}
    for key in params:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            v.add(("params", key), f"parameter name '{key}' must be an identifier")

    check = data.get("check")
    if check is not None and check not in CHECK_MODES:
        v.add(("check",), f"'check' must be one of {', '.join(CHECK_MODES)}; got {check!r}")

    rules_data = data.get("rules")
    rules: list[Rule] = []
    if "rules" not in data:
        v.add((), "missing 'rules': a recipe needs at least one rule")
    elif not isinstance(rules_data, list) or not rules_data:
        v.add(("rules",), "'rules' must be a non-empty list of rules")
    else:
        used_params: set[str] = set()
        for i, rd in enumerate(rules_data):
            rule = _parse_rule(v, rd, i, params, used_params)
            if rule is not None:
                rules.append(rule)
    if v.problems:
        raise RecipeError(v.problems)
    if check is None:  # numeric only when every rule keeps the eval-mode function (a fold, a frozen BN, ...)
        check = "numeric" if all(registry.get(r.replace).keeps_function for r in rules) else "interface"
    recipe = Recipe(
        name=name,
        description=description,
        version=VERSION,
        params=dict(params),
        rules=tuple(rules),
        check=check,
        source=source,
        data=copy.deepcopy(data),
    )
    recipe.resolved_options(allow_unset=True)
    return recipe


def _parse_rule(v: _Validator, rd: Any, i: int, params: dict, used: set) -> Rule | None:
    path = ("rules", i)
    if not isinstance(rd, dict):
        v.add(path, f"rule {i + 1} must be a mapping with 'match' and 'replace'")
        return None
    v.keys(rd, RULE_KEYS, path, f"rule {i + 1}")
    label = f"rule {i + 1}"
    rname = rd.get("name", "")
    if not isinstance(rname, str):
        v.add(path + ("name",), f"{label}: 'name' must be a string")
        rname = ""

    selector = _parse_match(v, rd.get("match"), path + ("match",), label, "match" in rd)
    for key in ("path", "exclude"):
        for pat in (selector.paths if key == "path" else selector.exclude) if selector else ():
            _param_ref(v, pat, path + ("match", key), label, params, used)

    repl = _parse_replace(v, rd, path, label)
    options = rd.get("with") or {}
    if not isinstance(options, dict):
        v.add(path + ("with",), f"{label}: 'with' must be a mapping of options")
        options = {}
    if repl is not None:
        _check_options(v, repl, options, path, label, params, used)
        if selector is not None and selector.families and repl.families:
            wrong = [f for f in selector.families if f not in repl.families]
            if wrong:
                v.add(path + ("match",), f"{label}: {repl.name} applies to {', '.join(repl.families)} layers, not {', '.join(wrong)}")
    carry = _parse_carry(v, rd, repl, path, label)
    required, when, calibrate = _parse_flags(v, rd, path, label, params, used)
    if selector is None or repl is None:
        return None
    return Rule(
        index=i, name=rname, selector=selector, replace=repl.name, options=dict(options),
        carry=carry, required=required, line=v.line(path), when=when, calibrate=calibrate,
    )


def _param_ref(v: _Validator, value: Any, path: tuple, label: str, params: dict, used: set) -> bool:
    """Whether ``value`` is a ``${name}`` reference; an undeclared one is a problem, a declared one is used."""
    ref = PARAM_REF.match(value) if isinstance(value, str) else None
    if ref is None:
        return False
    if ref.group(1) not in params:
        v.add(path, f"{label}: '{value}' refers to an undeclared parameter; declare it under 'params:'")
    else:
        used.add(ref.group(1))
    return True


def _parse_replace(v: _Validator, rd: dict, path: tuple, label: str) -> registry.Replacement | None:
    if "replace" not in rd:
        v.add(path, f"{label}: missing 'replace' (one of {', '.join(registry.names())})")
        return None
    if not isinstance(rd["replace"], str):
        v.add(path + ("replace",), f"{label}: 'replace' must be a replacement name")
        return None
    repl = registry.lookup(rd["replace"])
    if repl is None:
        v.add(path + ("replace",), f"{label}: unknown replacement '{rd['replace']}'; {registry.suggest(rd['replace'], registry.names())}")
    return repl


def _check_options(v: _Validator, repl: registry.Replacement, options: dict, path: tuple, label: str, params: dict,
                   used: set) -> None:
    valid = [o.name for o in repl.options]
    for key, value in options.items():
        opt = repl.option(key)
        if opt is None:
            hint = registry.suggest(key, valid) if valid else f"'{repl.name}' takes no options"
            v.add(path + ("with", key), f"{label}: unknown option '{key}' for {repl.name}; {hint}")
        elif not _param_ref(v, value, path + ("with", key), label, params, used) and (why := opt.problem(value)):
            v.add(path + ("with", key), f"{label}: {why}")


def _parse_carry(v: _Validator, rd: dict, repl: registry.Replacement | None, path: tuple,
                 label: str) -> tuple[str, ...] | None:
    """The rule's ``carry:`` (None: the replacement's default). A replacement that carries nothing by choice
    (``carries=()``) takes no ``carry:`` at all, ``none`` included: it could not honour it."""
    if "carry" not in rd:
        return None
    items = v.str_list(rd["carry"], path + ("carry",), f"{label}: 'carry'")
    if repl is not None and not repl.carries:
        v.add(path + ("carry",), f"{label}: {repl.name} does not take 'carry', not even 'none': what it keeps is "
                                 "fixed; remove the 'carry' key")
    elif repl is not None:
        allowed = list(repl.carries) + ["none"]
        for c in items:
            if c not in allowed:
                v.add(path + ("carry",), f"{label}: {repl.name} cannot carry '{c}'; {registry.suggest(c, allowed)}")
    return tuple(c for c in items if c != "none")


def _parse_flags(v: _Validator, rd: dict, path: tuple, label: str, params: dict, used: set) -> tuple[bool, Any, Any]:
    """``required``, ``when`` and ``calibrate``."""
    required = rd.get("required", False)
    if not isinstance(required, bool):
        v.add(path + ("required",), f"{label}: 'required' must be true or false, got {required!r}")
        required = False
    when = rd.get("when", True)
    if not _param_ref(v, when, path + ("when",), label, params, used) and not isinstance(when, bool):
        v.add(path + ("when",), f"{label}: 'when' must be true, false or a parameter like ${{drop}}, got {when!r}")
        when = True
    calibrate = rd.get("calibrate")
    if calibrate is not None and not isinstance(calibrate, bool):
        v.add(path + ("calibrate",), f"{label}: 'calibrate' must be true or false, got {calibrate!r}")
        calibrate = None
    return required, when, calibrate


def _parse_match(v: _Validator, md: Any, path: tuple, label: str, present: bool) -> Selector | None:
    if not present:
        v.add(path[:-1], f"{label}: missing 'match' (e.g. match: {{family: batchnorm}})")
        return None
    if not isinstance(md, dict) or not md:
        v.add(path, f"{label}: 'match' must be a mapping with at least one of {', '.join(MATCH_KEYS[:5])}")
        return None
    v.keys(md, MATCH_KEYS, path, f"{label} match")
    families: tuple[str, ...] = ()
    if "family" in md:
        families = v.str_list(md["family"], path + ("family",), f"{label}: 'family'")
        known = list(family_classes())
        for f in families:
            if f not in known:
                v.add(path + ("family",), f"{label}: unknown family '{f}'; {registry.suggest(f, known)}")
    types = v.str_list(md["type"], path + ("type",), f"{label}: 'type'") if "type" in md else ()
    paths = v.str_list(md["path"], path + ("path",), f"{label}: 'path'") if "path" in md else ()
    exclude = v.str_list(md["exclude"], path + ("exclude",), f"{label}: 'exclude'") if "exclude" in md else ()
    channels = _parse_channels(v, md["channels"], path + ("channels",), label) if "channels" in md else None
    inc = md.get("include_subclasses", False)
    if not isinstance(inc, bool):
        v.add(path + ("include_subclasses",), f"{label}: 'include_subclasses' must be true or false")
        inc = False
    if not (families or types or paths or channels):
        v.add(path, f"{label}: 'match' needs at least one of family, type, path or channels")
    return Selector(families, types, paths, exclude, channels, inc)


def _parse_channels(v: _Validator, cd: Any, path: tuple, label: str) -> ChannelRange | None:
    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool) and x > 0

    if is_int(cd):
        return ChannelRange(values=(cd,))
    if isinstance(cd, list) and cd and all(is_int(x) for x in cd):
        return ChannelRange(values=tuple(cd))
    if isinstance(cd, dict) and cd:
        v.keys(cd, CHANNEL_KEYS, path, f"{label} channels")
        lo, hi = cd.get("min"), cd.get("max")
        if (lo is not None and not is_int(lo)) or (hi is not None and not is_int(hi)):
            v.add(path, f"{label}: channels min/max must be positive integers")
            return None
        if lo is not None and hi is not None and lo > hi:
            v.add(path, f"{label}: channels min {lo} is above max {hi}")
            return None
        return ChannelRange(min=lo, max=hi)
    v.add(path, f"{label}: 'channels' must be a positive integer, a list of them, or {{min: N, max: M}}")
    return None
