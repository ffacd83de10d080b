"""The fold map: how each layer of a folded model lines up with the model it was folded from.

A fold makes layer names disagree on purpose (a conv now outputs what its BN
did), so the per-layer check needs the fold's own account of what went where.
``FoldSite.links`` (catalog/folding.py) makes these once; the fold returns them
with its plan and ``verify/layerwise.py`` reads them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("into", "folded", "next", "before", "normalized", "absorbs")


@dataclass(frozen=True)
class FoldLink:
    """A row of the folded model equals the reference's row through a BN's affine y = s·x + t along ``axis``.

    kind: "into" (the conv/linear that absorbed the BN), "folded" (what is left of the BN), "next" (the layer
    that absorbed the BN on its input), "before" (the BN folded into the next layer); for a LayerNorm/RMSNorm
    whose affine went into its readers (``bn`` is then the norm's path, (s, t) its γ and the β folded):
    "normalized" (the norm, now without affine: its output is the reference's through the inverse affine)
    and "absorbs" (a reader: run on the reference's input through the inverse affine).
    """

    kind: str
    bn: str  # the folded BN's path
    s: torch.Tensor  # float64, per channel of this row (a slice of the BN's channels for a concat)
    t: torch.Tensor
    axis: int = 1

    def describe(self) -> str:
        return {
            "into": f"holds {self.bn} folded in: compared with the reference's output through {self.bn}",
            "folded": f"folded away: compared on the reference's input through {self.bn}'s affine",
            "next": f"holds {self.bn} folded into its input: run on {self.bn}'s input",
            "before": "folded into the next layer: should pass its input through",
            "normalized": f"affine folded into its readers: compared through the inverse of {self.bn}'s affine",
            "absorbs": f"holds {self.bn}'s affine on its input: run on the reference's input through its inverse",
        }[self.kind]


FoldMap = dict[str, FoldLink]  # layer path -> how it lines up
