"""BatchNorm vs GroupNorm when the batch is tiny: the same small CNN trained at batch size 2 on digits.

A pretrained BN network fine-tuned at batch size 2 normalizes with the noisy
statistics of two samples in training and with its running statistics at test
time. GroupNorm (``bn_to_gn``) normalizes each sample on its own. This trains
both from the same starting weights on scikit-learn's 8x8 digits and plots the
test accuracy to a PNG (needs matplotlib: ``pip install matplotlib``).

    python examples/small_batch.py [--steps 300] [--out small_batch.png]
"""
import argparse
import copy
import sys

import torch
import torch.nn as nn
from sklearn.datasets import load_digits

import normswap


def digits():
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    x, y = x[order], y[order]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def small_cnn() -> nn.Module:
    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    return nn.Sequential(block(1, 32), block(32, 32), nn.MaxPool2d(2), block(32, 64), nn.Flatten(),
                         nn.Linear(64 * 4 * 4, 10))


LR = 0.01


def train(model, train_set, test_set, steps, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    (x, y), (xt, yt) = train_set, test_set
    curve = []
    for step in range(1, steps + 1):
        idx = torch.randint(len(y), (batch,), generator=g)
        model.train()
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, steps // 20) == 0 or step == steps:
            model.eval()
            with torch.no_grad():
                curve.append((step, (model(xt).argmax(1) == yt).float().mean().item()))
    return curve


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--out", default="small_batch.png")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    torch.manual_seed(0)
    train_set, test_set = digits()
    bn = small_cnn()
    gn = normswap.apply(copy.deepcopy(bn), "bn_to_gn", input_size=(1, 1, 8, 8))
    curves = {"BatchNorm": train(bn, train_set, test_set, args.steps, args.batch),
              "GroupNorm (bn_to_gn)": train(gn, train_set, test_set, args.steps, args.batch)}
    for name, curve in curves.items():
        print(f"{name:22s} test accuracy after {args.steps} steps at batch {args.batch}: {curve[-1][1]:.3f}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written")
        return 0
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot([s for s, _ in curve], [a for _, a in curve], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy (eval mode)")
    ax.set_title(f"digits, batch size {args.batch}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
