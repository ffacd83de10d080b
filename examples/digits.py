"""A small BatchNorm conv net on scikit-learn's bundled digits (8x8, no download), shared by the examples.

    from digits import DigitsNet, accuracy, load_split, train
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class DigitsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(block(1, 16), block(16, 32), nn.MaxPool2d(2), block(32, 64), nn.MaxPool2d(2))
        self.head = nn.Linear(64 * 2 * 2, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def load_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, x_test, y_train, y_test): images in [0, 1] as (N, 1, 8, 8), a stratified 70/30 split."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    return tuple(train_test_split(x, y, test_size=0.3, random_state=0, stratify=y))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, *, batch: int = 64,
          lr: float = 3e-3) -> nn.Module:
    """Adam on shuffled mini-batches; returns the model in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(batch):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()
