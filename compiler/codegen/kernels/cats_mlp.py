"""Fused CATS gate/up projection of a gated MLP (Llama-style SwiGLU).

    g = x @ W_gate^T, a = silu(g), keep[m, j] = |a[m, j]| > t[j]
    h[m, j] = a[m, j] * (x @ W_up^T)[m, j] if keep[m, j] else 0

Weights stay in nn.Linear layout, [I, H] with row j (intermediate channel j) contiguous
over the hidden size H. The gate is read in full; a row of W_up is read only if its
channel is kept for at least one token of the tile, so at sparsity s the kernel reads
about (2 - s) / 2 of the dense gate+up bytes. The mask is per token (a token's output
never depends on the other tokens in the batch); only the memory skipping is shared.
The down projection then runs ``sparse_linear(h, W_down^T, threshold=0)``, which
reads only the rows of W_down^T whose channel of h is nonzero.

Index math, for program (pid_i, pid_m) of the grid (cdiv(I, BLOCK_N), cdiv(M, BLOCK_M)):

    tokens   m in [pid_m*BLOCK_M, +BLOCK_M)      (masked m < M)
    channels j in [pid_i*BLOCK_N, +BLOCK_N)      (masked j < I), rows of W_gate / W_up
    hidden   k in [0, H), BLOCK_K at a time      (masked k < H), loop twice: gate, up
    x[m, k]      at x_ptr + m*stride_xm + k*stride_xk
    W_gate[j, k] at wg_ptr + j*stride_wg + k     (likewise W_up with stride_wu)
    t[j]         at thr_ptr + j*stride_t         (stride_t = 0: one per-layer value)
    h[m, j]      at h_ptr + m*stride_hm + j

The whole H reduction of the gate must finish before a channel is known to be kept,
so there is no split over H; parallelism comes from I / BLOCK_N programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .configs import LaunchConfig, cats_target, pick_bucket, target_for_device
from .sparse_linear import _DTYPES, _check_threshold, _interpreted

__all__ = ["cats_gate_up", "cats_gate_up_kernel"]


@triton.jit
def _rows_dot(x_ptr, w_ptr, offs_m, m_mask, offs_j, row_mask, H,
              stride_xm, stride_xk, stride_w,
              FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
    # Returns x[m, :] . W[j, :] as [BLOCK_M, BLOCK_N] fp32, loading only rows with row_mask.
    offs_kb = tl.arange(0, BLOCK_K)
    if BLOCK_M == 1:
        # GEMV: loads that feed no tl.dot are not pipelined by Triton, so prefetch the
        # next weight tile by hand while the current one is consumed; partial sums per
        # (j, k) are reduced over k once after the loop.
        x_row = x_ptr + offs_m * stride_xm  # offs_m has one element
        w_rows = w_ptr + offs_j[:, None] * stride_w
        x_a = tl.load(x_row[:, None] + offs_kb[None, :] * stride_xk,
                      mask=m_mask[:, None] & (offs_kb < H)[None, :], other=0.0)
        w_a = tl.load(w_rows + offs_kb[None, :], mask=row_mask[:, None] & (offs_kb < H)[None, :], other=0.0)
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(BLOCK_K, H + BLOCK_K, BLOCK_K):
            offs_k = k0 + offs_kb
            k_mask = offs_k < H  # all false on the last trip: no traffic
            x_b = tl.load(x_row[:, None] + offs_k[None, :] * stride_xk,
                          mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w_b = tl.load(w_rows + offs_k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            acc2 += w_a.to(tl.float32) * x_a.to(tl.float32)
            x_a, w_a = x_b, w_b
        acc = tl.sum(acc2, axis=1)[None, :]
    else:
        # 16+ tokens per tile (fewer are padded): tensor cores, pipelined by Triton.
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + offs_kb
            k_mask = offs_k < H
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptr + offs_j[:, None] * stride_w + offs_k[None, :],
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            if FP32_DOT:
                acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)
    return acc


@triton.jit
def cats_gate_up_kernel(
    x_ptr, wg_ptr, wu_ptr, thr_ptr, h_ptr,
    M, I, H,
    stride_xm, stride_xk,
    stride_wg, stride_wu,
    stride_t,
    stride_hm,
    FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_i = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = pid_i * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    j_mask = offs_j < I

    g = _rows_dot(x_ptr, wg_ptr, offs_m, m_mask, offs_j, j_mask, H,
                  stride_xm, stride_xk, stride_wg,
                  FP32_DOT, BLOCK_M, BLOCK_N, BLOCK_K)
    a = g / (1.0 + tl.exp(-g))  # silu, fp32
    thr = tl.load(thr_ptr + offs_j * stride_t, mask=j_mask, other=0.0).to(tl.float32)
    keep = (tl.abs(a) > thr[None, :]) & m_mask[:, None] & j_mask[None, :]
    # Read a W_up row if any token of the tile keeps its channel.
    row_keep = tl.max(keep.to(tl.int32), axis=0) > 0

    u = _rows_dot(x_ptr, wu_ptr, offs_m, m_mask, offs_j, row_keep, H,
                  stride_xm, stride_xk, stride_wu,
                  FP32_DOT, BLOCK_M, BLOCK_N, BLOCK_K)
    h = tl.where(keep, a * u, 0.0)
    h_ptrs = h_ptr + offs_m[:, None] * stride_hm + offs_j[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=m_mask[:, None] & j_mask[None, :])


def cats_gate_up(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    threshold: torch.Tensor,
    *,
    target: str | None = None,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """h[..., I] = where(|silu(x W_gate^T)| > t, silu(x W_gate^T) * (x W_up^T), 0),
    fp32 accumulation, output in x.dtype. ``threshold`` has 1 element or I."""
    assert x.dtype in _DTYPES, f"x dtype {x.dtype} not in {_DTYPES}"
    assert w_gate.dim() == 2 and w_gate.shape == w_up.shape, (
        f"w_gate {tuple(w_gate.shape)} and w_up {tuple(w_up.shape)} must both be [I, H]"
    )
    assert w_gate.is_contiguous() and w_up.is_contiguous(), "w_gate/w_up must be contiguous"
    assert w_gate.dtype == x.dtype and w_up.dtype == x.dtype, "weights must have x's dtype"
    assert w_gate.device == x.device and w_up.device == x.device
    I, H = w_gate.shape
    assert x.shape[-1] == H, f"x has {x.shape[-1]} features, weights have {H}"
    assert w_gate.numel() < 2**31, "int32 index math: weights must have < 2**31 elements"
    stride_t = _check_threshold(threshold, I, x.device)

    lead = x.shape[:-1]
    x2 = x.reshape(-1, H)
    M = x2.shape[0]
    h = torch.empty((M, I), device=x.device, dtype=x.dtype)
    if M == 0 or I == 0:
        return h.reshape(*lead, I)

    cfg = config or pick_bucket(cats_target(target or target_for_device(x.device)).buckets, M)
    assert cfg.block_m == 1 or cfg.block_m >= 16, "BLOCK_M is 1 (GEMV) or >= 16 (tl.dot)"
    grid = (triton.cdiv(I, cfg.block_n), triton.cdiv(M, cfg.block_m))
    kernel = cats_gate_up_kernel if _interpreted(cats_gate_up_kernel) else wrap_triton(cats_gate_up_kernel)
    kernel[grid](
        x2, w_gate, w_up, threshold, h,
        M, I, H,
        x2.stride(0), x2.stride(1),
        w_gate.stride(0), w_up.stride(0),
        stride_t,
        h.stride(0),
        FP32_DOT=x.dtype == torch.float32,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return h.reshape(*lead, I)
