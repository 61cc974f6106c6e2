"""The greedy token of a decode step: argmax over the vocabulary in two stages.

torch's argmax over one long row (Llama-3's 128,256 logits) runs as one reduction per
output row, and in Llama-1B's decode step on the H200 it took about 29 us, more than a
whole layer's attention (benchmarks/NOTES.md). Viewing the row as [chunks, width] and
reducing each chunk first gives the GPU one block per chunk, then a short reduction
over the chunk maxima. The result is exactly torch.argmax's: within a chunk max()
returns the first maximal index, and among chunks argmax returns the first chunk that
holds the maximum, so the first maximal index overall (NaN counts as the maximum in
both, so a NaN wins as it does in torch.argmax).
"""

from __future__ import annotations


import torch

# Chunk widths tried, widest first: wide enough that the second stage is short, narrow
# enough that the first has a block per chunk for every SM.
_WIDTHS = (1024, 768, 512, 384, 256)


def chunk_width(vocab: int) -> int | None:
    """A width that divides `vocab` into at least 32 chunks, or None (one stage then)."""
    for width in _WIDTHS:
        if vocab % width == 0 and vocab // width >= 32:
            return width
    return None


def greedy_token(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> the argmax token per row, [B, 1] (torch.long)."""
    B, V = logits.shape
    width = chunk_width(V)
    if width is None:
        return logits.argmax(dim=-1, keepdim=True)
    best, within = logits.reshape(B, V // width, width).max(dim=-1)
    chunk = best.argmax(dim=-1, keepdim=True)
    return chunk * width + within.gather(1, chunk)


__all__ = ["chunk_width", "greedy_token"]
