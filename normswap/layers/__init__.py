"""Normalization modules torch and timm lack."""
from .affine import ChannelAffine

__all__ = ["ChannelAffine"]
