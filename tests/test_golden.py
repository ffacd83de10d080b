"""Golden text: the human-readable reports of `normswap check`, `inspect`, `apply` and `fold`, character for character.

The models are float64 (and the figures three significant digits), so the text
does not depend on the machine's float32 kernels. apply and fold run in a
temporary folder with relative paths, and the float64 rounding figures of the
fold's check are masked. After an intended format change, regenerate with
``NORMSWAP_UPDATE_GOLDEN=1 pytest tests/test_golden.py`` and review the diff.
"""
import os
import re
from pathlib import Path

import pytest
import torch

from normswap.cli import main
from normswap.testing import randomize_bn

from models import convbn64

GOLDEN = Path(__file__).parent / "golden"


def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("NORMSWAP_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed; see the module docstring to regenerate"


@pytest.fixture
def state_dicts(tmp_path):
    torch.manual_seed(0)
    m = randomize_bn(convbn64(), (2, 3, 16, 16))
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save(m.state_dict(), a)
    m.bn2.running_var.mul_(1.5)
    torch.save(m.state_dict(), b)
    return a, b


def run(capsys, argv):
    code = main(argv)
    return code, capsys.readouterr().out


def test_check_report_pass(capsys, state_dicts):
    a, _ = state_dicts
    code, out = run(capsys, ["check", str(a), str(a), "--arch", "models:convbn64", "--input-size", "2,3,16,16"])
    assert code == 0
    golden("check_pass.txt", out)


def test_check_report_fail(capsys, state_dicts):
    a, b = state_dicts
    code, out = run(capsys, ["check", str(a), str(b), "--arch", "models:convbn64", "--input-size", "2,3,16,16"])
    assert code == 1
    golden("check_fail.txt", out)


def test_check_report_interface(capsys, state_dicts):
    a, b = state_dicts
    code, out = run(capsys, ["check", str(a), str(b), "--arch", "models:convbn64", "--input-size", "2,3,16,16",
                             "--mode", "interface"])
    assert code == 0
    golden("check_interface.txt", out)


def test_inspect_report(capsys):
    code, out = run(capsys, ["inspect", "models:branches", "--input-size", "2,3,8,8"])
    assert code == 0
    golden("inspect.txt", out)


def rewrite(capsys, monkeypatch, tmp_path, state_dict, argv, output):
    """Run apply/fold on the state dict from inside tmp_path: relative paths, so no machine path is printed."""
    monkeypatch.chdir(tmp_path)
    code, out = run(capsys, [*argv, state_dict.name, "--arch", "models:convbn64", "--input-size", "2,3,16,16",
                             "-o", output])
    assert code == 0, out
    assert (tmp_path / output).is_file() and (tmp_path / f"{output}.json").is_file()
    return out.replace(str(tmp_path), "<tmp>")


def test_apply_report(capsys, monkeypatch, tmp_path, state_dicts):
    a, _ = state_dicts
    out = rewrite(capsys, monkeypatch, tmp_path, a, ["apply", "bn_to_gn"], "gn.safetensors")
    golden("apply.txt", out)


def test_fold_report(capsys, monkeypatch, tmp_path, state_dicts):
    a, _ = state_dicts
    out = rewrite(capsys, monkeypatch, tmp_path, a, ["fold"], "folded.safetensors")
    # the float64 fold differs from the original by rounding only; its digits depend on the machine's kernels
    figure = r"(?<=max (?:abs|rel) )[0-9.e+-]+"  # printed with .3g
    assert [float(f) < 1e-14 for f in re.findall(figure, out)] == [True, True], out
    golden("fold.txt", re.sub(figure, "<rounding>", out))
