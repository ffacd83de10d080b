"""Offline pretrained-weight caches in the layouts timm and torchvision read, filled with known weights.

Tests build these instead of downloading: a Hugging Face hub cache (what timm's
``pretrained=True`` and ``hf-hub:`` specs read) and a TORCH_HOME checkpoint
folder (what torchvision's weights API reads).
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from normswap.testing import randomize_bn

REV = "0123456789abcdef0123456789abcdef01234567"


def offline_hub(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HF_HOME at ``home``, offline; huggingface_hub reads its constants at import, so they are set too.
    Returns the hub cache folder, created empty."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (home / "hub").mkdir(parents=True)
    return home / "hub"


def hub_repo(hub: Path, repo: str, weights: dict, config: dict | None) -> None:
    """A repo in the Hugging Face cache layout: models--ORG--NAME/{refs/main, snapshots/REV/...}."""
    base = hub / f"models--{repo.replace('/', '--')}"
    snapshot = base / "snapshots" / REV
    snapshot.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(REV)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(snapshot / "model.safetensors"))
    if config is not None:
        (snapshot / "config.json").write_text(json.dumps(config))


def known_weights(name: str, **kwargs) -> dict:
    """A timm model's state dict, seeded, with realistic BatchNorm state: not what a fresh build gives."""
    torch.manual_seed(7)
    model = timm.create_model(name, pretrained=False, **kwargs)
    randomize_bn(model, (2, 3, 64, 64))
    return {k: v.clone() for k, v in model.state_dict().items()}


def torch_home_checkpoints(torch_home: Path, weights: Iterable, state_dict: dict) -> None:
    """``state_dict`` saved where torchvision looks for each weights entry: TORCH_HOME/hub/checkpoints/<file>."""
    for url in {w.url for w in weights}:
        target = torch_home / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state_dict, target)
