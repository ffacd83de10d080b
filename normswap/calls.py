"""One call of a model: its inputs as positional arguments or keyword arguments, and the call itself.

Image models take a tensor (or a tuple of arguments); language models take
keywords (``input_ids``, ``attention_mask``). Everything that runs a model on
given inputs (the recorded pass, checks, calibration) goes through ``run``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


def as_args(inputs: Any) -> tuple | dict:
    """One call's inputs: a tuple of positional arguments, or a dict of keyword arguments (a language
    model's ``input_ids`` / ``attention_mask``); a lone tensor becomes a one-argument tuple."""
    return inputs if isinstance(inputs, (tuple, dict)) else (inputs,)


def run(model: nn.Module, args: tuple | dict) -> Any:
    """``model`` called on one call's inputs (see ``as_args``)."""
    return model(**args) if isinstance(args, dict) else model(*args)


def first_tensor(args: tuple | dict) -> torch.Tensor | None:
    """The first tensor argument: what a batch's size and shape are read from."""
    values = args.values() if isinstance(args, dict) else args
    return next((v for v in values if isinstance(v, torch.Tensor)), None)
