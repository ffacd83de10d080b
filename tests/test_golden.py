"""Golden text: the human-readable reports of `normswap check` and `normswap inspect`, character for character.

The models are float64 (and the figures three significant digits), so the text
does not depend on the machine's float32 kernels. After an intended format
change, regenerate with ``NORMSWAP_UPDATE_GOLDEN=1 pytest tests/test_golden.py``
and review the diff.
"""
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import ConvBN
from timm.layers.norm_act import BatchNormAct2d

from normswap.cli import main
from normswap.testing import randomize_bn

GOLDEN = Path(__file__).parent / "golden"


def convbn64():
    """The spec the CLI builds: ConvBN in float64 (state dicts loaded into it stay float64)."""
    return ConvBN().double()


class Branches(nn.Module):
    """Every kind of inspect row: folds, a concat split, a shared producer, BN-act, no running stats, GN."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = BatchNormAct2d(8)
        self.a = nn.Conv2d(8, 4, 1)
        self.b = nn.Conv2d(8, 4, 3, padding=1)
        self.cat_bn = nn.BatchNorm2d(8)
        self.shared = nn.Conv2d(8, 8, 1)
        self.shared_bn = nn.BatchNorm2d(8)
        self.batch_stats = nn.BatchNorm2d(8, track_running_stats=False)
        self.gn = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem_bn(self.stem(x))
        x = self.cat_bn(torch.cat([self.a(x), self.b(x)], dim=1))
        y = self.shared(x)
        x = self.shared_bn(y) + y
        x = self.gn(self.batch_stats(x))
        return self.head(x.mean((2, 3)))


def branches():
    torch.manual_seed(0)
    return randomize_bn(Branches(), (2, 3, 8, 8)).eval()


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
    code, out = run(capsys, ["check", str(a), str(a), "--arch", "test_golden:convbn64", "--input-size", "2,3,16,16"])
    assert code == 0
    golden("check_pass.txt", out)


def test_check_report_fail(capsys, state_dicts):
    a, b = state_dicts
    code, out = run(capsys, ["check", str(a), str(b), "--arch", "test_golden:convbn64", "--input-size", "2,3,16,16"])
    assert code == 1
    golden("check_fail.txt", out)


def test_check_report_interface(capsys, state_dicts):
    a, b = state_dicts
    code, out = run(capsys, ["check", str(a), str(b), "--arch", "test_golden:convbn64", "--input-size", "2,3,16,16",
                             "--mode", "interface"])
    assert code == 0
    golden("check_interface.txt", out)


def test_inspect_report(capsys):
    code, out = run(capsys, ["inspect", "test_golden:branches", "--input-size", "2,3,8,8"])
    assert code == 0
    golden("inspect.txt", out)
