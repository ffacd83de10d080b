"""Batches of unlabeled inputs for passes over data (recalibration, calibrated swaps).

From an image folder (decoded, resized and normalized by timm's eval transform,
configured from the model's ``pretrained_cfg``), a tensor file, or random
normal inputs for a smoke run. Every source gives a list of input tensors.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from ..errors import InputSpecError
from ..inputs import infer_input_size, model_dtype_device

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")


def image_files(folder: str | os.PathLike) -> list[Path]:
    """Every image under ``folder`` (class subfolders included), in sorted path order."""
    root = Path(folder)
    if not root.is_dir():
        why = "does not exist" if not root.exists() else "is not a directory"
        raise InputSpecError(f"image folder {root} {why}", fix="give a directory of images (class subfolders are fine)")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise InputSpecError(f"image folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})",
                             fix="point --data at a folder of images")
    return files


def image_transform(model: nn.Module, input_size: Sequence[int] | None = None):
    """timm's eval transform (resize, center crop, normalize) from the model's pretrained_cfg."""
    from timm.data import create_transform, resolve_data_config

    args = {"input_size": tuple(input_size[-3:])} if input_size else {}
    config = resolve_data_config(args, model=model)
    return create_transform(**config), config


def image_folder_batches(model: nn.Module, folder: str | os.PathLike, batch_size: int, *,
                         limit: int | None = None, input_size: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Decoded, transformed images in batches of ``batch_size`` (the last may be smaller)."""
    from PIL import Image, UnidentifiedImageError

    files = image_files(folder)[:limit]
    transform, _ = image_transform(model, input_size)
    dtype, device = model_dtype_device(model)
    images = []
    for path in files:
        try:
            with Image.open(path) as img:
                images.append(transform(img.convert("RGB")))
        except (UnidentifiedImageError, OSError) as e:
            raise InputSpecError(f"cannot decode image {path}: {e}", fix="remove or replace the file") from None
    stacked = torch.stack(images).to(device=device, dtype=dtype)
    return list(stacked.split(batch_size))


def tensor_file_batches(path: str | os.PathLike) -> list[torch.Tensor]:
    """Batches from a tensor file: a tensor (one batch) or a list of tensors (``io.load_inputs``)."""
    from ..model_io import load_inputs

    return [args[0] if len(args) == 1 else args for args in load_inputs(path)]


def random_batches(model: nn.Module, n: int, batch_size: int, *, input_size: Sequence[int] | None = None,
                   seed: int = 0) -> list[torch.Tensor]:
    """``n`` batches of seeded standard-normal inputs shaped for the model (a smoke run, not a domain)."""
    if n < 1 or batch_size < 1:
        raise InputSpecError(f"--random {n} with batch size {batch_size}: both must be at least 1")
    shape = tuple(input_size[1:]) if input_size else infer_input_size(model)[0]
    dtype, device = model_dtype_device(model)
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((batch_size, *shape), generator=gen).to(device=device, dtype=dtype) for _ in range(n)]
