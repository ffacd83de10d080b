"""Calibrated BN -> GN swaps across timm architectures: how much of the original function survives.

    .venv/bin/python benchmarks/calibration_zoo.py [--models a,b,...] [--side cfg|96] [--threads 1] [--timing]
                                                   [--num-groups N] [--drop-se] [--tolerance T]

Each model: random weights, BN statistics from a train-mode pass then perturbed
±25% (``timm_model`` below), eval mode, at ``--side``: by default
each model's own input size (``pretrained_cfg``, the size a user calibrates
at). ``bn_to_gn`` is applied without calibration, with calibration (8 batches
of 8 standard-normal inputs, the distribution the BN statistics came from;
the recipe's group counts), and with calibration choosing the group counts
(``calibration_groups="auto"``). Printed, side by side: the cosine similarity of
the swapped model's output to the original's on 2 held-out batches drawn the
same way (not used for fitting; the worse of the two), and on 2 batches whose
samples are each multiplied by a factor in [0.5, 2] and shifted (GroupNorm
ignores a sample's scale, BN does not: no target there). ``--timing``: resnet50
at 224x224, calibration time against 8 plain forward passes. To find where the
function is lost: ``--num-groups 1`` (the recipe's group count; 1 is the most
any GroupNorm keeps here) and ``--drop-se`` (every squeeze-excitation module
``*.se`` replaced by Identity before the BN statistics are taken).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import timeit

import normswap
from normswap.verify.metrics import cosine

# The first twelve are the original sweep; efficientnet_lite0 and mnasnet_100 are SE-free relatives of
# efficientnet_b0 and mobilenetv3 (squeeze-excitation is where those lose most), hrnet_w18_small a multi-branch net.
MODELS = ("resnet18,resnet50,mobilenetv2_100,mobilenetv3_large_100,efficientnet_b0,regnetx_016,densenet121,"
          "dla34,ghostnet_100,resnext26ts,cspresnet50,rexnet_100,efficientnet_lite0,mnasnet_100,hrnet_w18_small")


def batches(n: int, side: int, seed: int, scaled: bool = False) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(8, 3, side, side, generator=gen)
        if scaled:
            x = x * (0.5 + 1.5 * torch.rand(8, 1, 1, 1, generator=gen)) + 0.5 * torch.randn(8, 1, 1, 1, generator=gen)
        out.append(x)
    return out


@torch.no_grad()
def timm_model(name: str, side: int, seed: int = 0, batch: int = 4, perturb: float = 0.25, drop_se: bool = False):
    """Random weights; each BN's γ in [0.5, 1.5], β in [-0.2, 0.2], statistics from one train-mode pass over
    ``batch`` standard-normal inputs, then each running mean and variance scaled by a factor in 1 ± ``perturb``."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    if drop_se:
        for path, _ in list(model.named_modules()):
            if path.endswith(".se"):
                setattr(model.get_submodule(path.rsplit(".", 1)[0]), "se", torch.nn.Identity())
    gen = torch.Generator().manual_seed(seed)

    def uniform(t, lo, hi):
        return (torch.rand(t.shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(t)

    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        if m.weight is not None:
            m.weight.copy_(uniform(m.weight, 0.5, 1.5))
            m.bias.copy_(uniform(m.bias, -0.2, 0.2))
        m.momentum = 1.0  # the running statistics become exactly this batch's
    model.eval()
    for m in bns:
        m.train()
    model(torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float())
    model.eval()
    for m in bns:
        m.momentum = 0.1
        m.running_mean.mul_(uniform(m.running_mean, 1 - perturb, 1 + perturb))
        m.running_var.mul_(uniform(m.running_var, 1 - perturb, 1 + perturb))
    return model


def fidelity(reference, model, data) -> float:
    with torch.no_grad():
        return min(cosine(reference(x), model(x)) for x in data)


def input_side(name: str, side: str) -> int:
    if side != "cfg":
        return int(side)
    import timm

    return int(timm.models.get_pretrained_cfg(name).input_size[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--side", default="cfg", help="input side: 'cfg' (each model's pretrained_cfg) or pixels")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timing", action="store_true")
    ap.add_argument("--num-groups", type=int, default=32, help="the recipe's num_groups")
    ap.add_argument("--drop-se", action="store_true", help="replace every *.se module by Identity")
    ap.add_argument("--tolerance", type=float, help="calibration_groups for the auto column (default 'auto')")
    args = ap.parse_args()
    kw = {"num_groups": args.num_groups}
    torch.set_num_threads(args.threads)
    print(f"{'model':22} {'side':>4} {'plain':>7} {'calibrated':>10} {'auto groups':>11} {'groups':>9} "
          f"{'scaled: plain':>13} {'calibrated':>10} {'auto':>7} {'fit s':>6}")
    cols: dict[str, list[float]] = {"plain": [], "keep": [], "auto": []}
    for name in args.models.split(","):
        side = input_side(name, args.side)
        calib, held, scaled = batches(8, side, 1), batches(2, side, 2), batches(2, side, 3, scaled=True)
        model = timm_model(name, side, drop_se=args.drop_se)
        plain = normswap.apply(model, "bn_to_gn", **kw).eval()
        t = time.perf_counter()
        fitted = normswap.apply(model, "bn_to_gn", calibration=calib, **kw).eval()
        took = time.perf_counter() - t
        auto, report = normswap.apply(model, "bn_to_gn", calibration=calib, return_report=True,
                                      calibration_groups="auto" if args.tolerance is None else args.tolerance, **kw)
        auto.eval()
        layers = report.calibration["layers"]
        chosen = [r for r in layers if "groups_built" in r]
        groups = (f"{statistics.median_low(r['groups'] for r in chosen)}/"
                  f"{statistics.median_low(r['groups_built'] for r in chosen)}") if chosen else "-"
        row = [fidelity(model, m, held) for m in (plain, fitted, auto)]
        row += [fidelity(model, m, scaled) for m in (plain, fitted, auto)]
        for key, value in zip(cols, row):
            cols[key].append(value)
        print(f"{name:22} {side:4} {row[0]:7.4f} {row[1]:10.4f} {row[2]:11.4f} {groups:>9} "
              f"{row[3]:13.4f} {row[4]:10.4f} {row[5]:7.4f} {took:6.1f}", flush=True)
    print(f"{'median':22} {'':4} {statistics.median(cols['plain']):7.4f} {statistics.median(cols['keep']):10.4f} "
          f"{statistics.median(cols['auto']):11.4f}")
    for key, label in (("keep", "calibrated"), ("auto", "calibrated, auto groups")):
        print(f"{label}: cosine >= 0.99 on {sum(c >= 0.99 for c in cols[key])} of {len(cols[key])} models")
    print("groups: median group count per layer, auto / the recipe's")
    if args.timing:
        model = timm_model("resnet50", 224)
        data = batches(8, 224, 4)

        def plain_forwards():
            with torch.no_grad():
                for x in data:
                    model(x)

        t_plain = timeit(plain_forwards, repeat=3)
        t_cal = timeit(lambda: normswap.apply(model, "bn_to_gn", calibration=data), repeat=3)
        t_auto = timeit(lambda: normswap.apply(model, "bn_to_gn", calibration=data, calibration_groups="auto"),
                        repeat=3)
        print(f"(wall time, {torch.get_num_threads()} thread(s))")
        print(f"resnet50, 8 batches of 8 at 224x224: 8 plain forwards {t_plain:.2f} s, calibrated bn_to_gn "
              f"{t_cal:.2f} s = {t_cal / t_plain:.2f}x, with auto groups {t_auto:.2f} s = {t_auto / t_plain:.2f}x")


if __name__ == "__main__":
    main()
