"""Recipes: YAML -> validated, frozen plain data (model.py), parsed from files (parse.py), described by a JSON
Schema (schema.py)."""
from .model import CHECK_MODES, PARAM_REF, Recipe, Rule
from .parse import (
           builtin_dir,
           list_recipes,
           load_recipe,
           parse_data,
           parse_text,
           read_recipe_file,
)
from .schema import recipe_schema, schema_text

__all__ = ["CHECK_MODES", "PARAM_REF", "Recipe", "Rule", "builtin_dir", "list_recipes", "load_recipe",
           "parse_data", "parse_text", "read_recipe_file", "recipe_schema", "schema_text"]
