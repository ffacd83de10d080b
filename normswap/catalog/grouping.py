"""Group-count policy for GroupNorm: pure integer arithmetic, no torch."""
from __future__ import annotations


def valid_group_counts(channels: int, min_group_size: int) -> list[int]:
    """Group counts that divide ``channels`` and leave at least ``min_group_size`` channels per group.

    A layer narrower than ``min_group_size`` can only be one group.
    """
    out = [g for g in range(1, channels + 1) if channels % g == 0 and channels // g >= min_group_size]
    return out or [1]


def choose_num_groups(channels: int, target: int, min_group_size: int) -> int:
    """The valid group count nearest ``target``; on a tie the smaller count (larger groups)."""
    return min(valid_group_counts(channels, min_group_size), key=lambda g: (abs(g - target), g))
