"""Example inputs for analysis and checks: from a given shape, the model's pretrained_cfg, or a guess."""
from __future__ import annotations

import itertools
from typing import Sequence

import torch
import torch.nn as nn

from .errors import InputSpecError


def parse_input_size(text: str) -> tuple[int, ...]:
    """``1,3,224,224`` or ``3x224x224`` -> a shape tuple."""
    parts = [p for p in text.replace("x", ",").replace(" ", "").split(",") if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise InputSpecError(
            f"--input-size {text!r} is not a list of integers", fix="write it like 1,3,224,224"
        ) from None
    if not shape or any(s <= 0 for s in shape):
        raise InputSpecError(f"--input-size {text!r} must be positive integers", fix="write it like 1,3,224,224")
    return shape


def cli_input_size(text: str, model: nn.Module) -> tuple[int, ...]:
    """``--input-size``: a full shape, or timm's C,H,W habit (one dimension short of what the model takes),
    which means batch 1."""
    shape = parse_input_size(text)
    try:
        without_batch, _ = infer_input_size(model)
    except InputSpecError:
        return shape
    return (1, *shape) if len(shape) == len(without_batch) else shape


def _cfg_input_size(model: nn.Module) -> tuple[int, ...] | None:
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and cfg.get("input_size"):
            return tuple(int(s) for s in cfg["input_size"])
    return None


def infer_input_size(model: nn.Module) -> tuple[tuple[int, ...], str]:
    """(shape without batch, where it came from). Raises if nothing says what the model takes."""
    size = _cfg_input_size(model)
    if size is not None:
        return size, "the model's pretrained_cfg"
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd) and isinstance(getattr(m, "in_channels", None), int):
            dims = len(m.kernel_size)
            if m.transposed:  # a generator's first layer: a small map (DCGAN takes 1x1)
                spatial = (4,) * dims
            else:
                spatial = {1: (256,), 2: (224, 224), 3: (16, 64, 64)}.get(dims, (16,) * dims)
            return (m.in_channels, *spatial), f"a guess from the first conv ({m.in_channels} input channels)"
        if isinstance(m, nn.Linear):
            return (m.in_features,), f"a guess from the first linear layer ({m.in_features} features)"
    raise InputSpecError(
        "cannot tell what input this model takes (no pretrained_cfg, no conv or linear layer)",
        fix="give an input size, e.g. --input-size 1,3,224,224 or input_size=(1, 3, 224, 224)",
    )


def model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    for t in itertools.chain(model.parameters(), model.buffers()):  # lazily: the first float tensor decides
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.float32, torch.device("cpu")


def make_inputs(
    model: nn.Module,
    input_size: Sequence[int] | None = None,
    *,
    batch: int = 1,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """A seeded standard-normal input; ``input_size`` with a batch dim, or inferred without one."""
    if input_size is None:
        shape, _ = infer_input_size(model)
        shape = (batch, *shape)
    else:
        shape = tuple(int(s) for s in input_size)
    mdtype, device = model_dtype_device(model)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype or mdtype)
