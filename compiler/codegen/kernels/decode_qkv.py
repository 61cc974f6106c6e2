"""A decode step's attention input in one kernel: RMSNorm, the q, k and v projections of
the one new token, and the rotary embedding of q and k.

Why: Inductor lowers this part of a Llama layer's decode step as several launches (the
norm's statistic, the q and the k/v reductions, the rotary products), each a short
GEMV or less whose fixed cost and ramp show in a step of about a millisecond
(benchmarks/NOTES.md, "Decode attention and PDL on the H100": q/k/v and their norm read
at half the copy rate there). One program here computes a few output pairs of one
segment (q, k or v) from the raw residual row:

    y[n] = rsqrt(mean(x^2) + eps) * sum_k W[n, k] * (g[k] * x[k])

which is RMSNorm(x) * g followed by the projection, with the norm's scale factored out
of the sum so the statistic accumulates in the same loop as the products. Rotary pairs
output rows i and i + D/2 of a head (HF's rotate_half): a program holds whole pairs, so
it applies the rotation itself:

    out[i]       = y[i] * cos[i] - y[i + D/2] * sin[i]
    out[i + D/2] = y[i + D/2] * cos[i + D/2] + y[i] * sin[i + D/2]

Index math, for program p of a 1-D grid over all pairs (q's, then k's, then v's; a
segment of H heads has H * D/2 pairs, and BLOCK_P divides D/2, so no program crosses a
segment or a head):

    pairs j in [p*BLOCK_P - segment start, +BLOCK_P); head = j // HALF, i = j % HALF
    rows  r1 = head*2*HALF + i, r2 = r1 + HALF of the segment's weight [H*D, K]
    out   [q (Hq*D) | k (Hkv*D) | v (Hkv*D)], the segment's rows at its offset

With WRITE_CACHE the k and v rows are also stored into the KV caches at the new
position (what the graph's index_copy_ of that layer did, one launch later):

    k_cache[0, head, pos, d] = rotated k[head, d];  v_cache likewise, from v

Accumulation is fp32 throughout and rounded once, to x's dtype, at the store; the
graph rounds after the norm, the projection and each rotary product, so the two agree
to a few units of the last place (the lowering check's tolerance).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .sparse_linear import _interpreted

__all__ = ["QkvTile", "decode_qkv", "default_qkv_tile"]


@dataclass(frozen=True)
class QkvTile:
    block_p: int  # rotary pairs (two output rows each) per program; divides D/2
    block_k: int  # input channels per loop trip (a power of two)
    num_warps: int

    def __str__(self) -> str:
        return f"p{self.block_p} k{self.block_k} w{self.num_warps}"


def default_qkv_tile(target: str, half: int, k: int) -> QkvTile:
    """Two pairs (four rows) a program and 512 channels a trip on a GPU: as many weight
    elements a trip as the dense GEMV's tile (kernels/gemv_tiles.py), while the norm's
    input is read once per four rows: the best of the H100 sweeps on Llama-1B's shape
    (results/kernels_decode_qkv_h100.json; on Llama-3.1-8B's, 256 channels a trip led),
    within 8% of a bare GEMV over the same rows (results/qkv_probe_h100.json). The
    interpreter of the tests takes one pair and 16 channels, so small shapes cover several
    programs and trips."""
    if target == "cpu":
        return QkvTile(block_p=1, block_k=16, num_warps=1)
    block_p = 2 if half % 2 == 0 else 1
    return QkvTile(block_p=block_p, block_k=max(16, min(512, triton.next_power_of_2(k))), num_warps=4)


@triton.jit
def decode_qkv_kernel(
    x_ptr, g_ptr, wq_ptr, wk_ptr, wv_ptr, cos_ptr, sin_ptr, out_ptr,
    k_cache_ptr, v_cache_ptr, pos_ptr, cache_len, stride_cache_h, stride_cache_l,
    K, eps, Q_PAIRS, K_PAIRS, stride_q, stride_k, stride_v,
    HALF: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WRITE_CACHE: tl.constexpr,
):
    first = tl.program_id(0) * BLOCK_P
    if first < Q_PAIRS:
        w_ptr = wq_ptr
        stride = stride_q
        local = first
        out_base = 0
    elif first < Q_PAIRS + K_PAIRS:
        w_ptr = wk_ptr
        stride = stride_k
        local = first - Q_PAIRS
        out_base = 2 * Q_PAIRS
    else:
        w_ptr = wv_ptr
        stride = stride_v
        local = first - Q_PAIRS - K_PAIRS
        out_base = 2 * (Q_PAIRS + K_PAIRS)
    j = local + tl.arange(0, BLOCK_P)
    i = j % HALF
    r1 = (j // HALF) * (2 * HALF) + i
    r2 = r1 + HALF
    rows1 = r1.to(tl.int64) * stride
    rows2 = r2.to(tl.int64) * stride
    offs_k = tl.arange(0, BLOCK_K)
    acc1 = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
    squares = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
    # The input row is read as a [BLOCK_P, BLOCK_K] tile (each row the same, from L1) so that
    # it has the weight tiles' layout: read as one row and broadcast, it took a round trip
    # through shared memory between two barriers on every trip.
    same_row = tl.zeros((BLOCK_P, 1), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = (k0 + offs_k)[None, :]
        k_mask = kk < K
        # Each weight byte is read once per step: keep it from evicting what is reused.
        w1 = tl.load(w_ptr + rows1[:, None] + kk, mask=k_mask, other=0.0, eviction_policy="evict_first")
        w2 = tl.load(w_ptr + rows2[:, None] + kk, mask=k_mask, other=0.0, eviction_policy="evict_first")
        x = tl.load(x_ptr + same_row + kk, mask=k_mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + same_row + kk, mask=k_mask, other=0.0).to(tl.float32)
        squares += x * x
        h = x * g
        acc1 += w1.to(tl.float32) * h
        acc2 += w2.to(tl.float32) * h
    scale = 1.0 / tl.sqrt(tl.sum(squares, axis=1) / K + eps)  # [BLOCK_P], each the row's statistic
    y1 = tl.sum(acc1, axis=1) * scale
    y2 = tl.sum(acc2, axis=1) * scale
    if first < Q_PAIRS + K_PAIRS:  # q and k are rotated, v is not
        c1 = tl.load(cos_ptr + i).to(tl.float32)
        s1 = tl.load(sin_ptr + i).to(tl.float32)
        c2 = tl.load(cos_ptr + i + HALF).to(tl.float32)
        s2 = tl.load(sin_ptr + i + HALF).to(tl.float32)
        o1 = y1 * c1 - y2 * s1
        o2 = y2 * c2 + y1 * s2
    else:
        o1 = y1
        o2 = y2
    dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + out_base + r1, o1.to(dtype))
    tl.store(out_ptr + out_base + r2, o2.to(dtype))
    if WRITE_CACHE:
        if first >= Q_PAIRS:
            if first < Q_PAIRS + K_PAIRS:
                cache_ptr = k_cache_ptr
            else:
                cache_ptr = v_cache_ptr
            pos = tl.load(pos_ptr)
            # index_copy_ would fail on a position outside the cache; nothing is written then.
            in_cache = (pos >= 0) & (pos < cache_len)
            slot = (j // HALF).to(tl.int64) * stride_cache_h + pos * stride_cache_l + i
            tl.store(cache_ptr + slot, o1.to(dtype), mask=in_cache)
            tl.store(cache_ptr + slot + HALF, o2.to(dtype), mask=in_cache)


def decode_qkv(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, wq: torch.Tensor, wk: torch.Tensor,
               wv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int,
               tile: QkvTile, caches: tuple | None = None) -> torch.Tensor:
    """x [..., K] holding one row (the residual stream before the norm), the norm's
    weight [K], q/k/v weights [H*D, K] (k and v with the same rows), cos and sin holding
    D values (the new position's) -> [Hq*D + 2*Hkv*D] in x's dtype: rotated q, rotated
    k, then v, each in the projection's row order.
    `caches`: (k_cache, v_cache, position), caches [1, Hkv, L, D] with unit stride over D
    and x's dtype, position a one-element integer tensor: k and v are also written there."""
    K = x.shape[-1]
    half = head_dim // 2
    assert head_dim % 2 == 0 and head_dim > 0, f"head_dim must be even, got {head_dim}"
    assert x.numel() == K > 0, f"decode_qkv takes one row, got x of shape {tuple(x.shape)}"
    assert norm_weight.numel() == K, f"norm weight must hold {K} values, got {tuple(norm_weight.shape)}"
    for name, w in (("wq", wq), ("wk", wk), ("wv", wv)):
        assert w.dim() == 2 and w.shape[1] == K and w.shape[0] % head_dim == 0, \
            f"{name} must be [heads*{head_dim}, {K}], got {tuple(w.shape)}"
    assert wk.shape == wv.shape, f"wk and wv differ: {tuple(wk.shape)} and {tuple(wv.shape)}"
    assert cos.numel() == sin.numel() == head_dim, f"cos and sin must hold {head_dim} values (one position)"
    assert tile.block_p > 0 and half % tile.block_p == 0, f"block_p {tile.block_p} must divide {half}"
    xv, g = x.reshape(K).contiguous(), norm_weight.reshape(K).contiguous()
    wq, wk, wv = (w if w.stride(1) == 1 else w.contiguous() for w in (wq, wk, wv))
    c, s = cos.reshape(head_dim).contiguous(), sin.reshape(head_dim).contiguous()
    q_pairs, k_pairs = wq.shape[0] // 2, wk.shape[0] // 2
    out = torch.empty(wq.shape[0] + 2 * wk.shape[0], device=x.device, dtype=x.dtype)
    if caches is None:
        k_cache = v_cache = position = out  # not read: WRITE_CACHE is off
        cache_len = stride_h = stride_l = 0
    else:
        k_cache, v_cache, position = caches
        _check_caches(k_cache, v_cache, position, wk.shape[0] // head_dim, head_dim, x.dtype)
        cache_len, stride_h, stride_l = k_cache.shape[2], k_cache.stride(1), k_cache.stride(2)
    kernel = decode_qkv_kernel if _interpreted(decode_qkv_kernel) else wrap_triton(decode_qkv_kernel)
    kernel[((q_pairs + 2 * k_pairs) // tile.block_p,)](
        xv, g, wq, wk, wv, c, s, out,
        k_cache, v_cache, position, cache_len, stride_h, stride_l,
        K, float(eps), q_pairs, k_pairs, wq.stride(0), wk.stride(0), wv.stride(0),
        HALF=half, BLOCK_P=tile.block_p, BLOCK_K=tile.block_k, WRITE_CACHE=caches is not None,
        num_warps=tile.num_warps,
    )
    return out


def _check_caches(k_cache, v_cache, position, heads, head_dim, dtype):
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        assert c.dim() == 4 and c.shape[0] == 1 and c.shape[1] == heads and c.shape[3] == head_dim, \
            f"{name} must be [1, {heads}, length, {head_dim}], got {tuple(c.shape)}"
        assert c.stride(3) == 1 and c.dtype == dtype, f"{name} must be {dtype} with unit stride over the head dim"
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride(), "k_cache and v_cache differ"
    assert position.numel() == 1 and not position.is_floating_point(), "position must be one integer"
