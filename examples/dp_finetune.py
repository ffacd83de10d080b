"""Differentially private fine-tuning with Opacus after a BatchNorm swap.

DP-SGD clips each sample's gradient, so no layer may mix samples: BatchNorm is
forbidden. ``bn_to_gn`` swaps it (carrying γ/β), ``prepare_for_opacus`` removes
the in-place ops that break Opacus's hooks, and Opacus's PrivacyEngine trains
the result on scikit-learn's digits (upsampled to 32x32) with a privacy budget.

    python examples/dp_finetune.py [--epochs 2]
"""
import argparse
import sys
import warnings

import timm
import torch
import torch.nn as nn
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import normswap
from normswap.testing import randomize_bn


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--arch", default="resnet10t")
    args = p.parse_args(argv)
    from opacus import PrivacyEngine

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    data = load_digits()
    x = nn.functional.interpolate(torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0, size=32)
    x = x.repeat(1, 3, 1, 1)
    y = torch.tensor(data.target)
    train, test = TensorDataset(x[:1400], y[:1400]), (x[1400:], y[1400:])

    model = timm.create_model(args.arch, pretrained=False, num_classes=10)
    randomize_bn(model, (4, 3, 32, 32))  # stands in for pretrained statistics
    model = normswap.apply(model, "bn_to_gn", input_size=(1, 3, 32, 32))
    model, notes = normswap.prepare_for_opacus(model, input_size=(2, 3, 32, 32))
    print("prepared:", "; ".join(notes))

    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(module=model, optimizer=opt,
                                             data_loader=DataLoader(train, batch_size=64, shuffle=True),
                                             noise_multiplier=1.0, max_grad_norm=1.0)
    for epoch in range(args.epochs):
        model.train()
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(test[0]).argmax(1) == test[1]).float().mean().item()
        print(f"epoch {epoch + 1}: test accuracy {acc:.3f}, ε = {engine.get_epsilon(delta=1e-5):.2f} (δ = 1e-5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
