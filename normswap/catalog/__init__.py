"""The replacement catalog. Importing this package registers every built-in replacement with the registry.

norm_swaps: BN -> GroupNorm, InstanceNorm, LayerNorm, frozen, renorm, sync, IBN, EvoNorm, FRN, conditional
norms, weight-standardized conv, identity. weight_norms: spectral / weight / cosine norm and bake.
folding: BN folded into the conv/linear next to it. norm_affine: a LayerNorm/RMSNorm's affine folded into the
layers reading it. ln_to_rms: LayerNorm -> RMSNorm on a centred residual stream. fold_math and grouping:
their pure arithmetic.
"""
from . import folding, ln_to_rms, norm_affine, norm_swaps, weight_norms  # noqa: F401  (each module registers its factories)
