"""The CLI, in-process through main(argv); a few real subprocess runs prove the entry point."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn

import normswap
from normswap.cli import main
from normswap.families import family_of
from normswap.testing import randomize_bn

from models import ConvBN

SMALL = ["--input-size", "1,3,64,64"]


@pytest.fixture(scope="module")
def r50_sd(tmp_path_factory):
    torch.manual_seed(0)
    m = timm.create_model("resnet50", pretrained=False)
    randomize_bn(m, (2, 3, 64, 64))
    p = tmp_path_factory.mktemp("r50") / "sd.pth"
    torch.save(m.state_dict(), p)
    return m, p


def bn_count(m):
    return sum(family_of(x) in ("batchnorm", "frozen_batchnorm") for x in m.modules())


def assert_gn_resnet(orig, out):
    assert type(out) is type(orig) and type(out).__name__ == "ResNet"
    assert bn_count(out) == 0
    old = {n: m for n, m in orig.named_modules() if family_of(m) == "batchnorm"}
    new = {n: m for n, m in out.named_modules() if isinstance(m, nn.GroupNorm)}
    assert set(old) == set(new) and len(new) == 53
    for n in old:
        assert torch.equal(old[n].weight, new[n].weight) and torch.equal(old[n].bias, new[n].bias)
    out.train()
    x = torch.randn(2, 3, 64, 64)
    assert out.forward_features(x).shape == (2, 2048, 2, 2)
    out(x).square().mean().backward()
    ref = {n for n, p in orig.named_parameters() if p.requires_grad}
    for n, p in out.named_parameters():
        assert n in ref
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


def test_apply_state_dict_to_safetensors_and_reload(tmp_path, r50_sd, capsys):
    orig, sd = r50_sd
    out = tmp_path / "r50_gn.safetensors"
    before = sd.read_bytes()
    assert main(["apply", "bn_to_gn", str(sd), "--arch", "timm:resnet50", "-o", str(out), *SMALL]) == 0
    text = capsys.readouterr().out
    assert "swapped 53 BatchNorm2d → GroupNorm" in text and "check (interface): passed" in text
    assert sd.read_bytes() == before
    side = json.loads((tmp_path / "r50_gn.safetensors.json").read_text())
    assert side["arch"] == "timm:resnet50" and side["report"]["changed"] == 53
    assert_gn_resnet(orig, normswap.load(out))


def test_apply_to_pt(tmp_path, r50_sd, capsys):
    orig, sd = r50_sd
    out = tmp_path / "r50_gn.pt"
    assert main(["apply", "bn_to_gn", str(sd), "--arch", "timm:resnet50", "-o", str(out), "--no-check"]) == 0
    assert_gn_resnet(orig, torch.load(out, weights_only=False))


def test_dry_run_and_json(tmp_path, capsys):
    assert main(["apply", "bn_to_gn", "timm:resnet18", "--dry-run", "--json", "--set", "num_groups=8"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["applied"] is False and rep["changed"] == 20 and rep["params"]["num_groups"] == 8
    assert rep["changes"][0]["summary"] == "GroupNorm(8 groups of 8)"
    assert not list(tmp_path.iterdir())


def test_recipes_schema_version(capsys):
    assert main(["recipes", "--json"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == normswap.list_recipes()
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "normswap recipe"
    assert main(["--version"]) == 0
    assert normswap.__version__ in capsys.readouterr().out


def test_inspect(capsys):
    assert main(["inspect", "timm:resnet18", *SMALL, "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    rows = {r["path"]: r for r in table["layers"]}
    assert table["summary"] == {"batchnorm": 20}
    assert rows["layer1.0.bn1"]["producer"] == "layer1.0.conv1 (Conv2d)"
    assert rows["layer1.0.bn1"]["producer_users"] == ["layer1.0.bn1"]
    assert main(["inspect", "timm:resnet18", *SMALL]) == 0
    assert "layer2.0.downsample.1" in capsys.readouterr().out


def test_check_command(tmp_path, capsys):
    torch.manual_seed(0)
    a = randomize_bn(ConvBN(), (2, 3, 16, 16))
    pa, pb = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save(a.state_dict(), pa)
    a.bn2.running_mean += 1
    torch.save(a.state_dict(), pb)
    args = ["--arch", "models:ConvBN", "--input-size", "2,3,16,16", "--json"]
    assert main(["check", str(pa), str(pa), *args]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert main(["check", str(pa), str(pb), *args]) == 1
    res = json.loads(capsys.readouterr().out)
    assert res["ok"] is False and res["max_rel"] > 1e-3
    assert res["first_divergence"]["path"] == "bn2" and res["first_divergence"]["kind"] == "local"
    assert [r["path"] for r in res["layers"]][:2] == ["conv1", "bn1"]
    assert set(res) >= {"abs_error", "rel_error", "cosine", "top1", "threshold", "noise_floor", "inputs"}


def test_check_plot_inputs_file_and_layers(tmp_path, capsys):
    torch.manual_seed(0)
    a = randomize_bn(ConvBN(), (2, 3, 16, 16))
    pa, pb = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save(a.state_dict(), pa)
    a.bn2.running_var *= 2
    torch.save(a.state_dict(), pb)
    inputs = tmp_path / "x.pt"
    torch.save([torch.randn(3, 3, 16, 16), torch.randn(1, 3, 16, 16)], inputs)
    png = tmp_path / "layers.png"
    code = main(["check", str(pa), str(pb), "--arch", "models:ConvBN", "--inputs", str(inputs), "--plot", str(png)])
    out = capsys.readouterr().out
    assert code == 1 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "inputs           (3, 3, 16, 16), (1, 3, 16, 16)" in out
    assert "first divergence bn2 (BatchNorm2d)" in out and f"note: wrote {png}" in out
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left
    assert main(["check", str(pa), str(pa), "--arch", "models:ConvBN", "--input-size", "2,3,16,16",
                 "--layers", "--n-inputs", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["inputs"]) == 3 and len(res["layers"]) == 8 and res["first_divergence"] is None


@pytest.mark.parametrize("argv, needle", [
    (["--inputs", "{d}/missing.pt"], "input file {d}/missing.pt does not exist"),
    (["--inputs", "{d}/text.pt"], "holds a str, not tensors"),
    (["--n-inputs", "0"], "--n-inputs 0 must be at least 1"),
    (["--rtol", "-1"], "--rtol -1.0 must be a non-negative number"),
    (["--plot", "{d}/no/such/dir/p.png"], "is not a directory"),
    (["--plot", "{d}/p.png", "--mode", "interface"], "--plot draws the per-layer errors"),
])
def test_check_bad_arguments_exit_2(tmp_path, capsys, argv, needle):
    pa = tmp_path / "a.pth"
    torch.save(ConvBN().state_dict(), pa)
    torch.save("not a tensor", tmp_path / "text.pt")
    argv = [a.format(d=tmp_path) for a in argv]
    assert main(["check", str(pa), str(pa), "--arch", "models:ConvBN", "--input-size", "2,3,16,16", *argv]) == 2
    err = capsys.readouterr().err
    assert needle.format(d=tmp_path) in err and "Traceback" not in err
    assert not (tmp_path / "p.png").exists()


# ------------------------------------------------------------------ bad input


@pytest.fixture
def sd_file(tmp_path):
    p = tmp_path / "in.pth"
    torch.save(ConvBN().state_dict(), p)
    return p


def bad_recipe(tmp_path, text):
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return str(p)


BAD_CASES = {
    "malformed yaml": (lambda t: bad_recipe(t, "version: 1\nrules: [\n"), None, "YAML syntax error", "recipe.yaml:"),
    "unknown key": (lambda t: bad_recipe(t, "version: 1\nrules:\n  - match: {family: batchnorm}\n    replce: group_norm\n"),
                    None, "did you mean 'replace'", "recipe.yaml:4"),
    "unknown replacement": (lambda t: bad_recipe(t, "version: 1\nrules:\n  - match: {family: batchnorm}\n    replace: grp_norm\n"),
                            None, "unknown replacement 'grp_norm'", "recipe.yaml:4"),
    "non-positive groups": (lambda t: "bn_to_gn", ["--set", "num_groups=0"], "'num_groups' must be at least 1", "num_groups"),
    "impossible explicit groups": (lambda t: bad_recipe(t, "version: 1\nrules:\n  - match: {family: batchnorm}\n"
                                                        "    replace: group_norm\n    with: {groups_by_path: {bn1: 3}}\n"),
                                   None, "3 groups on 16 channels", "layer 'bn1'"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_exit_2(tmp_path, sd_file, capsys, case):
    make, extra, needle, where = BAD_CASES[case]
    out = tmp_path / "out.safetensors"
    before = sd_file.read_bytes()
    code = main(["apply", make(tmp_path), str(sd_file), "--arch", "models:ConvBN", "-o", str(out), *(extra or [])])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and where in err, err
    assert "Traceback" not in err
    assert not out.exists() and not Path(str(out) + ".json").exists()
    assert sd_file.read_bytes() == before


def test_bad_model_inputs(tmp_path, sd_file, capsys):
    out = tmp_path / "o.pt"
    assert main(["apply", "bn_to_gn", str(tmp_path / "missing.pt"), "-o", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    whole = tmp_path / "whole.pt"
    torch.save(ConvBN(), whole)
    assert main(["apply", "bn_to_gn", str(whole), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--trust-pickle" in err and "Traceback" not in err
    assert main(["apply", "bn_to_gn", str(sd_file), "--arch", "models:ConvBN", "-o", str(sd_file)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert not out.exists()
    assert main(["apply", "bn_to_gn", str(whole), "--trust-pickle", "-o", str(out), "--input-size", "2,3,16,16"]) == 0
    assert out.exists()


def test_json_errors_have_stable_codes(tmp_path, capsys):
    assert main(["apply", "bn_to_gn", str(tmp_path / "nope.pt"), "-o", str(tmp_path / "o.pt"), "--json"]) == 2
    err = json.loads(capsys.readouterr().out)["error"]
    assert err["code"] == "model_load" and "does not exist" in err["message"]
    assert main(["apply", "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "usage"


def test_installed_entry_point(tmp_path):
    """One real subprocess: the console script is installed and runs end to end."""
    exe = Path(sys.executable).parent / "normswap"
    out = tmp_path / "r18.safetensors"
    proc = subprocess.run([str(exe), "apply", "bn_to_gn", "timm:resnet18", "-o", str(out), *SMALL],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "120"})
    assert proc.returncode == 0, proc.stderr
    assert "swapped 20 BatchNorm2d → GroupNorm" in proc.stdout and out.exists()


# ------------------------------------------------------------------ fold


@pytest.fixture
def trained_sd(tmp_path):
    torch.manual_seed(0)
    m = randomize_bn(ConvBN(), (2, 3, 16, 16)).eval()
    p = tmp_path / "trained.pth"
    torch.save(m.state_dict(), p)
    return m, p


FOLD = ["--arch", "models:ConvBN", "--input-size", "2,3,16,16"]


def test_fold_to_onnx_runs_in_onnxruntime(tmp_path, trained_sd, capsys):
    import onnxruntime as ort

    model, sd = trained_sd
    out = tmp_path / "folded.onnx"
    assert main(["fold", str(sd), *FOLD, "-o", str(out), "--json"]) == 0  # the suffix picks the format
    rep = json.loads(capsys.readouterr().out)
    assert rep["export"]["ok"] and rep["export"]["format"] == "onnx"
    assert any("switched it to eval mode" in n for n in rep["notes"])  # a state dict loads into a train-mode model
    assert {c["path"]: c["new"] for c in rep["changes"]}["bn1"] == "Identity" and not rep["skipped"]
    assert rep["check"]["ok"]
    x = torch.randn(2, 3, 16, 16)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert abs(got - want).max() <= 1e-5 * abs(want).max()
    graph_ops = {n.op_type for n in __import__("onnx").load(str(out)).graph.node}
    assert "BatchNormalization" not in graph_ops and "Conv" in graph_ops
    assert json.loads((tmp_path / "folded.onnx.json").read_text())["report"]["export"]["ok"]


def test_fold_to_pt2_and_safetensors(tmp_path, trained_sd, capsys):
    model, sd = trained_sd
    out = tmp_path / "folded.pt2"
    assert main(["fold", str(sd), *FOLD, "--export", "pt2", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "export (pt2" in text and "matches PyTorch" in text
    program = torch.export.load(str(out))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(program.module()(x), model(x), rtol=1e-5, atol=1e-6)
    assert not any("batch_norm" in str(n.target) for n in program.graph.nodes)
    st = tmp_path / "folded.safetensors"
    assert main(["fold", str(sd), *FOLD, "-o", str(st)]) == 0
    capsys.readouterr()
    reloaded = normswap.load(st)
    assert bn_count(reloaded) == 0
    with torch.no_grad():
        assert torch.allclose(reloaded.eval()(x), model(x), rtol=1e-5, atol=1e-6)


def test_fold_check_failure_writes_nothing(tmp_path, trained_sd, capsys, monkeypatch):
    import normswap.catalog.folding as F

    real = F.fold_output_channels
    monkeypatch.setattr(F, "fold_output_channels", lambda *a, **k: (real(*a, **k)[0] * 1.01, real(*a, **k)[1]))
    _, sd = trained_sd
    out = tmp_path / "folded.onnx"
    assert main(["fold", str(sd), *FOLD, "-o", str(out)]) == 1
    captured = capsys.readouterr()
    assert "check (numeric): FAILED" in captured.out  # the report, on stdout
    assert captured.err.startswith("normswap: nothing was written: the rewritten model failed the numeric check")
    assert list(tmp_path.iterdir()) == [sd]


def test_apply_of_a_function_changing_recipe_under_a_numeric_check_says_what_to_do(tmp_path, capsys):
    """A user's BN -> GroupNorm recipe checked numerically fails by design; the text says how to check it."""
    recipe = tmp_path / "gn.yaml"
    recipe.write_text("version: 1\nname: my_gn\nrules:\n  - match: {family: batchnorm}\n    replace: group_norm\n"
                      "check: numeric\n")
    out = tmp_path / "gn.safetensors"
    assert main(["apply", str(recipe), "models:ConvBN", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("normswap: nothing was written:") and "--check interface" in err
    assert not out.exists()
    assert main(["apply", str(recipe), "models:ConvBN", "-o", str(out), "--check", "interface"]) == 0
    assert "check (interface): passed" in capsys.readouterr().out and out.exists()


@pytest.mark.parametrize("argv, needle", [
    (["--export", "onnx", "-o", "{d}/x.pt"], "--export onnx writes a .onnx file"),
    (["-o", "{d}/x.tflite"], "cannot write '.tflite' files"),
    (["--export", "tflite", "-o", "{d}/x.tflite"], "invalid choice"),
    (["--set", "into_next=maybe", "-o", "{d}/x.pt"], "into_next"),
])
def test_fold_bad_arguments_exit_2(tmp_path, trained_sd, capsys, argv, needle):
    _, sd = trained_sd
    argv = [a.format(d=tmp_path) for a in argv]
    assert main(["fold", str(sd), *FOLD, *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [sd]


def test_inspect_says_what_folds(capsys):
    assert main(["inspect", "models:ConvBN", "--input-size", "2,3,16,16", "--json"]) == 0
    rows = {r["path"]: r for r in json.loads(capsys.readouterr().out)["layers"]}
    assert rows["bn1"]["fold_into"] == ["conv1"] and rows["bn1"]["foldable"] is True
    assert rows["bn1"]["mode"] == "train"  # built from a spec; the column answers for eval mode, as fold sets it
    assert main(["inspect", "models:ConvBN", "--input-size", "2,3,16,16"]) == 0
    text = capsys.readouterr().out
    assert "fold_bn would fold 2 of 2" in text and "assumes eval mode" in text


def test_inspect_gives_the_reason_a_bn_cannot_fold(capsys):
    assert main(["inspect", "models:SharedBN", "--input-size", "2,4,6,6", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["layers"][0]
    assert row["foldable"] is False and "called 2 times" in row["fold_reason"]
