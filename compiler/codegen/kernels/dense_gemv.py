"""One-row dense linear (a decode step's GEMV), y = x W^T (+ b), with a stored tile.

Why: Inductor lowers a one-row matmul as a reduction whose tile coordinate descent
picks by timing in every compile; in one H200 profile its o projection of Llama-1B took
10.6 us where inductor-max's tile took 4.1 us for the same 8.4 MB (benchmarks/NOTES.md,
"Where the step's time goes"). This kernel launches a tile chosen once per target and
shape (kernels/gemv_tiles.py), so every process runs the same launch. On the H100 it is
not faster: Inductor's reduction beat the best tile by 4-9% on each shape swept, and
Llama-1B's step was 1.8% slower with it (NOTES, "A stored-tile decode GEMV"), so no
target turns the rewrite (codegen/decode_gemv) on until the H200 says otherwise.

Index math, for program (pid_n, pid_s) of the grid (cdiv(N, BLOCK_N), SPLIT):

    outputs n in [pid_n*BLOCK_N, +BLOCK_N)                     (masked n < N)
    inputs  k in [pid_s*K_PER_SPLIT, +K_PER_SPLIT), BLOCK_K at a time (masked k < K)
    x[k]     at x_ptr + k                                      (contiguous)
    W[n, k]  at w_ptr + n*stride_wn + k                        (rows contiguous)
    y[n]     at y_ptr + n; with SPLIT > 1 the fp32 partial part[s, n] at ws_ptr + s*N + n

Products accumulate in a [BLOCK_N, BLOCK_K] fp32 tile reduced once at the end, so a
trip's loads depend on nothing computed in the loop. A split launch's partials are
summed by torch ops in the host wrapper; inside Inductor that sum is traced and fused
into the consumer of y.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .sparse_linear import _interpreted

__all__ = ["GemvTile", "dense_gemv", "dense_gemv_kernel"]


@dataclass(frozen=True)
class GemvTile:
    block_n: int  # output rows per program (a power of two)
    block_k: int  # input channels per loop trip (a power of two)
    num_warps: int
    split: int = 1  # programs along K; > 1 writes fp32 partials

    def __str__(self) -> str:
        return f"n{self.block_n} k{self.block_k} w{self.num_warps} s{self.split}"


@triton.jit
def dense_gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, ws_ptr,
    N, K, K_PER_SPLIT, stride_wn,
    HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = offs_n.to(tl.int64) * stride_wn  # a weight of 2^31 elements or more (a large LM head)
    k_start = pid_s * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < k_end
        x = tl.load(x_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)
        # Each weight byte is read once per step: keep it from evicting what is reused.
        w = tl.load(w_ptr + rows[:, None] + kk[None, :],
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0, eviction_policy="evict_first")
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if PARTIAL:
        tl.store(ws_ptr + pid_s * N + offs_n, y, mask=n_mask)
    else:
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)


def dense_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile: GemvTile) -> torch.Tensor:
    """x [..., K] holding one row, weight [N, K], bias [N] or None -> [..., N] in x's
    dtype, accumulated in fp32, launched with `tile`."""
    K = x.shape[-1]
    N = weight.shape[0]
    assert K > 0 and x.numel() == K, f"dense_gemv takes one row, not empty; got x of shape {tuple(x.shape)}"
    assert weight.shape == (N, K), f"weight must be [N, {K}], got {tuple(weight.shape)}"
    xv = x.reshape(K).contiguous()
    w = weight if weight.stride(1) == 1 else weight.contiguous()
    b = bias.contiguous() if bias is not None else None
    # Slices of K whole BLOCK_K chunks, so no trip crosses into the next slice.
    chunks = triton.cdiv(K, tile.block_k)
    k_per_split = triton.cdiv(chunks, max(1, min(tile.split, chunks))) * tile.block_k
    split = triton.cdiv(K, k_per_split)
    partial = split > 1
    # The kernel writes either y or the partials; the other pointer (and the bias's, when
    # there is none) is never read or written.
    out = torch.empty((split, N) if partial else N, device=x.device, dtype=torch.float32 if partial else x.dtype)
    kernel = dense_gemv_kernel if _interpreted(dense_gemv_kernel) else wrap_triton(dense_gemv_kernel)
    kernel[(triton.cdiv(N, tile.block_n), split)](
        xv, w, b if b is not None else out, out, out,
        N, K, k_per_split, w.stride(0),
        HAS_BIAS=b is not None, PARTIAL=partial,
        BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, num_warps=tile.num_warps,
    )
    y = out
    if partial:
        y = out.sum(dim=0)
        if b is not None:
            y = y + b.to(torch.float32)
        y = y.to(x.dtype)
    return y.reshape(*x.shape[:-1], N)
