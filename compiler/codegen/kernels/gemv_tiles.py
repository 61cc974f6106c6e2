"""Tiles of the dense one-row GEMV (dense_gemv.py), per target and weight shape, as data.

A tile is chosen here once, not timed at compile or load, so the same program launches
the same kernels in every process. ``TILES`` holds the tiles measured best per shape
(``benchmarks/kernels_dense_gemv.py``, CUDA-graph timing over as many distinct weights
as a decode step reads, so they come from HBM, not L2); a shape not in the table gets
``default_tile``'s rule. ``cpu`` is the Triton interpreter of the tests: tiny tiles,
split in two, so small test shapes cover several programs and the partial sums.
"""

from __future__ import annotations

import triton

from .dense_gemv import GemvTile

__all__ = ["TILES", "default_tile", "gemv_tile"]

# (N, K) -> tile; filled from benchmarks/results/kernels_dense_gemv_<target>.json.
TILES: dict[str, dict[tuple[int, int], GemvTile]] = {"h100": {}, "h200": {}, "a100": {}}

_SMS = {"h100": 132, "h200": 132, "a100": 108}
# Weight elements one program holds per trip: 32 per thread at 4 warps.
_TILE_ELEMENTS = 4096


def default_tile(target: str, n: int, k: int) -> GemvTile:
    """Enough row blocks for two programs per SM where N allows (rows per program a power
    of two, 1..32), each trip a row block times up to 1024 channels; a grid still under
    one program per SM splits K in up to four."""
    if target == "cpu":
        return GemvTile(block_n=4, block_k=16, num_warps=1, split=2)
    sms = _SMS.get(target, 132)
    block_n = max(1, min(32, triton.next_power_of_2(max(1, n // (2 * sms)))))
    block_k = max(16, min(1024, _TILE_ELEMENTS // block_n, triton.next_power_of_2(k)))
    programs = triton.cdiv(n, block_n)
    split = 1 if programs >= sms else min(4, triton.cdiv(sms, programs), triton.cdiv(k, block_k))
    return GemvTile(block_n=block_n, block_k=block_k, num_warps=4, split=split)


def gemv_tile(target: str, n: int, k: int) -> GemvTile:
    """The stored tile for an [N, K] weight on `target`, else default_tile's."""
    return TILES.get(target, {}).get((n, k)) or default_tile(target, n, k)
