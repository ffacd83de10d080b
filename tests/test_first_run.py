"""What a new user meets first: defaults, wrappers, train mode, output that fits the terminal."""
import pytest
import timm
import torch
import torch.nn as nn

import normswap
from normswap.cli import main
from normswap.testing import randomize_bn


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    randomize_bn(model, (2, 3, 64, 64))
    return model.eval()


def test_python_fold_refuses_train_mode_batchnorms_naming_them():
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)  # timm models start in train mode
    with pytest.raises(normswap.NormswapError) as e:
        normswap.fold(model)
    assert "20 BatchNorm layer(s) are in train mode" in str(e.value) and "bn1, layer1.0.bn1" in str(e.value)
    assert e.value.fix.startswith("call model.eval()")
    assert all(m.training for m in model.modules())  # nothing touched


@pytest.mark.parametrize("wrap", ["DataParallel", "compile"])
def test_wrapped_models_are_rewritten_inside_with_a_note(resnet, wrap):
    wrapped = nn.DataParallel(resnet) if wrap == "DataParallel" else torch.compile(resnet)
    folded, report = normswap.fold(wrapped, input_size=(1, 3, 64, 64), return_report=True)
    assert type(folded).__name__ == "ResNet" and report.summary.endswith("folded 20 of 20 BatchNorm, 0 left")
    assert "the result is not wrapped: wrap it again" in report.notes[0]
    assert report.check["ok"]
    with pytest.raises(normswap.NormswapError, match="rewrite model.(module|_orig_mod) before wrapping"):
        normswap.fold(wrapped, input_size=(1, 3, 64, 64), inplace=True)


def test_distributed_data_parallel_is_unwrapped(resnet, tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(resnet)
        out, report = normswap.apply(ddp, "bn_to_gn", return_report=True, input_size=(1, 3, 64, 64))
        assert type(out).__name__ == "ResNet" and "DistributedDataParallel" in report.notes[0]
        assert report.summary == "bn_to_gn on ResNet: swapped 20 BatchNorm2d → GroupNorm"
    finally:
        dist.destroy_process_group()


def test_report_text_counts_what_users_count_and_fits_80_columns(resnet):
    _, report = normswap.fold(resnet, input_size=(1, 3, 64, 64), return_report=True)
    assert report.summary == "fold_bn on ResNet: folded 20 of 20 BatchNorm, 0 left"
    assert str(report) == report.text() == report.text(80)
    lines = str(report).splitlines()
    assert lines[0] == report.summary and all(len(ln) <= 80 and ln == ln.rstrip() for ln in lines)
    assert sum(1 for ln in lines if "BatchNorm2d → Identity" in ln) == 20  # one row per BN, not per layer edited


def test_cli_output_is_80_columns_without_padding_when_piped(capsys):
    assert main(["apply", "bn_to_gn", "timm:rexnet_100", "--dry-run", "--input-size", "1,3,64,64"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("bn_to_gn on RexNet: would swap 49 BatchNormAct2d → GroupNormAct")
    assert all(len(ln) <= 80 and ln == ln.rstrip() for ln in out), max(out, key=len)
