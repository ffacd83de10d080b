"""Helpers shared by the benchmark scripts: timing, model construction, and the zoo sweeps' guards and
output comparison."""
from __future__ import annotations

import contextlib
import signal
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


def error_text(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


@contextlib.contextmanager
def time_limit(seconds: int):
    def expire(signum, frame):
        raise TimeoutError(f"over the {seconds} s limit")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def tensors_of(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in tensors_of(o)]
    return []


def relative_error(ref, out) -> float:
    a, b = tensors_of(ref), tensors_of(out)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    err = max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))
    scale = max(x.double().abs().max().item() for x in a)
    return err / max(scale, 1e-30)
