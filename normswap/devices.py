"""Which device a model runs on: the CLI's ``--device``, and inputs moved to the model's device.

The Python API never moves a model: it works on the device the model is on, and
brings inputs (calibration batches, check inputs, recalibration data) there. The
CLI loads on the CPU and moves the model to ``--device`` before anything runs;
outputs are written from the CPU, so they load on any machine.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from .errors import InputSpecError


def device_named(text: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` -> torch.device, checked against what this machine has."""
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise InputSpecError(f"--device {text!r} is not a device", fix="use --device cpu or --device cuda") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise InputSpecError(f"--device {text}: normswap runs models on cpu or cuda", fix="use --device cpu or cuda")
    if not torch.cuda.is_available():
        built = "with" if torch.version.cuda else "without"
        raise InputSpecError(f"--device {text}: CUDA is not available here (torch {torch.__version__}, built {built} "
                             "CUDA, sees no GPU)", fix="use --device cpu, or run where a GPU is visible")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise InputSpecError(f"--device {text}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}",
                             fix="use --device cuda (the current device) or an index that exists")
    return device


def torch_device_name(device: torch.device) -> str:
    """What to call the device in a report: the GPU's name for CUDA."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def to_device(args: Any, device: torch.device) -> Any:
    """Every tensor in ``args`` (a tensor, tuple, list or dict of them) moved to ``device``; others as they are."""
    return pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) and x.device != device else x, args)
