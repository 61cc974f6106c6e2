"""One-token activation-sparse GEMV that reads only the weight rows of active channels,
with every load full: the active channels are compacted first.

Why compaction: the masked GEMV of ``sparse_linear.py`` skips inactive rows by masking
their loads, so at sparsity s each load instruction moves (1 - s) of a tile's bytes and
the bytes in flight per SM fall with s; a weight-read-bound kernel then runs at the
same number of loop trips, each moving less. Here each program first lists the active
channels of its slice of K (a prefix sum over the keep mask), then loops over that list
BLOCK_K rows at a time, so every trip gathers BLOCK_K full rows and the trip count
falls with s.

Index math, for program (pid_n, pid_s) of the grid (cdiv(N, BLOCK_N), cdiv(K, SLICE)):

    channels k in [pid_s*SLICE, +SLICE)             (masked k < K)
    outputs  n in [pid_n*BLOCK_N, +BLOCK_N)         (masked n < N)
    x[k]           at x_ptr + k*stride_xk
    t[k]           at thr_ptr + k*stride_t           (stride_t = 0: one per-layer value)
    weight_t[k, n] at w_ptr + k*stride_wk + n        (rows contiguous)
    list[s, j]     at idx_ptr + s*SLICE + j, val_ptr + s*SLICE + j   (j < count)
    part[s, n]     at ws_ptr + s*stride_wss + n      (fp32, when there are several slices)

The list of slice s is written by every program of that slice, with identical values
(each program computes it from the same x), and read back by the same program after a
block barrier (``tl.debug_barrier``: bar.sync makes a block's global writes visible to
the block). Programs of one slice may overwrite each other's entries, but only with the
value already there, so no program reads a value that differs from its own.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["sparse_gemv_kernel"]


@triton.jit
def sparse_gemv_kernel(
    x_ptr, w_ptr, thr_ptr, b_ptr, y_ptr, ws_ptr, idx_ptr, val_ptr,
    N, K,
    stride_xk, stride_wk, stride_t, stride_wss,
    HAS_BIAS: tl.constexpr,
    DIRECT_OUT: tl.constexpr,  # a single slice: write y (bias, cast) from this kernel
    SLICE: tl.constexpr,       # channels per program (a power of two)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,     # listed rows gathered per trip
    PREFETCH: tl.constexpr,    # software-pipeline the gather loop (next trip's rows in flight)
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N

    # 1. The keep mask of this slice and its compacted list (channel, activation).
    offs_c = pid_s * SLICE + tl.arange(0, SLICE)
    in_k = offs_c < K
    x = tl.load(x_ptr + offs_c * stride_xk, mask=in_k, other=0.0).to(tl.float32)
    t = tl.load(thr_ptr + offs_c * stride_t, mask=in_k, other=0.0).to(tl.float32)
    keep = (tl.abs(x) > t) & in_k  # in_k matters: a negative threshold must not keep padding
    keep_i = keep.to(tl.int32)
    count = tl.sum(keep_i, axis=0)
    slot = tl.cumsum(keep_i, axis=0) - 1
    list_base = pid_s * SLICE
    tl.store(idx_ptr + list_base + slot, offs_c, mask=keep)
    tl.store(val_ptr + list_base + slot, x, mask=keep)
    tl.debug_barrier()

    # 2. Gather BLOCK_K listed rows per trip; partial sums per (row, n), reduced once.
    offs_j = tl.arange(0, BLOCK_K)
    acc2 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    if PREFETCH:
        # Software-pipelined by hand, as the masked GEMV is (Triton pipelines only loads
        # that feed a tl.dot): list entries two trips ahead, weight rows one trip ahead,
        # so a full weight tile is in flight while the previous one is multiplied.
        # Loads past the list are fully masked (no traffic).
        listed_a = offs_j < count
        rows_a = tl.load(idx_ptr + list_base + offs_j, mask=listed_a, other=0)
        vals_a = tl.load(val_ptr + list_base + offs_j, mask=listed_a, other=0.0)
        w_a = tl.load(w_ptr + rows_a[:, None] * stride_wk + offs_n[None, :],
                      mask=listed_a[:, None] & n_mask[None, :], other=0.0)
        offs_b = offs_j + BLOCK_K
        listed_b = offs_b < count
        rows_b = tl.load(idx_ptr + list_base + offs_b, mask=listed_b, other=0)
        vals_b = tl.load(val_ptr + list_base + offs_b, mask=listed_b, other=0.0)
        for _ in range(0, count, BLOCK_K):
            offs_next = offs_b + BLOCK_K
            listed_c = offs_next < count
            rows_c = tl.load(idx_ptr + list_base + offs_next, mask=listed_c, other=0)
            vals_c = tl.load(val_ptr + list_base + offs_next, mask=listed_c, other=0.0)
            w_b = tl.load(w_ptr + rows_b[:, None] * stride_wk + offs_n[None, :],
                          mask=listed_b[:, None] & n_mask[None, :], other=0.0)
            acc2 += vals_a[:, None] * w_a.to(tl.float32)
            vals_a, w_a = vals_b, w_b
            rows_b, vals_b, listed_b, offs_b = rows_c, vals_c, listed_c, offs_next
    else:
        for j0 in range(0, count, BLOCK_K):
            listed = (j0 + offs_j) < count
            rows = tl.load(idx_ptr + list_base + j0 + offs_j, mask=listed, other=0)
            vals = tl.load(val_ptr + list_base + j0 + offs_j, mask=listed, other=0.0)
            w = tl.load(w_ptr + rows[:, None] * stride_wk + offs_n[None, :],
                        mask=listed[:, None] & n_mask[None, :], other=0.0)
            acc2 += vals[:, None] * w.to(tl.float32)
    acc = tl.sum(acc2, axis=0)

    if DIRECT_OUT:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.store(ws_ptr + pid_s * stride_wss + offs_n, acc, mask=n_mask)
