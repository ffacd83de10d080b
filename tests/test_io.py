"""Model loading by content, checkpoint unwrapping, safe unpickling, atomic outputs."""
import pytest
import torch
import torch.nn as nn

from normswap.errors import ModelLoadError, OutputError, UnsafePickleError
from normswap.model_io import Loaded, load_model, resolve_output

from models import ConvBN


def spec_sd(tmp_path, obj, name="sd.pth"):
    p = tmp_path / name
    torch.save(obj, p)
    return p


@pytest.fixture
def r18_sd():
    import timm

    torch.manual_seed(0)
    m = timm.create_model("resnet18", pretrained=False)
    return m, m.state_dict()


def assert_same_weights(model, sd):
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in sd.items())


def test_plain_state_dict_needs_arch(tmp_path, r18_sd):
    m, sd = r18_sd
    p = spec_sd(tmp_path, sd)
    with pytest.raises(ModelLoadError) as e:
        load_model(p)
    assert "--arch" in str(e.value) and str(p) in str(e.value)
    loaded = load_model(p, arch="timm:resnet18")
    assert type(loaded.model).__name__ == "ResNet" and loaded.spec == "timm:resnet18"
    assert_same_weights(loaded.model, sd)


@pytest.mark.parametrize("wrap, note", [
    (lambda sd: {"state_dict": sd, "state_dict_ema": sd, "epoch": 3, "optimizer": {}}, "checkpoint['state_dict']"),
    (lambda sd: {"module." + k: v for k, v in sd.items()}, "'module.' prefix"),
    (lambda sd: {"_orig_mod." + k: v for k, v in sd.items()}, "'_orig_mod.' prefix"),
    (lambda sd: {"model": {"_orig_mod.module." + k: v for k, v in sd.items()}}, "'module.' prefix"),
])
def test_checkpoint_shapes(tmp_path, r18_sd, wrap, note):
    _, sd = r18_sd
    loaded = load_model(spec_sd(tmp_path, wrap(sd)), arch="timm:resnet18")
    assert_same_weights(loaded.model, sd)
    assert any(note in n for n in loaded.notes), loaded.notes


def test_ema_preferred_on_request(tmp_path, r18_sd):
    _, sd = r18_sd
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    p = spec_sd(tmp_path, {"state_dict": sd, "state_dict_ema": ema})
    assert_same_weights(load_model(p, arch="timm:resnet18", ema=True).model, ema)


def test_pickled_module_needs_trust(tmp_path):
    p = spec_sd(tmp_path, ConvBN(), "whole.pt")
    before = p.read_bytes()
    with pytest.raises(UnsafePickleError) as e:
        load_model(p)
    assert "--trust-pickle" in str(e.value)
    loaded = load_model(p, trust_pickle=True)
    assert type(loaded.model).__name__ == "ConvBN" and loaded.spec is None
    assert p.read_bytes() == before


@pytest.mark.parametrize("make, needle", [
    (lambda p: p.write_bytes(b""), "cannot read"),
    (lambda p: p.write_bytes(b"not a checkpoint at all"), "is a text file"),
    (lambda p: torch.save([1, 2, 3], p), "holds a list"),
    (lambda p: torch.save({"epoch": 3, "lr": 0.1}, p), "neither a state dict"),
])
def test_bad_files(tmp_path, make, needle):
    p = tmp_path / "bad.pt"
    make(p)
    with pytest.raises(ModelLoadError) as e:
        load_model(p, arch="timm:resnet18")
    assert needle in str(e.value)


def test_truncated_file(tmp_path, r18_sd):
    _, sd = r18_sd
    p = spec_sd(tmp_path, sd)
    p.write_bytes(p.read_bytes()[: 4000])
    with pytest.raises(ModelLoadError) as e:
        load_model(p, arch="timm:resnet18")
    assert "cannot read" in str(e.value) and "truncated" in str(e.value)


def test_wrong_architecture(tmp_path, r18_sd):
    _, sd = r18_sd
    with pytest.raises(ModelLoadError) as e:
        load_model(spec_sd(tmp_path, sd), arch="timm:resnet34")
    assert "does not fit timm:resnet34" in str(e.value) and "missing" in str(e.value)
    with pytest.raises(ModelLoadError) as e:
        load_model(spec_sd(tmp_path, sd), arch="timm:resnet50")
    assert "does not fit timm:resnet50" in str(e.value)


def test_specs():
    assert type(load_model("torchvision:resnet18").model).__name__ == "ResNet"
    assert type(load_model("models:ConvBN").model).__name__ == "ConvBN"
    with pytest.raises(ModelLoadError, match="did you mean resnet50"):
        load_model("timm:resnet5O")
    with pytest.raises(ModelLoadError, match="cannot import module"):
        load_model("no_such_pkg.mod:make")


def test_torchvision_specs_build_offline_without_backbone_weights(monkeypatch):
    """Segmentation builders default to an ImageNet backbone: a spec must not try to download it."""
    import urllib.request

    def no_network(*args, **kwargs):
        raise AssertionError("the spec tried to download weights")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    model = load_model("torchvision:lraspp_mobilenet_v3_large").model
    assert type(model).__name__ == "LRASPP"
    assert type(load_model("torchvision:mobilenet_v3_small").model).__name__ == "MobileNetV3"


def test_missing_dir_and_torchscript(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(ModelLoadError, match="is a directory"):
        load_model(tmp_path)
    ts = tmp_path / "s.pt"
    torch.jit.script(nn.Sequential(nn.Linear(2, 2))).save(str(ts))
    with pytest.raises(ModelLoadError, match="TorchScript"):
        load_model(ts)


def test_output_never_over_input(tmp_path):
    src = tmp_path / "m.pt"
    src.write_bytes(b"x")
    loaded = Loaded(nn.Linear(1, 1), "pickle", None, src)
    with pytest.raises(OutputError, match="overwrite the input"):
        resolve_output(src, loaded)
    with pytest.raises(OutputError, match="does not exist"):
        resolve_output(tmp_path / "no" / "out.pt", loaded)
    with pytest.raises(OutputError, match="cannot write '.onnx'"):
        resolve_output(tmp_path / "out.onnx", loaded)
    with pytest.raises(OutputError, match="needs the model's architecture spec"):
        resolve_output(tmp_path / "out.safetensors", loaded)
    assert resolve_output(tmp_path / "out", loaded).suffix == ".pt"
