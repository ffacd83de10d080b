"""What exact recalibration costs, as a multiple of plain forward passes over the same data.

    .venv/bin/python benchmarks/recalibrate_cost.py [--model resnet50] [--batches 8] [--batch-size 8] [--side 224]

Side by side, in the same run, on the same batches: the plain eval forward
passes over the data; ``normswap.recalibrate`` (exact, one pass with every
sample in flight); the same forced into one partial pass per BN (what it does
when the data exceeds ``max_samples``); and torch's ``swa_utils.update_bn``
(one train-mode pass, a cumulative average: fast, not exact).
"""
from __future__ import annotations

import argparse
import copy

import torch
from _common import timeit, timm_model
from torch.optim.swa_utils import update_bn

import normswap


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--side", type=int, default=224)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--per-layer", action="store_true", help="also time the one-pass-per-BN mode (slow)")
    args = ap.parse_args()
    model = timm_model(args.model, args.side)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(args.batch_size, 3, args.side, args.side, generator=gen) for _ in range(args.batches)]

    def plain():
        with torch.no_grad():
            for b in batches:
                model(b)

    t_plain = timeit(plain, repeat=args.repeat)
    t_exact = timeit(lambda: normswap.recalibrate(model, batches), repeat=args.repeat)
    t_swa = timeit(lambda: update_bn(batches, copy.deepcopy(model)), repeat=args.repeat)
    print(f"{args.model}, {args.batches} batches of {args.batch_size} at {args.side}x{args.side}, "
          f"{torch.get_num_threads()} threads")
    print(f"  plain forwards       {t_plain:7.2f} s   1.00x")
    print(f"  normswap.recalibrate {t_exact:7.2f} s   {t_exact / t_plain:.2f}x   (exact, one pass)")
    print(f"  swa_utils.update_bn  {t_swa:7.2f} s   {t_swa / t_plain:.2f}x   (one train-mode pass, not exact)")
    if args.per_layer:
        t_layer = timeit(lambda: normswap.recalibrate(model, batches, max_samples=1), repeat=1, warmup=0)
        print(f"  per-layer mode       {t_layer:7.2f} s   {t_layer / t_plain:.2f}x   (exact, one partial pass per BN)")


if __name__ == "__main__":
    main()
