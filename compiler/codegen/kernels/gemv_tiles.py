"""Tiles of the dense one-row GEMV (dense_gemv.py), per target and weight shape, as data.

A tile is chosen here once, not timed at compile or load, so the same program launches
the same kernels in every process. ``default_tile`` is the rule for every shape;
``TILES`` holds the shapes where a measured sweep (``benchmarks/kernels_dense_gemv.py``,
CUDA-graph timing over as many distinct weights as fill three times the L2, so they come
from HBM as in a decode step) found a better tile than the rule. On the H100 it found
none: the rule's tile was the best or within 1% of it on all four shapes swept
(``benchmarks/results/kernels_dense_gemv_h100.json``). ``cpu`` is the Triton interpreter
of the tests: tiny tiles, split in two, so small test shapes cover several programs and
the partial sums.
"""

from __future__ import annotations

import triton

from .dense_gemv import GemvTile

__all__ = ["TILES", "default_tile", "gemv_tile"]

# (N, K) -> tile, where a sweep on the target beat default_tile's.
TILES: dict[str, dict[tuple[int, int], GemvTile]] = {"h100": {}, "h200": {}, "a100": {}}

_SMS = {"h100": 132, "h200": 132, "a100": 108}


def default_tile(target: str, n: int, k: int) -> GemvTile:
    """One output row per program, up to 1024 channels a trip, 4 warps: the tile within
    a few percent of the best on every shape swept (kernels_dense_gemv_h100.json). A
    grid of fewer programs than SMs splits K in up to four."""
    if target == "cpu":
        return GemvTile(block_n=4, block_k=16, num_warps=1, split=2)
    sms = _SMS.get(target, 132)
    block_k = max(16, min(1024, triton.next_power_of_2(k)))
    split = 1 if n >= sms else min(4, triton.cdiv(sms, n), triton.cdiv(k, block_k))
    return GemvTile(block_n=1, block_k=block_k, num_warps=4, split=split)


def gemv_tile(target: str, n: int, k: int) -> GemvTile:
    """The stored tile for an [N, K] weight on `target`, else default_tile's."""
    return TILES.get(target, {}).get((n, k)) or default_tile(target, n, k)
