"""Scale: time per block as networks grow to 10,000 conv/BN blocks, and the peak memory of an in-place fold of
a model of more than 1 GB.

    .venv/bin/python benchmarks/scale.py [--blocks 100,1000,10000] [--memory-only | --time-only]

Time: synthetic networks of N blocks (Conv2d(4, 4, 3) -> BatchNorm2d -> ReLU) on
a 1x4x8x8 input; per block, the median of 3 runs of plan + apply of
``bn_to_gn`` (on a copy) and of ``fold`` (analysis and copy included, check
off). Flat means the 10,000-block figure is within 2x of the 100-block one.

Memory: a model of 8 blocks Conv2d(2048, 2048, 3) -> BatchNorm2d (1.2 GB of
float32 parameters) folded in place (``low_memory=True``, check off) in a
fresh process; peak RSS (VmHWM, reset through /proc/self/clear_refs right
before the fold) minus the RSS before it. Limit: max(10% of the model,
3 x its largest layer in float64).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
import torch.nn as nn


def blocks(n: int, c: int = 4) -> nn.Sequential:
    layers = []
    for _ in range(n):
        layers += [nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
    return nn.Sequential(*layers).eval()


def per_block(n: int) -> tuple[float, float]:
    import normswap

    model = blocks(n)
    shape = (1, 4, 8, 8)

    def best(fn) -> float:
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return sorted(times)[1] / n

    return (best(lambda: normswap.apply(model, "bn_to_gn")),
            best(lambda: normswap.fold(model, input_size=shape, check=False)))


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def memory_child() -> None:
    """Run in a fresh process: build, fold in place, print the figures as JSON."""
    import normswap
    from normswap.testing import randomize_bn

    torch.set_num_threads(2)
    layers = []
    for _ in range(8):
        layers += [nn.Conv2d(2048, 2048, 3, padding=1, bias=False), nn.BatchNorm2d(2048)]
    model = nn.Sequential(*layers)
    randomize_bn(model, (2, 2048, 4, 4))
    model.eval()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    largest64 = max(p.numel() for p in model.parameters()) * 8
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    t = time.perf_counter()
    normswap.fold(model, input_size=(1, 2048, 4, 4), check=False, inplace=True, low_memory=True)
    took = time.perf_counter() - t
    peak = _status("VmHWM")
    print(json.dumps({"model_bytes": size, "largest_layer_float64": largest64, "rss_before": before,
                      "peak": peak, "increase": peak - before, "limit": max(0.1 * size, 3 * largest64),
                      "seconds": took}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", default="100,1000,10000")
    ap.add_argument("--memory-only", action="store_true")
    ap.add_argument("--time-only", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        memory_child()
        return
    if not args.memory_only:
        torch.set_num_threads(1)
        rows = []
        print(f"{'blocks':>7} {'bn_to_gn ms/block':>18} {'fold ms/block':>14}")
        for n in map(int, args.blocks.split(",")):
            gn, fold = per_block(n)
            rows.append((n, gn, fold))
            print(f"{n:7d} {gn * 1e3:18.3f} {fold * 1e3:14.3f}", flush=True)
        first, last = rows[0], rows[-1]
        print(f"largest / smallest per block: bn_to_gn {last[1] / first[1]:.2f}x, fold {last[2] / first[2]:.2f}x "
              "(flat: within 2x)")
    if not args.time_only:
        proc = subprocess.run([sys.executable, __file__, "--child"], capture_output=True, text=True, check=True)
        m = json.loads(proc.stdout.strip().splitlines()[-1])
        gb = 1 << 30
        print(f"in-place fold of a {m['model_bytes'] / gb:.2f} GB model: peak RSS +{m['increase'] / gb:.3f} GB "
              f"(limit {m['limit'] / gb:.3f} GB = max(10% of the model, 3 x largest layer in float64)), "
              f"{m['seconds']:.1f} s")


if __name__ == "__main__":
    main()
