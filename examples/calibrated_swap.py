"""BN -> GN on a trained digits net, calibrated vs not, then fine-tuned at batch size 2.

Swapping BatchNorm for GroupNorm wrecks what a trained net learned, even with
γ/β carried: GN normalizes over another set. ``normswap.apply(...,
calibration=batches)`` fits each new layer's per-channel affine on a few
unlabeled batches so the swapped net starts where the original was. Both
versions are then fine-tuned at batch size 2 (where BN itself would fail), and
their test accuracy over the steps is written as a PNG.

    python examples/calibrated_swap.py [--steps 300] [--out docs/calibrated_swap.png]
"""
import argparse
import copy
import sys

import torch
import torch.nn.functional as F

import normswap
import normswap.passes.calibration
from digits import DigitsNet, accuracy, load_split, train


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--out", default="docs/calibrated_swap.png")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    x_train, x_test, y_train, y_test = load_split()
    model = train(DigitsNet(), x_train, y_train, 8)
    print(f"BatchNorm net, test accuracy {accuracy(model, x_test, y_test):.3f}")
    plain = normswap.apply(model, "bn_to_gn")
    fitted, report = normswap.apply(model, "bn_to_gn", calibration=list(x_train[:256].split(32)), return_report=True)
    print("\n".join(normswap.passes.calibration.CalibrationReport(**report.calibration).lines()))
    curves = {}
    for name, net in (("uncalibrated", plain), ("calibrated", fitted)):
        net = copy.deepcopy(net)
        opt = torch.optim.Adam(net.parameters(), lr=2e-4)
        gen = torch.Generator().manual_seed(1)
        points = [(0, accuracy(net, x_test, y_test))]
        for step in range(1, args.steps + 1):
            net.train()
            idx = torch.randint(len(x_train), (2,), generator=gen)
            loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % args.every == 0:
                points.append((step, accuracy(net, x_test, y_test)))
        curves[name] = points
        print(f"GroupNorm, {name:12s}: test accuracy {points[0][1]:.3f} at step 0, {points[-1][1]:.3f} after "
              f"{args.steps} steps at batch size 2")
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
        for name, points in curves.items():
            ax.plot(*zip(*points), marker="o", ms=3, label=f"bn_to_gn, {name}")
        ax.axhline(accuracy(model, x_test, y_test), color="gray", ls="--", lw=1, label="original BatchNorm net")
        ax.set_xlabel("fine-tuning step (batch size 2)")
        ax.set_ylabel("test accuracy")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
