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


def test_apply_without_o_writes_input_stem_dot_recipe_beside_the_input(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "ckpt.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), ckpt)
    arch = ["--arch", "timm:resnet18", "--input-size", "3,64,64"]  # C,H,W: batch 1
    assert main(["apply", "bn_to_gn", str(ckpt), *arch]) == 0
    out = tmp_path / "ckpt.bn_to_gn.safetensors"
    assert out.exists() and f"wrote {out}" in " ".join(capsys.readouterr().out.split())
    assert (out.stat().st_mode & 0o777) == 0o666 & ~_umask()
    assert main(["apply", "bn_to_gn", str(ckpt), *arch]) == 2  # never over an existing default output
    assert "exists" in capsys.readouterr().err
    assert main(["apply", "bn_to_gn", "timm:resnet18", "--input-size", "3,64,64"]) == 0  # a spec: here
    assert (tmp_path / "resnet18.bn_to_gn.safetensors").exists()
    assert main(["apply", "bn_to_gn", str(tmp_path / "missing.pth"), *arch]) == 2
    assert "missing.pth does not exist" in capsys.readouterr().err


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_apply_to_onnx_names_the_real_fix(capsys):
    assert main(["apply", "bn_to_gn", "timm:resnet18", "-o", "x.onnx"]) == 2
    err = capsys.readouterr().err
    assert "it has no export" in err and "normswap fold" in err


@pytest.mark.parametrize("content, needle", [
    (b"hello world\nthis is text\n", "is a text file"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12345\n", "Git LFS pointer"),
    (b"\x80\x02}q\x00(K\x01K\x02u" + b"\x00" * 40, "cannot read"),
])
def test_text_lfs_and_garbage_checkpoints_are_exit_2_without_traceback(tmp_path, capsys, content, needle):
    bad = tmp_path / "model.pt"
    bad.write_bytes(content)
    assert main(["fold", str(bad), "--arch", "timm:resnet18", "-o", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and err.startswith("normswap: error:")


def test_module_factory_specs_import_from_the_current_folder(tmp_path, capsys, monkeypatch):
    (tmp_path / "my_gan.py").write_text(
        "import torch.nn as nn\n"
        "def GAN():\n    return nn.Sequential(nn.ConvTranspose2d(8, 4, 4), nn.BatchNorm2d(4), nn.ReLU())\n")
    monkeypatch.chdir(tmp_path)
    # the first layer is a ConvTranspose2d: the example input is guessed from it
    assert main(["fold", "my_gan:GAN", "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("fold_bn on Sequential: would fold 1 of 1 BatchNorm, 0 left")


def test_usage_errors_have_one_prefix(capsys):
    assert main(["apply"]) == 2
    err = capsys.readouterr().err
    assert "normswap apply: error: the following arguments are required" in err and "normswap: error:" not in err


@pytest.mark.parametrize("match, needle, fix", [
    ("{type: BatchNorm2D}", "type 'BatchNorm2D' names no class of ResNet", "did you mean 'BatchNorm2d'?"),
    ("{family: batchnorm, path: 'layr1.**'}", "no module of ResNet is at path 'layr1.**'", "nearest paths: layer1"),
])
def test_a_rule_that_matches_nothing_through_a_typo_is_exit_2(tmp_path, capsys, match, needle, fix):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(f"version: 1\nname: my_gn\nrules:\n  - match: {match}\n    replace: group_norm\n"
                      "check: interface\n")
    out = tmp_path / "out.safetensors"
    assert main(["apply", str(recipe), "timm:resnet18", "--input-size", "3,64,64", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err and fix in err and f"{recipe}:4" in err and not out.exists()


@pytest.mark.parametrize("match", [
    "{type: ConvTranspose2d}",  # a correctly spelled class this model lacks
    "{family: batchnorm, path: ['layer1.**', 'no_such.**']}",  # one glob of a list matching nothing
    "{family: frozen_batchnorm}",  # a family the model lacks
    "{type: timm.layers.norm_act.GroupNormAct}",  # a dotted class name that imports
])
def test_rules_that_match_nothing_for_real_stay_notes(tmp_path, capsys, match):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"version: 1\nname: r\nrules:\n  - match: {match}\n    replace: group_norm\ncheck: interface\n")
    assert main(["apply", str(recipe), "timm:resnet18", "--input-size", "3,64,64", "--dry-run"]) == 0


class FlatHead(nn.Module):
    """A conv net whose linear head fixes the spatial size: only its batch can be dynamic."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_exports_have_a_dynamic_batch_verified_at_two_sizes(tmp_path, capsys):
    import onnxruntime as ort

    out = tmp_path / "m.onnx"
    assert main(["fold", "models:ConvBN", "--input-size", "3,16,16", "-o", str(out)]) == 0
    assert "dynamic batch): matches PyTorch on 1x3x16x16, 3x3x16x16" in " ".join(capsys.readouterr().out.split())
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.run(None, {session.get_inputs()[0].name: torch.randn(5, 3, 16, 16).numpy()})[0].shape[0] == 5


def test_a_model_that_cannot_be_spatially_dynamic_gets_a_fixed_export_and_a_note():
    from normswap.verify.export import export_verified

    model = FlatHead().eval()
    spatial = export_verified(model, torch.randn(1, 3, 8, 8), "pt2", dynamic="spatial")
    assert spatial.ok and spatial.dynamic == "none" and "a spatial-dynamic export failed" in spatial.notes[0]
    batch = export_verified(model, torch.randn(1, 3, 8, 8), "pt2", dynamic="batch")
    assert batch.ok and batch.dynamic == "batch" and batch.verified_on == [[1, 3, 8, 8], [3, 3, 8, 8]]
    program = torch.export.load(__import__("io").BytesIO(batch.data)).module()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(program(x), model(x), atol=1e-5)


def test_a_recipe_without_check_is_checked_by_what_its_replacements_keep(tmp_path, capsys):
    """A user's BN -> GroupNorm recipe without `check:` used to fail numerically, always."""
    gn, frozen = tmp_path / "gn.yaml", tmp_path / "frozen.yaml"
    gn.write_text("version: 1\nname: my_gn\nrules:\n  - match: {family: batchnorm}\n    replace: group_norm\n")
    frozen.write_text("version: 1\nname: my_frozen\nrules:\n  - match: {family: batchnorm}\n"
                      "    replace: frozen_batch_norm\n")
    assert normswap.recipe(str(gn)).check == "interface" and normswap.recipe(str(frozen)).check == "numeric"
    out = tmp_path / "gn.safetensors"
    assert main(["apply", str(gn), "models:ConvBN", "-o", str(out)]) == 0
    assert "check (interface): passed" in capsys.readouterr().out and out.exists()
    assert main(["apply", str(frozen), "models:ConvBN", "-o", str(tmp_path / "f.safetensors")]) == 0
    assert "check (numeric): passed" in capsys.readouterr().out


class CastsItsInput(nn.Module):
    """Takes uint8 images and casts them itself: float64 copies of it cannot run."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x.float() / 255))


def test_a_model_that_casts_its_input_is_checked_in_its_own_dtype():
    model = CastsItsInput().eval()
    randomize_bn(model, (4, 3, 8, 8))
    x = torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8)
    folded, report = normswap.fold(model, example_inputs=x, return_report=True)
    assert report.check["ok"] and report.check["dtype"] == "float32"
    assert any("float64 copies could not run" in n for n in report.check["notes"])


def test_interface_check_at_batch_one_on_a_1x1_map_passes(tmp_path, capsys):
    """--input-size C,H,W is batch 1; resnet18 at 32x32 ends in a 1x1 map, where a train-mode BatchNorm of the
    reference refuses one value per channel: the backward pass runs on the sample and its negation."""
    out = tmp_path / "gn.safetensors"
    assert main(["apply", "bn_to_gn", "timm:resnet18", "--input-size", "3,32,32", "-o", str(out)]) == 0
    assert "check (interface): passed" in capsys.readouterr().out and out.exists()
