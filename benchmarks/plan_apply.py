"""Plan + apply of bn_to_gn on timm resnet50, model construction excluded.

    .venv/bin/python benchmarks/plan_apply.py [--repeat 7]

Prints the median time of plan+apply (a copy of the model, the default) and of
an in-place apply, beside one eval forward pass of the same model at 224x224 in
the same run, as a yardstick for this machine's speed.
"""
import argparse

import torch

from _common import timeit, timm_model

import normswap


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--model", default="resnet50")
    args = ap.parse_args()
    model = timm_model(args.model, 64)
    x = torch.randn(1, 3, 224, 224)

    def forward():
        with torch.no_grad():
            model(x)

    def copy_apply():
        normswap.apply(model, "bn_to_gn")

    def plan_only():
        normswap.plan(model, "bn_to_gn")

    t_fwd = timeit(forward, args.repeat)
    t_plan = timeit(plan_only, args.repeat)
    t_apply = timeit(copy_apply, args.repeat)
    fresh = [timm_model(args.model, 64) for _ in range(args.repeat + 1)]
    it = iter(fresh)
    t_inplace = timeit(lambda: normswap.apply(next(it), "bn_to_gn", inplace=True), args.repeat)
    print(f"{args.model}: median of {args.repeat} runs")
    print(f"  plan only                   {t_plan * 1000:8.1f} ms")
    print(f"  plan + apply (copy)         {t_apply * 1000:8.1f} ms   ({t_apply / t_fwd:.2f}x one forward)")
    print(f"  plan + apply (inplace=True) {t_inplace * 1000:8.1f} ms   ({t_inplace / t_fwd:.2f}x one forward)")
    print(f"  one eval forward, 1x3x224x224 {t_fwd * 1000:6.1f} ms")


if __name__ == "__main__":
    main()
