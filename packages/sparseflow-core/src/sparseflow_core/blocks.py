"""Block size selection: the spatial tile edge a sparse layer skips at, from its input feature map."""

from __future__ import annotations


def select_block_size(height: int) -> int | str:
    """Default rule: H >= 56 -> 16, 14 <= H < 56 -> 8, smaller -> ``"dense"`` (too few blocks to skip)."""
    if height >= 56:
        return 16
    if height >= 14:
        return 8
    return "dense"
