"""A domain shift repaired by recalibration (AdaBN): new BatchNorm statistics, no labels, no training.

A small BN conv net is trained on scikit-learn's digits (8×8, no download). The
"new camera" domain is the same digits with lower contrast, a brighter
background and sensor noise. Evaluated there, the net's accuracy drops; after
``normswap.recalibrate`` on unlabeled images from the new domain (the training
split, shifted), most of it comes back. Only BN running statistics change.

    python examples/domain_shift.py [--epochs 15]
"""
import argparse
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import normswap


def block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class DigitsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(block(1, 16), block(16, 32), nn.MaxPool2d(2), block(32, 64), nn.MaxPool2d(2))
        self.head = nn.Linear(64 * 2 * 2, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def shift(x: torch.Tensor, seed: int) -> torch.Tensor:
    """The new domain: half the contrast, a brighter background, and noise."""
    gen = torch.Generator().manual_seed(seed)
    return 0.5 * x + 0.6 + 0.1 * torch.randn(x.shape, generator=gen)


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=15)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    model = DigitsNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(args.epochs):
        model.train()
        for idx in torch.randperm(len(x_train)).split(64):
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    shifted_test = shift(x_test, seed=1)
    unlabeled = list(shift(x_train, seed=2).split(128))  # images from the new domain; their labels are not used
    fixed, report = normswap.recalibrate(model, unlabeled, return_report=True)
    print(f"source domain, test accuracy:            {accuracy(model, x_test, y_test):.3f}")
    print(f"shifted domain, before recalibration:    {accuracy(model, shifted_test, y_test):.3f}")
    print(f"shifted domain, after recalibration:     {accuracy(fixed, shifted_test, y_test):.3f}")
    print("\n".join(report.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
