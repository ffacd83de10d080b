"""`normswap check MODEL FILE.onnx|FILE.pt2`: the exported file itself, run in onnxruntime or torch.export,
against the PyTorch model it came from."""
import json
import sys

import pytest
import torch
from models import ConvBN

import normswap
from normswap.cli import main
from normswap.model_io import sniff
from normswap.testing import randomize_bn
from normswap.verify.export import export_verified

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

ARCH = ["--arch", "models:ConvBN"]
FLOAT32_RTOL = 1e-5


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A trained ConvBN's state dict; its fold through `normswap fold` to a dynamic-batch ONNX file; the same
    fold exported as a fixed-shape ONNX file and a dynamic-batch .pt2; and a .pt2 export of the model with one
    BN's running mean moved."""
    d = tmp_path_factory.mktemp("artifacts")
    torch.manual_seed(0)
    model = randomize_bn(ConvBN(), (2, 3, 16, 16)).eval()
    out = {"ref": d / "trained.pth", "dynamic.onnx": d / "dynamic.onnx"}
    torch.save(model.state_dict(), out["ref"])
    assert main(["fold", str(out["ref"]), *ARCH, "--input-size", "2,3,16,16", "-o", str(out["dynamic.onnx"])]) == 0
    folded = normswap.fold(model, input_size=(2, 3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        model.bn2.running_mean += 0.05 * model.bn2.running_var.sqrt()
    for name, source, fmt, dynamic in (("static.onnx", folded, "onnx", "none"), ("dynamic.pt2", folded, "pt2", "batch"),
                                       ("wrong.pt2", model, "pt2", "batch")):
        exported = export_verified(source, x, fmt, dynamic=dynamic)
        assert exported.ok and exported.dynamic == dynamic
        out[name] = d / name
        out[name].write_bytes(exported.data)
    return out


def check(files, candidate, *extra):
    return main(["check", str(files["ref"]), str(files[candidate]), *ARCH, *extra])


@pytest.mark.parametrize("name, runtime", [("dynamic.onnx", "onnxruntime"), ("dynamic.pt2", "torch.export"),
                                           ("static.onnx", "onnxruntime")])
def test_a_correct_export_passes_within_the_float32_bar(files, capsys, name, runtime):
    capsys.readouterr()
    assert sniff(files[name]) == name.rsplit(".", 1)[1]
    assert check(files, name, "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] and not result["problems"]
    assert result["max_rel"] < FLOAT32_RTOL and result["max_rel"] <= result["threshold"]
    assert result["rtol"] == FLOAT32_RTOL and result["dtype"] == "float64"  # the reference in float64
    assert result["exported"]["runtime"].startswith(runtime) and result["exported"]["dtype"] == "float32"
    assert result["inputs"] == [[2, 3, 16, 16]] * 2  # the file's fixed 16x16, not the reference's 224x224 guess
    assert check(files, name) == 0
    text = capsys.readouterr().out
    fmt = name.rsplit(".", 1)[1]
    assert f"candidate        {fmt} file run in {runtime}" in text and "float32" in text


def test_a_wrong_export_fails_above_the_tolerance(files, capsys):
    capsys.readouterr()
    assert check(files, "wrong.pt2", "--json") == 1
    result = json.loads(capsys.readouterr().out)
    assert not result["ok"] and result["max_rel"] > 100 * result["threshold"]
    assert result["first_divergence"] is None and not result["layers"]
    assert any("no layers to hook" in n for n in result["notes"])
    assert check(files, "wrong.pt2") == 1
    assert "check (numeric): FAILED" in capsys.readouterr().out


def test_a_dynamic_batch_export_runs_at_batch_1_and_3(files, tmp_path, capsys):
    batches = tmp_path / "batches.pt"
    torch.save([torch.randn(1, 3, 16, 16), torch.randn(3, 3, 16, 16)], batches)
    for name in ("dynamic.onnx", "dynamic.pt2"):
        capsys.readouterr()
        assert check(files, name, "--inputs", str(batches), "--json") == 0
        result = json.loads(capsys.readouterr().out)
        assert result["inputs"] == [[1, 3, 16, 16], [3, 3, 16, 16]] and result["max_rel"] < FLOAT32_RTOL
    assert check(files, "dynamic.onnx", "--input-size", "3,3,16,16") == 0


def test_a_fixed_shape_export_given_another_batch_says_what_it_takes(files, capsys):
    capsys.readouterr()
    assert check(files, "static.onnx", "--input-size", "3,3,16,16") == 2
    err = capsys.readouterr().err
    assert "fixed input shape" in err and "(2, 3, 16, 16)" in err and "(3, 3, 16, 16)" in err
    assert "--input-size 2,3,16,16" in err and "Traceback" not in err


@pytest.mark.parametrize("content, needle", [
    (b"this is not a model\n", "is named .onnx but is not an ONNX model"),
    (b"", "it is empty"),
    (None, "cannot load"),  # the first bytes of a real file: sniffed as ONNX, refused by onnxruntime
])
def test_a_broken_onnx_file_is_refused_by_name(files, tmp_path, capsys, content, needle):
    bad = tmp_path / "x.onnx"
    bad.write_bytes(files["dynamic.onnx"].read_bytes()[:200] if content is None else content)
    capsys.readouterr()
    assert main(["check", str(files["ref"]), str(bad), *ARCH]) == 2
    err = capsys.readouterr().err
    assert needle in err and str(bad) in err and "fix:" in err and "Traceback" not in err


@pytest.mark.parametrize("extra, needle", [
    (["--mode", "interface"], "runs forward only"),
    (["--layers"], "has none to hook"),
])
def test_what_an_export_cannot_do_is_refused(files, capsys, extra, needle):
    capsys.readouterr()
    assert check(files, "dynamic.onnx", *extra) == 2
    err = capsys.readouterr().err
    assert needle in err and "fix:" in err


def test_an_exported_reference_is_refused(files, capsys):
    capsys.readouterr()
    assert main(["check", str(files["dynamic.onnx"]), str(files["ref"]), *ARCH]) == 2
    err = capsys.readouterr().err
    assert "the reference must be a PyTorch model" in err and "normswap check MODEL" in err
    assert main(["inspect", str(files["dynamic.onnx"])]) == 2  # other commands: an ONNX file has no module tree
    assert "is an ONNX model, which has no module tree" in capsys.readouterr().err


def test_without_onnxruntime_the_fix_names_the_extra(files, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    capsys.readouterr()
    assert check(files, "dynamic.onnx") == 2
    err = capsys.readouterr().err
    assert "onnxruntime, which is not installed" in err and "pip install 'normswap[onnx]'" in err
