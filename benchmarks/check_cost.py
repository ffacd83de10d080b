"""What the per-layer check costs, as a multiple of the two plain forward passes it wraps.

    .venv/bin/python benchmarks/check_cost.py [--models resnet50,efficientnet_b0] [--side 224]

For each model: the reference and its BN-folded copy, both cast to float64 (the
dtype the check compares in). Printed side by side, measured in the same run:

- plain: one forward of the reference plus one of the candidate (float64);
- layers: ``compare_layers`` on the same input, given the fold's own map (both
  forwards with hooks, a record of every layer call, each candidate layer re-run
  on the reference's input); ``inferred``: the same with the fold map inferred
  from the two models (one more recorded forward, what ``normswap check A B`` does);
- noise: the float64 noise estimate the full check adds (a rounding-perturbed
  reference and the native float32 forward);
- check: ``normswap.check(..., layers=True, n_inputs=1)`` end to end, copies included.
"""
from __future__ import annotations

import argparse
import copy

import torch
from _common import timeit, timm_model

import normswap
from normswap import engine
from normswap.verify.check import UNIT_ROUNDOFF, _changed_tensors, _perturbed
from normswap.verify.layerwise import compare_layers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet50,efficientnet_b0,mobilenetv3_large_100")
    ap.add_argument("--side", type=int, default=224)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"{'model':24} {'plain s':>8} {'layers s':>9} {'layers/plain':>13} {'inferred/plain':>15} "
          f"{'noise s':>8} {'noise/plain':>12} {'check s':>8} {'check/plain':>12}")
    for name in args.models.split(","):
        model = timm_model(name, args.side)
        folded = normswap.fold(model, input_size=(1, 3, args.side, args.side), check=False)
        fold_map = engine.plan(model, "fold_bn", input_size=(1, 3, args.side, args.side)).fold_map
        ref64, cand64 = copy.deepcopy(model).double(), copy.deepcopy(folded).double()
        x = torch.randn(1, 3, args.side, args.side, dtype=torch.float64)
        noisy = _perturbed(ref64, _changed_tensors(model, folded), UNIT_ROUNDOFF[torch.float32], 0)
        with torch.no_grad():
            plain = timeit(lambda: (ref64(x), cand64(x)), repeat=args.repeat)
            noise = timeit(lambda: (noisy(x), model(x.float())), repeat=args.repeat)
        layers = timeit(lambda: compare_layers(ref64, cand64, (x,), fold_map), repeat=args.repeat)
        inferred = timeit(lambda: compare_layers(ref64, cand64, (x,)), repeat=args.repeat)
        full = timeit(lambda: normswap.check(model, folded, x.float(), layers=True, fold_map=fold_map),
                      repeat=args.repeat)
        print(f"{name:24} {plain:8.3f} {layers:9.3f} {layers / plain:13.2f} {inferred / plain:15.2f} "
              f"{noise:8.3f} {noise / plain:12.2f} {full:8.3f} {full / plain:12.2f}", flush=True)


if __name__ == "__main__":
    main()
