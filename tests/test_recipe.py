"""Recipes: validation with file:line, suggestions, params, the JSON Schema."""
from importlib import resources

import jsonschema
import pytest
import yaml

import normswap
from normswap.errors import RecipeError
from normswap.recipe import list_recipes, load_recipe, recipe_schema, schema_text


def recipe_file(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


GOOD = """\
version: 1
name: mine
rules:
  - match: {family: batchnorm}
    replace: group_norm
    with: {num_groups: 8}
"""


def test_builtin_found_by_bare_name():
    r = load_recipe("bn_to_gn")
    assert r.name == "bn_to_gn" and r.check == "interface"
    assert "bn_to_gn" in normswap.list_recipes()


def test_file_recipe_parses(tmp_path):
    r = load_recipe(str(recipe_file(tmp_path, GOOD)))
    assert r.rules[0].replace == "group_norm"
    assert r.resolved_options()[0]["num_groups"] == 8
    assert r.resolved_options()[0]["min_group_size"] == 4  # default filled in


def test_every_problem_reported_at_once_with_lines(tmp_path):
    text = """\
version: 1
name: bad
rules:
  - match: {familly: batchnorm}
    replace: group_norm
    with: {num_group: 8}
  - match: {family: batchnorm}
    replace: groop_norm
"""
    with pytest.raises(RecipeError) as e:
        load_recipe(str(recipe_file(tmp_path, text)))
    msgs = [str(p) for p in e.value.problems]
    assert len(msgs) == 4, msgs
    assert any("r.yaml:4" in m and "'familly'" in m and "did you mean 'family'" in m for m in msgs)
    assert any("r.yaml:6" in m and "'num_group'" in m and "did you mean 'num_groups'" in m for m in msgs)
    assert any("r.yaml:8" in m and "groop_norm" in m and "did you mean 'group_norm'" in m for m in msgs)


def test_yaml_syntax_error_has_line(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(str(recipe_file(tmp_path, "version: 1\nrules: [\n  - {match: \n")))
    assert "YAML syntax error" in str(e.value) and "r.yaml:" in str(e.value)


@pytest.mark.parametrize("text, needle", [
    ("rules: []\n", "missing 'version'"),
    ("version: 2\nrules: []\n", "unsupported version 2"),
    ("version: 1\nrules: []\n", "non-empty list"),
    ("version: 1\n", "missing 'rules'"),
    ("version: 1\nrules:\n  - replace: group_norm\n", "missing 'match'"),
    ("version: 1\nrules:\n  - match: {}\n    replace: group_norm\n", "at least one of"),
    ("version: 1\nrules:\n  - match: {family: batchnorm}\n    replace: group_norm\n    with: {num_groups: 0}\n", "at least 1"),
    ("version: 1\nrules:\n  - match: {family: batchnorm}\n    replace: group_norm\n    with: {num_groups: -3}\n", "at least 1"),
    ("version: 1\nrules:\n  - match: {family: batchnorm}\n    replace: group_norm\n    with: {num_groups: many}\n", "must be integer"),
    ("version: 1\nrules:\n  - match: {family: layernorm}\n    replace: group_norm\n", "applies to batchnorm"),
    ("version: 1\nrules:\n  - match: {family: batchnorm}\n    replace: group_norm\n    required: yes please\n", "true or false"),
    ("version: 1\ncheck: maybe\nrules:\n  - match: {family: batchnorm}\n    replace: group_norm\n", "'check' must be one of"),
    ("version: 1\nrules:\n  - match: {family: batchnorm}\n    replace: group_norm\n    carry: stats\n", "cannot carry 'stats'"),
    ("version: 1\nrules:\n  - match: {family: batchnorm}\n    replace: group_norm\n    with:\n      num_groups: ${n}\n", "undeclared parameter"),
    ("version: 1\nrules:\n  - match: {family: batchnorm, channels: {min: 9, max: 3}}\n    replace: group_norm\n", "above max"),
    ("version: 1\nversion: 1\nrules: []\n", "duplicate key"),
    ("- just\n- a list\n", "must be a mapping"),
    ("", "empty"),
])
def test_bad_recipes(tmp_path, text, needle):
    with pytest.raises(RecipeError) as e:
        load_recipe(str(recipe_file(tmp_path, text)))
    assert needle in str(e.value)


def test_alias_bomb_is_bounded(tmp_path):
    lines = ["version: 1", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [*a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}]")
    with pytest.raises(RecipeError) as e:
        load_recipe(str(recipe_file(tmp_path, "\n".join(lines) + "\n")))
    assert "too large" in str(e.value)


def test_unknown_builtin_suggests():
    with pytest.raises(normswap.NormswapError) as e:
        load_recipe("bn_to_gm")
    assert "did you mean 'bn_to_gn'" in str(e.value)


def test_params_override_and_validation():
    r = load_recipe("bn_to_gn", {"num_groups": 16})
    assert r.resolved_options()[0]["num_groups"] == 16
    with pytest.raises(RecipeError) as e:
        load_recipe("bn_to_gn", {"num_group": 16})
    assert "did you mean 'num_groups'" in str(e.value)
    with pytest.raises(RecipeError) as e:
        load_recipe("bn_to_gn", {"num_groups": 0})
    assert "at least 1" in str(e.value) and "parameter 'num_groups'" in str(e.value)


def test_dict_recipe():
    r = load_recipe(yaml.safe_load(GOOD))
    assert r.name == "mine"


def test_schema_shipped_matches_generator_and_accepts_builtins():
    shipped = (resources.files("normswap") / "recipe.schema.json").read_text()
    assert shipped == schema_text(), "regenerate with: normswap schema > normswap/recipe.schema.json"
    schema = recipe_schema()
    for name in list_recipes():
        text = (resources.files("normswap.recipes") / f"{name}.yaml").read_text()
        jsonschema.validate(yaml.safe_load(text), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"version": 1, "rules": [{"match": {"family": "batchnorm"}, "replace": "group_norm",
                                                      "with": {"num_group": 3}}]}, schema)
