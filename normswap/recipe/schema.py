"""JSON Schema for recipe files, generated from the same tables the validator uses."""
from __future__ import annotations

import json

from .. import registry
from ..families import family_classes
from .model import CHECK_MODES, PARAM_REF, VERSION

# ---------------------------------------------------------------- JSON Schema


def recipe_schema() -> dict:
    """JSON Schema for recipe files, generated from the same tables the validator uses."""
    str_or_list = {"oneOf": [{"type": "string", "minLength": 1}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]}
    param_ref = {"type": "string", "pattern": PARAM_REF.pattern}
    conditionals = []
    for name in registry.names():
        repl = registry.get(name)
        props = {o.name: {"anyOf": [o.json_schema(), param_ref]} for o in repl.options}
        conditionals.append({
            "if": {"properties": {"replace": {"const": repl.name}}, "required": ["replace"]},
            "then": {"properties": {
                "with": {"type": "object", "properties": props, "additionalProperties": False},
                "carry": _carry_schema(repl.carries),
            }},
        })
    rule = {
        "type": "object",
        "additionalProperties": False,
        "required": ["match", "replace"],
        "properties": {
            "name": {"type": "string"},
            "match": {
                "type": "object",
                "additionalProperties": False,
                "minProperties": 1,
                "properties": {
                    "family": {"oneOf": [{"enum": list(family_classes())},
                                         {"type": "array", "items": {"enum": list(family_classes())}, "minItems": 1}]},
                    "type": str_or_list,
                    "path": str_or_list,
                    "exclude": str_or_list,
                    "channels": {"oneOf": [
                        {"type": "integer", "minimum": 1},
                        {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 1},
                        {"type": "object", "additionalProperties": False,
                         "properties": {"min": {"type": "integer", "minimum": 1}, "max": {"type": "integer", "minimum": 1}}},
                    ]},
                    "include_subclasses": {"type": "boolean"},
                },
            },
            "replace": {"enum": registry.names()},
            "with": {"type": "object"},
            "carry": {},
            "required": {"type": "boolean"},
            "when": {"anyOf": [{"type": "boolean"}, param_ref]},
            "calibrate": {"type": "boolean"},
        },
        "allOf": conditionals,
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "normswap recipe",
        "type": "object",
        "additionalProperties": False,
        "required": ["version", "rules"],
        "properties": {
            "version": {"const": VERSION},
            "name": {"type": "string", "minLength": 1},
            "description": {"type": "string"},
            "params": {"type": "object", "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]*$"}},
            "rules": {"type": "array", "minItems": 1, "items": rule},
            "check": {"enum": list(CHECK_MODES),
                      "description": "how apply checks the result; default: numeric when every rule's replacement "
                                     "keeps the eval-mode function (" + ", ".join(
                                         r for r in registry.names() if registry.get(r).keeps_function)
                                     + "), else interface"},
        },
    }


def _carry_schema(carries: tuple[str, ...]) -> dict | bool:
    """What ``carry:`` may say for a replacement: its carries and ``none``; nothing at all (the key is refused,
    as the validator refuses it) for one that carries no state by choice (``carries=()``)."""
    if not carries:
        return False
    allowed = {"enum": list(carries) + ["none"]}
    return {"oneOf": [allowed, {"type": "array", "items": allowed, "minItems": 1}]}


def schema_text() -> str:
    return json.dumps(recipe_schema(), indent=2, sort_keys=True) + "\n"
