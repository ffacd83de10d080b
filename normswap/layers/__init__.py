"""Normalization modules torch and timm lack."""
from .affine import ChannelAffine
from .cond_conv import ShiftedCondConv2d
from .conditional import (
    ConditionalBatchNorm2d,
    ConditionalInstanceNorm2d,
    conditioned,
    set_condition,
)
from .cosine import CosineConv, CosineLinear
from .ibn import IBN
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d

__all__ = [
    "ChannelAffine",
    "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
    "IBN",
    "ConditionalInstanceNorm2d", "ConditionalBatchNorm2d", "set_condition", "conditioned",
    "CosineLinear", "CosineConv",
    "ShiftedCondConv2d",
]
