import os

import pytest
import torch
import torch.nn as nn

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


class ConvBN(nn.Module):
    """conv -> bn -> relu, twice, then a classifier: the smallest realistic BN net."""

    def __init__(self, c=16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = self.act(self.bn1(self.conv1(x)))
        x = self.act(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


@pytest.fixture
def convbn():
    from normswap.testing import randomize_bn

    torch.manual_seed(0)
    return randomize_bn(ConvBN(), (2, 3, 16, 16))


def write(path, text):
    path.write_text(text)
    return path
