"""Hostile and broken inputs: every one is exit 2 (NormswapError in Python) with a message that names the
problem and where, no traceback, no output file, and the input left as it was."""
import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import normswap
from normswap.cli import main
from normswap.errors import NormswapError

from models import ConvBN

CORPUS = Path(__file__).parent / "bad_recipes"

# file -> (what the message must say, where: the file and line it must point at; None: the file alone)
RECIPES = {
    "01_yaml_syntax": ("YAML syntax error", 5),
    "02_tab_indent": ("found character '\\t' that cannot start any token", 3),
    "03_top_level_list": ("a recipe must be a mapping with 'version' and 'rules'", 1),
    "04_top_level_scalar": ("a recipe must be a mapping with 'version' and 'rules'", 1),
    "05_empty": ("the recipe is empty", None),
    "06_no_version": ("missing 'version'; add 'version: 1'", None),
    "07_version_2": ("unsupported version 2; this normswap reads version 1", 1),
    "08_no_rules": ("missing 'rules': a recipe needs at least one rule", None),
    "09_empty_rules": ("'rules' must be a non-empty list of rules", 2),
    "10_rules_not_list": ("'rules' must be a non-empty list of rules", 2),
    "11_rule_not_mapping": ("rule 1 must be a mapping with 'match' and 'replace'", 3),
    "12_unknown_top_key": ("unknown key 'rulez' in the recipe; did you mean 'rules'?", 2),
    "13_unknown_rule_key": ("unknown key 'replce' in rule 1; did you mean 'replace'?", 4),
    "14_unknown_replacement": ("unknown replacement 'groop_norm'; did you mean 'group_norm'?", 4),
    "15_missing_match": ("rule 1: missing 'match'", 3),
    "16_empty_match": ("'match' must be a mapping with at least one of", 3),
    "17_unknown_family": ("unknown family 'batchnrom'; did you mean 'batchnorm'?", 3),
    "18_unknown_match_key": ("unknown key 'paths' in rule 1 match; did you mean 'path'?", 3),
    "19_unknown_option": ("unknown option 'num_group' for group_norm; did you mean 'num_groups'?", 5),
    "20_option_wrong_type": ("'num_groups' must be integer, got str 'eight'", 5),
    "21_option_below_minimum": ("'num_groups' must be at least 1, got 0", 5),
    "22_option_bad_choice": ("'over' must be one of chw, c; got 'everything'", 5),
    "23_undeclared_param": ("'${groups}' refers to an undeclared parameter", 5),
    "24_param_bad_default": ("'num_groups' must be integer, got str 'many' (from parameter 'groups')", 4),
    "25_impossible_groups": ("3 groups on 16 channels", None),
    "26_required_matches_nothing": ("is required but matched no layer of ConvBN", 3),
    "27_unknown_check_mode": ("'check' must be one of numeric, interface, none; got 'numerik'", 5),
    "28_unknown_carry": ("group_norm cannot carry 'afine'; did you mean 'affine'?", 5),
    "29_python_tag": ("YAML tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed", 3),
    "30_alias_bomb": ("recipe too large or too deeply nested", 2),
    "31_when_not_bool": ("'when' must be true, false or a parameter", 5),
    "32_calibrate_not_bool": ("'calibrate' must be true or false, got 1", 5),
    "33_name_not_string": ("'name' must be a non-empty string", 2),
    "34_params_not_mapping": ("'params' must be a mapping of name: default, got list", 2),
    "35_family_mismatch": ("fold applies to batchnorm, frozen_batchnorm layers, not groupnorm", 3),
    "36_channels_bad": ("channels min/max must be positive integers", 3),
    "37_empty_path_param": ("parameter 'paths' is used as a path glob", 4),
    "38_duplicate_key": ("duplicate key 'replace'", 5),
    "39_null_param_unset": ("parameter 'styles' has no default and must be set: --set styles=", 4),
    "40_binary_garbage": ("not UTF-8 text", None),
    "41_carry_on_fixed_replacement": ("fold does not take 'carry', not even 'none': what it keeps is fixed; "
                                      "remove the 'carry' key", 5),
}


def test_the_corpus_is_complete():
    assert sorted(p.stem for p in CORPUS.glob("*.yaml")) == sorted(RECIPES)
    assert len(RECIPES) >= 30


@pytest.fixture
def state_dict(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "in.pth"
    torch.save(ConvBN().state_dict(), path)
    return path


def assert_refused(capsys, argv, needle, where, inputs, out):
    before = {p: p.read_bytes() for p in inputs}
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err and where in err, err
    assert "Traceback" not in err
    assert not out.exists() and not Path(f"{out}.json").exists()
    assert all(p.read_bytes() == data for p, data in before.items())


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_bad_recipe(tmp_path, capsys, state_dict, name):
    needle, line = RECIPES[name]
    recipe = CORPUS / f"{name}.yaml"
    out = tmp_path / "out.safetensors"
    where = f"{recipe}:{line}" if line else str(recipe) if name != "25_impossible_groups" else "layer 'bn1'"
    assert_refused(capsys, ["apply", str(recipe), str(state_dict), "--arch", "models:ConvBN", "-o", str(out),
                            "--input-size", "2,3,16,16"], needle, where, [recipe, state_dict], out)


@pytest.mark.parametrize("name", ["05_empty", "20_option_wrong_type", "29_python_tag"])
def test_bad_recipe_in_python_and_json(tmp_path, capsys, state_dict, name):
    needle, _ = RECIPES[name]
    with pytest.raises(NormswapError, match=None) as e:
        normswap.apply(ConvBN(), str(CORPUS / f"{name}.yaml"))
    assert needle in str(e.value)
    assert main(["apply", str(CORPUS / f"{name}.yaml"), str(state_dict), "--arch", "models:ConvBN",
                 "-o", str(tmp_path / "o.pt"), "--json"]) == 2
    err = json.loads(capsys.readouterr().out)["error"]
    assert err["code"] == "recipe_invalid" and needle in err["message"]


def test_huge_and_deep_recipes(tmp_path, capsys, state_dict):
    huge = tmp_path / "huge.yaml"
    huge.write_text("version: 1\nrules:\n  - match: {family: batchnorm}\n    replace: group_norm\n"
                    + "# padding\n" * 200_000)
    out = tmp_path / "o.pt"
    assert_refused(capsys, ["apply", str(huge), str(state_dict), "--arch", "models:ConvBN", "-o", str(out)],
                   "recipes are limited to 1048576 bytes", str(huge), [huge, state_dict], out)
    deep = tmp_path / "deep.yaml"
    deep.write_text("version: 1\ndescription: " + "[" * 60 + "]" * 60 + "\nrules:\n  - match: {family: batchnorm}\n"
                    "    replace: group_norm\n")
    assert_refused(capsys, ["apply", str(deep), str(state_dict), "--arch", "models:ConvBN", "-o", str(out)],
                   "too deeply nested", f"{deep}:2", [deep, state_dict], out)


# ------------------------------------------------------------------ bad model inputs


class Other(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)


def _model_cases(tmp_path: Path, state_dict: Path) -> dict:
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(state_dict.read_bytes()[:200])
    wrong = tmp_path / "wrong_arch.pth"
    torch.save(Other().state_dict(), wrong)
    not_model = tmp_path / "numbers.pt"
    torch.save([1, 2, 3], not_model)
    pickled = tmp_path / "whole.pt"
    torch.save(ConvBN(), pickled)
    plain_pickle = tmp_path / "object.pkl"
    plain_pickle.write_bytes(pickle.dumps({"weights": object.__new__(zipfile.ZipInfo)}))
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    folder = tmp_path / "a_directory"
    folder.mkdir()
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), scripted)
    ckpt = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, ckpt)
    return {
        "truncated .pt": ([str(truncated), "--arch", "models:ConvBN"], "file may be truncated", str(truncated)),
        "state dict for another architecture": ([str(wrong), "--arch", "models:ConvBN"],
                                                "does not fit models:ConvBN", str(wrong)),
        "non-model pickle": ([str(not_model), "--arch", "models:ConvBN"], "holds a list, not a model", str(not_model)),
        "pickled module without --trust-pickle": ([str(pickled)], "pass --trust-pickle", str(pickled)),
        "arbitrary pickled objects": ([str(plain_pickle), "--arch", "models:ConvBN"],
                                      "holds pickled Python objects", str(plain_pickle)),
        "unknown timm name": (["timm:resnet5O"], "unknown timm model 'resnet5O'", "timm:resnet5O"),
        "a directory": ([str(folder)], "is a directory, not a model file", str(folder)),
        "a text file": ([str(text), "--arch", "models:ConvBN"], "not a PyTorch checkpoint", str(text)),
        "an empty file": ([str(empty), "--arch", "models:ConvBN"], "cannot read", str(empty)),
        "a TorchScript archive": ([str(scripted)], "is a TorchScript archive", str(scripted)),
        "a checkpoint with no weights": ([str(ckpt), "--arch", "models:ConvBN"], "state dict", str(ckpt)),
        "a missing file": ([str(tmp_path / "nope.pt")], "does not exist", "nope.pt"),
    }


def test_bad_model_inputs(tmp_path, capsys, state_dict):
    cases = _model_cases(tmp_path, state_dict)
    assert len(cases) >= 10
    for name, (model_args, needle, where) in cases.items():
        out = tmp_path / "out.safetensors"
        files = [Path(a) for a in model_args if Path(a).is_file()]
        try:
            assert_refused(capsys, ["apply", "bn_to_gn", *model_args, "-o", str(out)], needle, where, files, out)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


def test_unreadable_model_file(tmp_path, capsys, state_dict, monkeypatch):
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if str(p) == str(state_dict) else real(p, mode))
    out = tmp_path / "o.pt"
    assert_refused(capsys, ["apply", "bn_to_gn", str(state_dict), "--arch", "models:ConvBN", "-o", str(out)],
                   "permission denied", str(state_dict), [state_dict], out)


# ------------------------------------------------------------------ security


def test_no_unsafe_torch_load_outside_trust_pickle():
    """The package calls torch.load with weights_only=False in exactly one place, behind --trust-pickle."""
    package = Path(normswap.__file__).parent
    unsafe = []
    for path in package.rglob("*.py"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                unsafe.append((path.name, i, line.strip()))
    assert len(unsafe) == 1 and unsafe[0][0] == "model_io.py" and "the caller trusts this file" in unsafe[0][2], unsafe
    source = (package / "model_io.py").read_text()
    guarded = source[: source.index(unsafe[0][2])]
    assert "if not trust_pickle:" in guarded[-1500:]  # the unsafe load sits after the --trust-pickle refusal
