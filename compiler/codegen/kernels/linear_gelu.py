"""A linear layer with GELU in its epilogue, y = gelu(x W^T + b), in one kernel.

Why: lowered without autotuning (as merged encoders always are: their layers each have
their own token count), Inductor calls cuBLAS for an MLP's first linear and computes the
bias and exact GELU in a pointwise kernel of its own that reads and writes the whole
[tokens, 4 * hidden] activation again: a sixth of ViT-B/16's forward at batch 64 on the H100
(benchmarks/NOTES.md, "The patch embedding as a GEMM"). Here the bias and the GELU are
applied to the fp32 accumulator before the one store. Measured on the H100 it does not pay:
at ViT-B/16's MLP shape this GEMM runs at about half of cuBLAS's rate, which costs more than
the GELU's own kernel (NOTES, "A linear with GELU in its epilogue"), so no target turns the
rewrite on.

Index math, for program pid of the grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),), grouped
GROUP_M row tiles at a time so that consecutive programs share weight tiles in L2:

    rows    m in [pid_m*BLOCK_M, +BLOCK_M)   x[m, k] at x_ptr + m*stride_xm + k
    outputs n in [pid_n*BLOCK_N, +BLOCK_N)   W[n, k] at w_ptr + n*stride_wn + k
    y[m, n] at y_ptr + m*N + n (masked m < M, n < N)

Loads of rows past M or outputs past N read row M - 1 / N - 1 (indices taken modulo), so
only K needs a mask, and only when BLOCK_K does not divide it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .sparse_linear import _interpreted

__all__ = ["GemmTile", "linear_act", "linear_gelu", "linear_gelu_kernel", "gemm_tile"]


@dataclass(frozen=True)
class GemmTile:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8


# Tiles for Hopper's tensor cores (bf16/fp16): a wide tile where there are enough of them to
# fill the GPU's 132 multiprocessors twice, a narrower one for fewer rows (a batch of one).
# From Triton's GEMM tutorial configurations; the H100 sweep found none faster at batch 64 and
# 64 x 128 the fastest at batch 1 (results/linear_gelu_tiles_h100.json).
_WIDE = GemmTile(128, 256, 64, num_warps=8, num_stages=3)
_NARROW = GemmTile(64, 128, 64, num_warps=4, num_stages=4)
_INTERPRETER = GemmTile(16, 32, 16, num_warps=1, num_stages=1, group_m=2)  # tiny test shapes, several tiles


def gemm_tile(m: int, n: int, device: torch.device) -> GemmTile:
    if device.type != "cuda":
        return _INTERPRETER
    if not isinstance(m, int):  # a symbolic row count: the wide tile, without a guard on it
        return _WIDE
    wide_tiles = triton.cdiv(m, _WIDE.block_m) * triton.cdiv(n, _WIDE.block_n)
    return _WIDE if wide_tiles >= 2 * 132 else _NARROW


# ACT: what the epilogue applies. NO_ACTIVATION is there for measuring the GEMM alone
# (benchmarks/experiments/linear_gelu_tiles.py); the op launches the two GELUs.
NO_ACTIVATION, GELU, GELU_TANH = 0, 1, 2


@triton.jit
def _activation(v, ACT: tl.constexpr):
    if ACT == 2:
        # 0.5 v (1 + tanh(u)) with tanh(u) = 2 sigmoid(2u) - 1
        u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        return v * tl.sigmoid(2.0 * u)
    elif ACT == 1:
        return 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    else:
        return v


@triton.jit
def linear_gelu_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    M, N, K, stride_xm, stride_wn,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    EVEN_K: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    group_size = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rows = (rm % M).to(tl.int64) * stride_xm
    cols = (rn % N).to(tl.int64) * stride_wn
    x_ptrs = x_ptr + rows[:, None] + rk[None, :]
    w_ptrs = w_ptr + cols[None, :] + rk[:, None]  # [BLOCK_K, BLOCK_N]: W^T's tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_mask = rk < K - k0
            a = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    y = _activation(acc, ACT)
    out = y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(out, y.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none",
                tile: GemmTile | None = None) -> torch.Tensor:
    """gelu(F.linear(x, weight, bias), approximate) for x [..., K], weight [N, K], bias [N]
    or None, accumulated in fp32 (fp32 inputs in full fp32 products, not tf32) and returned
    in x's dtype."""
    assert approximate in ("none", "tanh"), f"approximate must be 'none' or 'tanh', got {approximate!r}"
    return linear_act(x, weight, bias, GELU_TANH if approximate == "tanh" else GELU, tile)


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: int,
               tile: GemmTile | None = None) -> torch.Tensor:
    """linear_gelu with the epilogue's activation named by `act` (NO_ACTIVATION, GELU, GELU_TANH)."""
    K = x.shape[-1]
    N = weight.shape[0]
    assert weight.shape == (N, K), f"weight must be [N, {K}], got {tuple(weight.shape)}"
    x2 = x.reshape(-1, K)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return out.reshape(*x.shape[:-1], N)
    w = weight if weight.stride(1) == 1 else weight.contiguous()
    tile = tile or gemm_tile(M, N, x.device)
    kernel = linear_gelu_kernel if _interpreted(linear_gelu_kernel) else wrap_triton(linear_gelu_kernel)
    grid = (triton.cdiv(M, tile.block_m) * triton.cdiv(N, tile.block_n),)
    kernel[grid](
        x2, w, bias if bias is not None else out, out,
        M, N, K, x2.stride(0), w.stride(0),
        HAS_BIAS=bias is not None, ACT=act, EVEN_K=K % tile.block_k == 0,
        IEEE=x.dtype == torch.float32,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, GROUP_M=tile.group_m,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    return out.reshape(*x.shape[:-1], N)
