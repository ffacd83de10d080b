"""Calibrated BN -> GN swaps across timm architectures: how much of the original function survives.

    .venv/bin/python benchmarks/calibration_zoo.py [--models a,b,...] [--side 96] [--timing]

Each model: random weights, BN statistics from a train-mode pass then perturbed
±25% (``normswap.testing.randomize_bn``), eval mode. ``bn_to_gn`` is applied
without and with calibration (8 batches of 8 standard-normal inputs, the same
distribution the BN statistics came from). Printed, side by side: the cosine
similarity of the swapped model's output to the original's on held-out batches
drawn the same way (not used for fitting), and on batches whose samples are
each scaled by a factor in [0.5, 2] and shifted (GroupNorm ignores a sample's
scale, BN does not: no target there). ``--timing``: resnet50 at 224x224,
calibration time against 8 plain forward passes.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import timeit, timm_model

import normswap
from normswap.metrics import cosine

MODELS = ("resnet18,resnet50,mobilenetv2_100,mobilenetv3_large_100,efficientnet_b0,regnetx_016,densenet121,"
          "dla34,ghostnet_100,resnext26ts,cspresnet50,rexnet_100")


def batches(n: int, side: int, seed: int, scaled: bool = False) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(8, 3, side, side, generator=gen)
        if scaled:
            x = x * (0.5 + 1.5 * torch.rand(8, 1, 1, 1, generator=gen)) + 0.5 * torch.randn(8, 1, 1, 1, generator=gen)
        out.append(x)
    return out


def fidelity(reference, model, data) -> float:
    with torch.no_grad():
        return min(cosine(reference(x), model(x)) for x in data)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--side", type=int, default=96)
    ap.add_argument("--timing", action="store_true")
    args = ap.parse_args()
    calib, held, scaled = batches(8, args.side, 1), batches(2, args.side, 2), batches(2, args.side, 3, scaled=True)
    print(f"{'model':24} {'cos plain':>10} {'cos calibrated':>15} {'scaled: plain':>14} {'scaled: calibrated':>19} "
          f"{'fit s':>6}")
    with_cal, without = [], []
    for name in args.models.split(","):
        model = timm_model(name, args.side)
        plain = normswap.apply(model, "bn_to_gn").eval()
        t = time.perf_counter()
        fitted = normswap.apply(model, "bn_to_gn", calibration=calib).eval()
        took = time.perf_counter() - t
        row = (fidelity(model, plain, held), fidelity(model, fitted, held),
               fidelity(model, plain, scaled), fidelity(model, fitted, scaled))
        without.append(row[0])
        with_cal.append(row[1])
        print(f"{name:24} {row[0]:10.4f} {row[1]:15.4f} {row[2]:14.4f} {row[3]:19.4f} {took:6.1f}", flush=True)
    print(f"{'median':24} {statistics.median(without):10.4f} {statistics.median(with_cal):15.4f}")
    print(f"calibrated cosine >= 0.99 on {sum(c >= 0.99 for c in with_cal)} of {len(with_cal)} models")
    if args.timing:
        model = timm_model("resnet50", 224)
        data = batches(8, 224, 4)

        def plain_forwards():
            with torch.no_grad():
                for x in data:
                    model(x)

        t_plain = timeit(plain_forwards, repeat=3)
        t_cal = timeit(lambda: normswap.apply(model, "bn_to_gn", calibration=data), repeat=3)
        print(f"resnet50, 8 batches of 8 at 224x224: 8 plain forwards {t_plain:.2f} s, calibrated bn_to_gn "
              f"{t_cal:.2f} s = {t_cal / t_plain:.2f}x")


if __name__ == "__main__":
    main()
