"""A DCGAN-style discriminator given spectral norm by recipe, then trained a few GAN steps on digits.

Spectral normalization (Miyato et al.) divides each weight by its largest
singular value, so every layer of the critic is 1-Lipschitz. This builds a
small GAN on scikit-learn's digits (8×8 images, no download), applies the
``spectral_norm`` recipe to the discriminator only (``paths=discriminator.**``,
``drop_batchnorm=true``), trains both nets for a few steps, and prints the largest
singular value of every discriminator weight: the raw weights before, and the
weights the layers actually use after training.

    python examples/sn_discriminator.py [--steps 200]
"""
import argparse
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits

import normswap


class Generator(nn.Module):
    def __init__(self, z=16):
        super().__init__()
        self.fc = nn.Linear(z, 32 * 2 * 2)
        self.up1 = nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1)  # 2 -> 4
        self.bn1 = nn.BatchNorm2d(16)
        self.up2 = nn.ConvTranspose2d(16, 1, 4, stride=2, padding=1)  # 4 -> 8

    def forward(self, z):
        x = F.relu(self.fc(z)).view(-1, 32, 2, 2)
        return torch.tanh(self.up2(F.relu(self.bn1(self.up1(x)))))


class Discriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 4, stride=2, padding=1)  # 8 -> 4
        self.conv2 = nn.Conv2d(32, 64, 4, stride=2, padding=1)  # 4 -> 2
        self.bn2 = nn.BatchNorm2d(64)
        self.fc = nn.Linear(64 * 2 * 2, 1)

    def forward(self, x):
        x = F.leaky_relu(self.conv1(x), 0.2)
        x = F.leaky_relu(self.bn2(self.conv2(x)), 0.2)
        return self.fc(x.flatten(1))


class GAN(nn.Module):
    def __init__(self):
        super().__init__()
        self.generator = Generator()
        self.discriminator = Discriminator()

    def forward(self, z):
        """The discriminator's score of generated images."""
        return self.discriminator(self.generator(z))


def largest_singular_values(model: nn.Module) -> dict[str, float]:
    """σ₁ of each conv/linear weight as the layer uses it (output channels first, as spectral norm reshapes)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            out[name] = torch.linalg.matrix_norm(m.weight.detach().flatten(1).double(), ord=2).item()
    return out


def digits() -> torch.Tensor:
    images = torch.tensor(load_digits().images, dtype=torch.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    return (images * 2 - 1).unsqueeze(1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    data = digits()
    gan = GAN()
    before = largest_singular_values(gan.discriminator)
    gan, report = normswap.apply(gan, "spectral_norm", paths="discriminator.**", drop_batchnorm=True,
                                 return_report=True)
    print(f"spectral_norm on discriminator.**: {len(report.changes)} layer(s) changed "
          f"({', '.join(c['path'] + ' ' + c['new'] for c in report.changes)})")
    g, d = gan.generator, gan.discriminator
    opt_g = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    gan.train()
    for step in range(args.steps):
        real = data[torch.randint(len(data), (64,))]
        fake = g(torch.randn(64, 16))
        loss_d = F.relu(1 - d(real)).mean() + F.relu(1 + d(fake.detach())).mean()  # hinge loss
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        loss_g = -d(fake).mean()
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
    print(f"trained {args.steps} steps: discriminator loss {loss_d.item():.3f}, generator loss {loss_g.item():.3f}")
    after = largest_singular_values(d)
    print(f"{'layer':8} {'sigma_1 before':>15} {'sigma_1 after':>14}")
    for name in before:
        print(f"{name:8} {before[name]:15.3f} {after[name]:14.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
