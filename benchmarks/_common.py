"""Helpers shared by the benchmark scripts: timing and model construction."""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
torch.set_num_threads(2)


def timeit(fn, repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeat`` runs, after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def timm_model(name: str, side: int, seed: int = 0):
    import timm

    from normswap.testing import randomize_bn

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    randomize_bn(model, (2, 3, side, side), seed=seed)
    return model.eval()
