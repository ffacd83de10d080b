"""Pretrained weights through timm's and torchvision's own loaders and caches, tested offline on caches built
here in the libraries' layouts, with known (non-random-init) weights."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision

import normswap
from normswap.cli import main

from hub_cache import hub_repo, known_weights, offline_hub as make_offline_hub, torch_home_checkpoints

REPO = "acme/tiny-r18"  # an hf-hub model whose config.json changes the architecture: 10 classes


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    return make_offline_hub(tmp_path / "hf", monkeypatch)


@pytest.fixture
def hf_r18(offline_hub):
    weights = known_weights("resnet18", num_classes=10)
    config = {"architecture": "resnet18", "num_classes": 10, "num_features": 512,
              "pretrained_cfg": {"input_size": [3, 64, 64], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                                 "crop_pct": 1.0, "interpolation": "bilinear"}}
    hub_repo(offline_hub, REPO, weights, config)
    return weights


def same_weights(model, weights: dict) -> bool:
    sd = model.state_dict()
    return sd.keys() == weights.keys() and all(torch.equal(sd[k], weights[k]) for k in weights)


def test_hf_hub_spec_loads_the_cached_weights_and_its_config(hf_r18):
    model = normswap.load(f"hf-hub:{REPO}", pretrained=True)
    assert same_weights(model, hf_r18) and model.fc.out_features == 10


def test_hf_hub_output_replays_without_the_hub(hf_r18, offline_hub, tmp_path, monkeypatch, capsys):
    """The sidecar records what config.json resolved to; loading the output touches no hub."""
    out = tmp_path / "folded.safetensors"
    assert main(["fold", f"hf-hub:{REPO}", "--pretrained", "-o", str(out)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"built hf-hub:{REPO} with its pretrained weights" in text and "folded 20 of 20 BatchNorm" in text
    side = json.loads(Path(f"{out}.json").read_text())
    assert side["arch"] == "timm:resnet18" and side["arch_args"]["pretrained_cfg"]["num_classes"] == 10
    from huggingface_hub import constants

    empty = tmp_path / "empty_hub"
    empty.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(empty))
    folded = normswap.load(out).eval()
    original = timm.create_model("resnet18", num_classes=10).eval()
    original.load_state_dict(hf_r18)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(folded(x), original(x), rtol=1e-4, atol=1e-4)
    assert not any(empty.iterdir())


def test_apply_without_o_names_the_output_after_the_hub_model(hf_r18, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["apply", "bn_to_gn", f"hf-hub:{REPO}", "--pretrained"]) == 0
    assert (tmp_path / "tiny-r18.bn_to_gn.safetensors").exists()


def test_timm_name_with_tag_loads_through_timm_and_the_hub_cache(offline_hub):
    name = "mobilenetv3_small_050.lamb_in1k"
    hub_id = timm.models.get_pretrained_cfg(name).hf_hub_id
    weights = known_weights("mobilenetv3_small_050")
    hub_repo(offline_hub, hub_id, weights, None)
    model = normswap.load(f"timm:{name}", pretrained=True)
    assert same_weights(model, weights)


def test_torchvision_pretrained_reads_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights_enum = torchvision.models.MobileNet_V3_Small_Weights
    torch.manual_seed(3)
    model = torchvision.models.mobilenet_v3_small()
    sd = model.state_dict()
    torch_home_checkpoints(tmp_path / "torch", [weights_enum.DEFAULT, weights_enum.IMAGENET1K_V1], sd)
    assert same_weights(normswap.load("torchvision:mobilenet_v3_small", pretrained=True), sd)
    assert same_weights(normswap.load("torchvision:mobilenet_v3_small", pretrained="IMAGENET1K_V1"), sd)
    with pytest.raises(normswap.NormswapError, match="has no weights 'IMAGENET9K'"):
        normswap.load("torchvision:mobilenet_v3_small", pretrained="IMAGENET9K")


def test_weights_neither_cached_nor_reachable_are_exit_2_naming_where_it_looked(offline_hub, capsys):
    assert main(["fold", "timm:resnet18.a1_in1k", "--pretrained", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("normswap: error: the pretrained weights of timm:resnet18.a1_in1k are not in the "
                          f"Hugging Face cache {offline_hub}")
    assert "HF_HUB_OFFLINE" in err and "--weights FILE" in err and "Traceback" not in err


def test_the_environment_variables_work_as_users_expect(hf_r18, offline_hub):
    """HF_HOME and HF_HUB_OFFLINE in a fresh process (the fixture's patched constants do not reach it)."""
    env = {**os.environ, "HF_HOME": str(offline_hub.parent), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "normswap", "fold", f"hf-hub:{REPO}", "--pretrained", "--dry-run"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "would fold 20 of 20 BatchNorm" in proc.stdout
