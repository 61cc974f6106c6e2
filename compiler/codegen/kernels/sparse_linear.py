"""Activation-sparse linear layer: y = (x * (|x| > t)) @ W^T (+ bias).

At decode (1..16 tokens) a linear layer is bound by reading its weight. The weight is
stored transposed, ``weight_t[k, :]`` = all N outputs' weights for input channel k,
one contiguous row, so a channel whose activation is zero for every token of the
tile costs no weight traffic: its row load is masked off, and a masked (predicated)
load issues no memory transaction.

Index math, for program (pid_n, pid_s, pid_m) of the grid
(cdiv(N, BLOCK_N), SPLIT_K, cdiv(M, BLOCK_M)):

    tokens   m in [pid_m*BLOCK_M, +BLOCK_M)            (masked m < M)
    outputs  n in [pid_n*BLOCK_N, +BLOCK_N)            (masked n < N)
    channels k in [pid_s*K_PER_SPLIT, +K_PER_SPLIT)    (masked k < K), BLOCK_K at a time
    x[m, k]        at x_ptr + m*stride_xm + k*stride_xk
    t[k]           at thr_ptr + k*stride_t             (stride_t = 0: one per-layer value)
    weight_t[k, n] at w_ptr + (n // BLOCK_N)*stride_wtile + k*stride_wk + n % BLOCK_N
                   [K, N] layout: stride_wtile = BLOCK_N, stride_wk = N (rows contiguous);
                   tiled [N/BLOCK_N, K, BLOCK_N]: stride_wtile = K*BLOCK_N, stride_wk = BLOCK_N
    y[m, n]        at y_ptr + m*stride_ym + n
    part[s, m, n]  at ws_ptr + s*stride_wss + m*stride_wsm + n   (fp32, when SPLIT_K > 1)

With SPLIT_K > 1 each program writes its fp32 partial sum and ``_sum_partials`` adds
the slices with torch ops (which Inductor can fuse into y's consumer), adds the bias and casts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .configs import (
    GemvConfig,
    LaunchConfig,
    SparseLinearTarget,
    choose_slice,
    choose_split_k,
    pick_tile,
    sparse_linear_target,
    target_for_device,
)
from .sparse_gemv import sparse_gemv_kernel

__all__ = ["sparse_linear", "prepare_weight", "plan", "sparse_linear_kernel"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreted(kernel) -> bool:
    # Under TRITON_INTERPRET=1, @triton.jit gives an InterpretedFunction, which torch's
    # wrap_triton rejects in torch 2.11 (2.13 accepts it); it only runs eagerly, on CPU tensors,
    # so it is launched directly.
    return type(kernel).__name__ == "InterpretedFunction"


@triton.jit
def sparse_linear_kernel(
    x_ptr, w_ptr, thr_ptr, b_ptr, y_ptr, ws_ptr,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_xk,
    stride_wtile, stride_wk,
    stride_t,
    stride_ym,
    stride_wss, stride_wsm,
    HAS_BIAS: tl.constexpr,
    DIRECT_OUT: tl.constexpr,  # SPLIT_K == 1: write y (bias, cast) from this kernel
    FP32_DOT: tl.constexpr,  # fp32 operands: ask tl.dot for exact fp32, not tf32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_N: tl.constexpr,  # N % BLOCK_N == 0
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_N)
    offs_n = pid_n * BLOCK_N + offs_j
    w_tile = w_ptr + pid_n * stride_wtile  # this program's BLOCK_N output columns
    m_mask = offs_m < M
    if EVEN_N:
        # N is a multiple of BLOCK_N: a constant-true column mask, which the compiler folds
        # away, so each weight load is predicated by its row's activity alone.
        n_mask = tl.full((BLOCK_N,), 1, tl.int1)
    else:
        n_mask = offs_n < N
    k_start = pid_s * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    offs_kb = tl.arange(0, BLOCK_K)

    if BLOCK_M == 1:
        # One token (decode): a GEMV. Triton's pipeliner does not pipeline loads that
        # feed no tl.dot, and each weight load depends on an activation load (its
        # mask), so the loop is software-pipelined by hand: activations two chunks
        # ahead, weights one chunk ahead, so a weight tile is in flight while the
        # previous one is consumed. Loads past the slice are fully masked (no traffic).
        x_row = x_ptr + pid_m * stride_xm
        offs_a = k_start + offs_kb
        x_a = tl.load(x_row + offs_a * stride_xk, mask=offs_a < k_end, other=0.0)
        t_a = tl.load(thr_ptr + offs_a * stride_t, mask=offs_a < k_end, other=0.0)
        offs_b = offs_a + BLOCK_K
        x_b = tl.load(x_row + offs_b * stride_xk, mask=offs_b < k_end, other=0.0)
        t_b = tl.load(thr_ptr + offs_b * stride_t, mask=offs_b < k_end, other=0.0)
        # mask (offs < k_end) matters: a negative threshold must not activate padding.
        act_a = (tl.abs(x_a.to(tl.float32)) > t_a.to(tl.float32)) & (offs_a < k_end)
        w_a = tl.load(w_tile + offs_a[:, None] * stride_wk + offs_j[None, :],
                      mask=act_a[:, None] & n_mask[None, :], other=0.0)
        # Partial sums per (k, n), reduced over k once after the loop.
        acc2 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for _ in range(0, K_PER_SPLIT, BLOCK_K):
            offs_c = offs_b + BLOCK_K
            x_c = tl.load(x_row + offs_c * stride_xk, mask=offs_c < k_end, other=0.0)
            t_c = tl.load(thr_ptr + offs_c * stride_t, mask=offs_c < k_end, other=0.0)
            act_b = (tl.abs(x_b.to(tl.float32)) > t_b.to(tl.float32)) & (offs_b < k_end)
            w_b = tl.load(w_tile + offs_b[:, None] * stride_wk + offs_j[None, :],
                          mask=act_b[:, None] & n_mask[None, :], other=0.0)
            xs = tl.where(act_a, x_a.to(tl.float32), 0.0)
            acc2 += xs[:, None] * w_a.to(tl.float32)
            x_a, act_a, w_a = x_b, act_b, w_b
            x_b, t_b, offs_b = x_c, t_c, offs_c
        acc = tl.sum(acc2, axis=0)[None, :]
    else:
        # 16+ tokens per tile (fewer are padded): tensor cores via tl.dot, which the
        # pipeliner does pipeline (num_stages).
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K_PER_SPLIT, BLOCK_K):
            offs_k = k_start + k0 + offs_kb
            k_mask = offs_k < k_end
            mk_mask = m_mask[:, None] & k_mask[None, :]
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mk_mask, other=0.0)
            thr = tl.load(thr_ptr + offs_k * stride_t, mask=k_mask, other=0.0).to(tl.float32)
            active = (tl.abs(x.to(tl.float32)) > thr[None, :]) & mk_mask
            x = tl.where(active, x, 0.0)
            # A channel's weight row is read if any token of this tile uses it.
            row_active = tl.max(active.to(tl.int32), axis=0) > 0
            w = tl.load(w_tile + offs_k[:, None] * stride_wk + offs_j[None, :],
                        mask=row_active[:, None] & n_mask[None, :], other=0.0)
            if FP32_DOT:
                acc = tl.dot(x, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w, acc)

    mn_mask = m_mask[:, None] & n_mask[None, :]
    if DIRECT_OUT:
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            acc += bias[None, :]
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mn_mask)
    else:
        ws_ptrs = ws_ptr + pid_s * stride_wss + offs_m[:, None] * stride_wsm + offs_n[None, :]
        tl.store(ws_ptrs, acc, mask=mn_mask)


def _sum_partials(ws: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """y = sum of the split-K partials (+ bias), cast. Torch ops on purpose, not a
    kernel of ours: Inductor traces the triton_op's body and can fuse a sum over at
    most ``unroll_reductions_threshold`` (8) slices into the kernel that consumes y (in
    the Llama-1B decode profile it did for the CATS down projection, whose consumer is
    the residual add; where it cannot, the sum is one small reduction kernel). The
    slices are added in a fixed order (deterministic)."""
    y = ws.sum(0)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(dtype)


def _launch_gemv(x2, weight_t, threshold, stride_t, bias, y, tgt, cfg: GemvConfig) -> torch.Tensor:
    K, N = weight_t.shape
    slice_ = choose_slice(tgt, cfg, N, K, x2.element_size())
    slices = triton.cdiv(K, slice_)
    direct = slices == 1
    dev = x2.device
    idx = torch.empty((slices * slice_,), device=dev, dtype=torch.int32)
    val = torch.empty((slices * slice_,), device=dev, dtype=torch.float32)
    ws = y if direct else torch.empty((slices, N), device=dev, dtype=torch.float32)
    b_arg = bias if bias is not None else y  # never read when HAS_BIAS is False
    grid = (triton.cdiv(N, cfg.block_n), slices)
    kernel = sparse_gemv_kernel if _interpreted(sparse_gemv_kernel) else wrap_triton(sparse_gemv_kernel)
    kernel[grid](
        x2, weight_t, threshold, b_arg, y, ws, idx, val,
        N, K,
        x2.stride(1), weight_t.stride(0), stride_t, ws.stride(0) if not direct else 0,
        HAS_BIAS=bias is not None, DIRECT_OUT=direct,
        SLICE=slice_, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PREFETCH=cfg.prefetch,
        num_warps=cfg.num_warps, num_stages=1,
    )
    return y if direct else _sum_partials(ws, bias, y.dtype)


def prepare_weight(linear_weight: torch.Tensor) -> torch.Tensor:
    """nn.Linear weight [N, K] -> weight_t [K, N] contiguous: the layout the kernel
    reads (one contiguous row of N weights per input channel)."""
    assert linear_weight.dim() == 2, f"expected a 2-D weight, got {tuple(linear_weight.shape)}"
    return linear_weight.detach().t().contiguous()


def plan(tgt: SparseLinearTarget, M: int, N: int, K: int, elem_size: int,
         config: LaunchConfig | None = None, split_k: int | None = None):
    """(tile, split_k, k_per_split) for an M x K @ K x N product on a target."""
    cfg = config or pick_tile(tgt, M, K, N)
    if split_k is None:
        split_k = choose_split_k(tgt, cfg, M, N, K, elem_size)
    # Each slice covers a whole number of BLOCK_K chunks; the last may be partial.
    k_per_split = triton.cdiv(triton.cdiv(max(K, 1), split_k), cfg.block_k) * cfg.block_k
    return cfg, triton.cdiv(max(K, 1), k_per_split), k_per_split


def _check_threshold(threshold: torch.Tensor, channels: int, device) -> int:
    """Returns the threshold's stride over channels: 0 for one per-layer value."""
    assert threshold.dtype in _DTYPES, f"threshold dtype {threshold.dtype} not in {_DTYPES}"
    assert threshold.device == device, f"threshold on {threshold.device}, x on {device}"
    if threshold.numel() == 1:
        return 0
    assert threshold.dim() == 1 and threshold.shape[0] == channels, (
        f"threshold must have 1 or {channels} elements, got shape {tuple(threshold.shape)}"
    )
    return threshold.stride(0)


def sparse_linear(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    threshold: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    target: str | None = None,
    config: LaunchConfig | None = None,
    split_k: int | None = None,
    gemv: GemvConfig | None = None,
) -> torch.Tensor:
    """y[..., N] = (x * (|x| > threshold)) @ weight_t (+ bias), fp32 accumulation,
    output in x.dtype. ``threshold`` has 1 element (per layer) or K (per channel).
    ``target``/``config``/``split_k``/``gemv`` override the per-target choice (tests,
    sweeps); one token uses the compacting GEMV where the target has one, unless a
    tile or split is forced."""
    assert x.dtype in _DTYPES, f"x dtype {x.dtype} not in {_DTYPES}"
    assert weight_t.dim() == 2 and weight_t.is_contiguous(), "weight_t must be [K, N] contiguous"
    assert weight_t.dtype == x.dtype, f"weight_t dtype {weight_t.dtype} != x dtype {x.dtype}"
    assert weight_t.device == x.device, f"weight_t on {weight_t.device}, x on {x.device}"
    K, N = weight_t.shape
    assert x.shape[-1] == K, f"x has {x.shape[-1]} features, weight_t has {K} rows"
    assert weight_t.numel() < 2**31, "int32 index math: weight_t must have < 2**31 elements"
    stride_t = _check_threshold(threshold, K, x.device)
    if bias is not None:
        assert bias.shape == (N,) and bias.is_contiguous(), f"bias must be [{N}] contiguous"
        assert bias.device == x.device and bias.dtype in _DTYPES

    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return y.reshape(*lead, N)

    tgt = sparse_linear_target(target or target_for_device(x.device))
    gemv_cfg = gemv if gemv is not None else (tgt.gemv if config is None and split_k is None else None)
    if M == 1 and gemv_cfg is not None:
        y = _launch_gemv(x2, weight_t, threshold, stride_t, bias, y, tgt, gemv_cfg)
        return y.reshape(*lead, N)
    cfg, split_k, k_per_split = plan(tgt, M, N, K, x.element_size(), config, split_k)
    direct = split_k == 1
    ws = y if direct else torch.empty((split_k, M, N), device=x.device, dtype=torch.float32)
    b_arg = bias if bias is not None else y  # never read when HAS_BIAS is False

    assert cfg.block_m == 1 or cfg.block_m >= 16, "BLOCK_M is 1 (GEMV) or >= 16 (tl.dot)"
    grid = (triton.cdiv(N, cfg.block_n), split_k, triton.cdiv(M, cfg.block_m))
    kernel = sparse_linear_kernel if _interpreted(sparse_linear_kernel) else wrap_triton(sparse_linear_kernel)
    kernel[grid](
        x2, weight_t, threshold, b_arg, y, ws,
        M, N, K, k_per_split,
        x2.stride(0), x2.stride(1),
        cfg.block_n, weight_t.stride(0),
        stride_t,
        y.stride(0),
        ws.stride(0) if not direct else 0, ws.stride(1) if not direct else 0,
        HAS_BIAS=bias is not None,
        DIRECT_OUT=direct,
        FP32_DOT=x.dtype == torch.float32,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_N=N % cfg.block_n == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if not direct:
        y = _sum_partials(ws, bias, y.dtype)
    return y.reshape(*lead, N)
