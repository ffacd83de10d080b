"""A style-transfer network switched from BatchNorm to InstanceNorm with ``bn_to_in``.

Feed-forward style transfer (Johnson et al.) works far better with InstanceNorm
(Ulyanov et al.): each image's contrast is normalized on its own, so one image
in the batch cannot change another's stylization. This builds the usual
encoder / residual / decoder network with BatchNorm (reflect padding), swaps its
norms, and shows that an image's output no longer depends on its batch mates.

    python examples/style_transfer.py
"""
import sys

import torch
import torch.nn as nn

import normswap
from normswap.testing import randomize_bn


def conv(cin, cout, k, stride=1):
    return nn.Sequential(nn.ReflectionPad2d(k // 2), nn.Conv2d(cin, cout, k, stride), nn.BatchNorm2d(cout), nn.ReLU())


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a = conv(c, c, 3)
        self.b = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.b(self.a(x))


class TransformerNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.encode = nn.Sequential(conv(3, 16, 9), conv(16, 32, 3, 2), conv(32, 64, 3, 2))
        self.residual = nn.Sequential(*[Residual(64) for _ in range(3)])
        self.decode = nn.Sequential(nn.Upsample(scale_factor=2), conv(64, 32, 3), nn.Upsample(scale_factor=2),
                                    conv(32, 16, 3), nn.ReflectionPad2d(4), nn.Conv2d(16, 3, 9))

    def forward(self, x):
        return self.decode(self.residual(self.encode(x)))


def main() -> int:
    torch.manual_seed(0)
    net = randomize_bn(TransformerNet(), (2, 3, 64, 64))
    styled, report = normswap.apply(net, "bn_to_in", return_report=True, input_size=(1, 3, 64, 64))
    print(f"bn_to_in: {len(report.changes)} BatchNorm2d -> InstanceNorm2d (γ/β carried), "
          f"{len(report.skipped)} skipped")
    image = torch.rand(1, 3, 64, 64)
    calm, loud = torch.cat([image, 0.1 * torch.rand(3, 3, 64, 64)]), torch.cat([image, 5 * torch.rand(3, 3, 64, 64)])
    for name, model in (("BatchNorm", net), ("InstanceNorm", styled)):
        model.train()
        with torch.no_grad():
            change = (model(calm)[0] - model(loud)[0]).abs().max().item()
        print(f"{name:12s}: the first image's output moves by {change:.3g} when its batch mates change")
    return 0


if __name__ == "__main__":
    sys.exit(main())
