"""Models and helpers the test files share (the CLI's ``--arch models:NAME`` builds them too)."""
import torch
import torch.nn as nn
from timm.layers import CondConv2d
from timm.layers.norm_act import BatchNormAct2d, FrozenBatchNormAct2d
from torchvision.ops.misc import FrozenBatchNorm2d

from normswap.families import family_of
from normswap.testing import randomize_bn


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


def convbn64():
    """The spec the CLI builds: ConvBN in float64 (state dicts loaded into it stay float64)."""
    return ConvBN().double()


class Branches(nn.Module):
    """Every kind of inspect row: folds, a concat split, a shared producer, BN-act, no running stats, GN."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = BatchNormAct2d(8)
        self.a = nn.Conv2d(8, 4, 1)
        self.b = nn.Conv2d(8, 4, 3, padding=1)
        self.cat_bn = nn.BatchNorm2d(8)
        self.shared = nn.Conv2d(8, 8, 1)
        self.shared_bn = nn.BatchNorm2d(8)
        self.batch_stats = nn.BatchNorm2d(8, track_running_stats=False)
        self.gn = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem_bn(self.stem(x))
        x = self.cat_bn(torch.cat([self.a(x), self.b(x)], dim=1))
        y = self.shared(x)
        x = self.shared_bn(y) + y
        x = self.gn(self.batch_stats(x))
        return self.head(x.mean((2, 3)))


def branches():
    torch.manual_seed(0)
    return randomize_bn(Branches(), (2, 3, 8, 8)).eval()


def bn_layers(model):
    """path -> module for every BatchNorm (frozen ones too) in the model."""
    return {n: m for n, m in model.named_modules() if family_of(m) in ("batchnorm", "frozen_batchnorm")}


# ------------------------------------------------------------------ fold patterns: producer -> BN


def prepared(model, shape, seed=0):
    torch.manual_seed(seed)
    randomize_bn(model, shape, seed=seed)
    return model.eval()


def seq(*mods):
    return nn.Sequential(*mods)


class LinearFlattenBN(nn.Module):
    """LeViT's LinearNorm: linear on (B, N, C), BN1d over the flattened (B*N, C), reshaped back."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 8, bias=False)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class LinearTransposeBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):  # (B, L, C) -> (B, C, L)
        return self.bn(self.linear(x).transpose(1, 2))


class ConcatBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1, bias=False)
        self.bn = nn.BatchNorm2d(10)

    def forward(self, x):
        return self.bn(torch.cat([self.a(x), self.b(x)], dim=1))


class CondConvBN(nn.Module):
    """efficientnet_cc's pattern: routing weights (not summing to 1) mix expert kernels, then BN-act."""

    def __init__(self, bias=False, padding="", stride=1):
        super().__init__()
        self.route = nn.Linear(3, 4)
        self.conv = CondConv2d(3, 8, 3, stride=stride, padding=padding, bias=bias, num_experts=4)
        self.bn = BatchNormAct2d(8, act_layer=nn.SiLU)
        if bias:
            with torch.no_grad():
                self.conv.bias.uniform_(-1, 1)

    def forward(self, x):
        return self.bn(self.conv(x, torch.sigmoid(self.route(x.mean((2, 3))))))


class InitOnlyConv3d(nn.Conv3d):
    """torchvision's video nets (Conv3DSimple): a subclass with an __init__ of its own, the base's forward."""

    def __init__(self, cin, cout):
        super().__init__(cin, cout, kernel_size=(1, 3, 3), padding=(0, 1, 1), bias=False)


class SharedWeightsOwnBNs(nn.Module):
    """Domain-specific BN: two convs share one weight, each has its own BN (each folds into its own copy)."""

    def __init__(self, read_weight=False, read_stats=False):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3)
        self.c2.weight = self.c1.weight
        self.b1, self.b2 = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.read_weight, self.read_stats = read_weight, read_stats

    def forward(self, x):
        y = self.b1(self.c1(x)) + self.b2(self.c2(x))
        if self.read_weight:  # the forward reads the conv's weight itself: a fold would change what it reads
            y = y + self.c1.weight.mean()
        if self.read_stats:
            y = y * self.b2.running_var.mean()
        return y


class SharedBN(nn.Module):
    """One BN called on two conv outputs: not foldable."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.c1(x)) + self.bn(self.c2(x))


# name -> (model factory, input shape): every producer -> BN pattern fold_bn folds exactly
PATTERNS = {
    "conv1d": (lambda: seq(nn.Conv1d(3, 8, 3), nn.BatchNorm1d(8)), (2, 3, 16)),
    "conv2d no bias": (lambda: seq(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)), (2, 3, 12, 12)),
    "conv2d grouped strided dilated": (lambda: seq(nn.Conv2d(4, 8, 3, stride=2, dilation=2, groups=2), nn.BatchNorm2d(8)), (2, 4, 16, 16)),
    "conv3d": (lambda: seq(nn.Conv3d(3, 4, 3), nn.BatchNorm3d(4)), (2, 3, 6, 6, 6)),
    "convtranspose1d": (lambda: seq(nn.ConvTranspose1d(4, 6, 3, stride=2), nn.BatchNorm1d(6)), (2, 4, 9)),
    "convtranspose2d grouped": (lambda: seq(nn.ConvTranspose2d(4, 6, 3, groups=2, bias=False), nn.BatchNorm2d(6)), (2, 4, 7, 7)),
    "convtranspose3d": (lambda: seq(nn.ConvTranspose3d(2, 4, 2, stride=2), nn.BatchNorm3d(4)), (2, 2, 3, 3, 3)),
    "linear": (lambda: seq(nn.Linear(5, 7), nn.BatchNorm1d(7)), (4, 5)),
    "bn-act keeps activation": (lambda: seq(nn.Conv2d(3, 8, 3), BatchNormAct2d(8, act_layer=nn.SiLU)), (2, 3, 10, 10)),
    "frozen bn (torchvision)": (lambda: seq(nn.Conv2d(3, 8, 3), FrozenBatchNorm2d(8)), (2, 3, 10, 10)),
    "frozen bn-act (timm)": (lambda: seq(nn.Conv2d(3, 8, 3), FrozenBatchNormAct2d(8)), (2, 3, 10, 10)),
    "condconv -> bn-act": (CondConvBN, (3, 3, 9, 9)),
    "condconv with expert biases, 'same' padding": (lambda: CondConvBN(bias=True, padding="same", stride=2),
                                                    (3, 3, 9, 9)),
    "linear -> flatten -> bn1d": (LinearFlattenBN, (2, 5, 6)),
    "linear -> transpose -> bn1d": (LinearTransposeBN, (2, 5, 6)),
    "bn after concat of convs": (ConcatBN, (2, 3, 8, 8)),
    "two convs sharing a weight, each with its own bn": (SharedWeightsOwnBNs, (2, 3, 8, 8)),
    "conv3d subclass with its own __init__ only": (lambda: seq(InitOnlyConv3d(3, 4), nn.BatchNorm3d(4)),
                                                   (2, 3, 3, 6, 6)),
}


# ------------------------------------------------------------------ into_next: BN -> the layer after it


class BNThen(nn.Module):
    """BN on the raw input, then a layer: only the layer after it can absorb the BN."""

    def __init__(self, bn, layer, act=None):
        super().__init__()
        self.bn, self.layer, self.act = bn, layer, act

    def forward(self, x):
        x = self.bn(x)
        return self.layer(self.act(x) if self.act is not None else x)


# name -> (model factory, input shape): BNs that fold into the layer after them with into_next=True
INTO_NEXT = {
    "conv, reflect padding": (lambda: BNThen(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")), (2, 4, 8, 8)),
    "conv, replicate padding": (lambda: BNThen(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=2, padding_mode="replicate")), (2, 4, 8, 8)),
    "conv, circular padding": (lambda: BNThen(nn.BatchNorm1d(4), nn.Conv1d(4, 6, 3, padding=1, padding_mode="circular")), (2, 4, 9)),
    "grouped strided conv, no padding": (lambda: BNThen(nn.BatchNorm2d(4), nn.Conv2d(4, 8, 3, stride=2, groups=2, bias=False)), (2, 4, 9, 9)),
    "linear": (lambda: BNThen(nn.BatchNorm1d(5), nn.Linear(5, 3)), (4, 5)),
}
