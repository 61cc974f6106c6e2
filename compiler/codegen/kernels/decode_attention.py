"""Attention for a few query rows over a static KV cache, in one Triton kernel.

Why: a decode step's attention is a handful of query rows (one token, or a KV group's
G query heads after share_kv_heads) against a cache of a few hundred positions: well
under a megabyte per layer. Inductor hands SDPA to cuDNN there, which costs a mask
conversion kernel, a workspace memset and the attention kernel per layer, with idle
gaps between them (benchmarks/NOTES.md, "Where the 1.13 ms go now"). This kernel
takes the boolean mask as the graph computed it (once per step, shared by every
layer) and does the rest in one launch.

Index math, for program (pid_bh, pid_split) of the grid (B * H, SPLIT):

    b, h = pid_bh // H, pid_bh % H
    rows   s in [0, S)                       (BLOCK_S >= max(S, 16), masked: tl.dot needs 16)
    keys   l in [pid_split * L_PER_SPLIT, +L_PER_SPLIT), walked BLOCK_L at a time (masked l < L)
    q[b, h, s, d]  at q_ptr + b*sqb + h*sqh + s*sqs + d*sqd      (likewise k, v, out)
    mask[b, h, s, l] at m_ptr + b*smb + h*smh + s*sms + l*sml   (stride 0 where it broadcasts)

First the program scans its keys' mask, SCAN at a time, for the last key any row may
see; the loop then stops there, so the cache past the current position is neither read
nor computed on. Inside the loop the K and V loads depend on nothing loaded in the
same trip (only on that bound), so they are in flight together with the trip's mask
load: one memory round trip per trip. Scores and the weighted sum are tensor-core dots
(tl.dot, query rows padded to 16; fp32 operands ask for exact fp32); online softmax in
fp32 (running max m, running sum l, accumulator acc). A row that may see no key gives
0, as torch's SDPA does (its math path uses a safe softmax).

SPLIT > 1 writes each slice's (m, l, acc) to fp32 partials, combined with torch ops
by the host wrapper; inside Inductor that combination is traced and fused into the
consumer or one small reduction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .sparse_linear import _interpreted

__all__ = ["AttentionConfig", "decode_attention", "plan", "MAX_ROWS"]

# More query rows than this per (batch, head) are not a decode step: prefill's
# attention is compute-bound and belongs to flash kernels.
MAX_ROWS = 16
# Mask entries a program holds at once while it scans (16K over 4 warps: 128 per thread).
_TILE_ELEMENTS = 16384
# Keys one program walks by default. A decode step has few (batch, head) programs for a
# GPU's many SMs, so a long cache is split among more (codegen/decode_sdpa keeps SDPA
# past the cache lengths timed).
KEYS_PER_PROGRAM = 256


@dataclass(frozen=True)
class AttentionConfig:
    block_l: int  # keys per loop trip (a power of two)
    split: int  # programs per (batch, head) along the keys
    num_warps: int


@triton.jit
def online_softmax_step(scores, v, m_i, l_i, acc, FP32_DOT: tl.constexpr):
    """One key tile of the flash loop: fold exp(scores) v into the running max m_i, sum l_i
    and accumulator acc (fp32 scores, -inf where masked); returns the new (m_i, l_i, acc)."""
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    # A row that has seen no key keeps m = -inf: subtract 0 there so exp gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(scores - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if FP32_DOT:
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, pm_ptr, pl_ptr, pa_ptr,
    H, S, L, D, L_PER_SPLIT, scale,
    sqb, sqh, sqs, sqd,
    skb, skh, skl, skd,
    svb, svh, svl, svd,
    smb, smh, sms, sml,
    sob, soh, sos, sod,
    HAS_MASK: tl.constexpr,
    PARTIAL: tl.constexpr,  # write (m, l, acc) partials instead of the output
    FP32_DOT: tl.constexpr,  # fp32 operands: ask tl.dot for exact fp32, not tf32
    BLOCK_S: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SCAN: tl.constexpr,  # mask entries per row read per trip of the scan
):
    pid_bh = tl.program_id(0)
    pid_split = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_in = offs_s < S
    d_in = offs_d < D
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_s[:, None] * sqs + offs_d[None, :] * sqd,
                mask=s_in[:, None] & d_in[None, :], other=0.0)
    m_base = m_ptr + b * smb + h * smh + offs_s[:, None] * sms
    first = pid_split * L_PER_SPLIT
    last = tl.minimum(first + L_PER_SPLIT, L)

    # 1. The end of the keys any row may see.
    hi = last
    if HAS_MASK:
        hi = first
        for start in range(first, last, SCAN):
            offs = start + tl.arange(0, SCAN)
            seen = tl.load(m_base + offs[None, :] * sml, mask=s_in[:, None] & (offs < last)[None, :], other=0)
            any_row = tl.max((seen != 0).to(tl.int32), axis=0)
            hi = tl.maximum(hi, tl.max(tl.where(any_row > 0, offs + 1, 0), axis=0))

    # 2. Online softmax over the keys up to there.
    m_i = tl.full([BLOCK_S], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_S], tl.float32)
    acc = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    for start in range(first, hi, BLOCK_L):
        offs_l = start + tl.arange(0, BLOCK_L)
        l_in = offs_l < hi
        kv_mask = l_in[:, None] & d_in[None, :]
        k = tl.load(k_ptr + b * skb + h * skh + offs_l[:, None] * skl + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + b * svb + h * svh + offs_l[:, None] * svl + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
        allowed = s_in[:, None] & l_in[None, :]
        if HAS_MASK:
            allowed = allowed & (tl.load(m_base + offs_l[None, :] * sml, mask=allowed, other=0) != 0)
        if FP32_DOT:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        # Inductor passes a Python float as fp64: keep the softmax in fp32 all the same.
        scores = tl.where(allowed, (scores * scale).to(tl.float32), float("-inf"))
        m_i, l_i, acc = online_softmax_step(scores, v, m_i, l_i, acc, FP32_DOT)

    if PARTIAL:
        row = (pid_bh * tl.num_programs(1) + pid_split) * BLOCK_S + offs_s
        tl.store(pm_ptr + row, m_i)
        tl.store(pl_ptr + row, l_i)
        tl.store(pa_ptr + row[:, None] * BLOCK_D + offs_d[None, :], acc)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(o_ptr + b * sob + h * soh + offs_s[:, None] * sos + offs_d[None, :] * sod,
                 out.to(o_ptr.dtype.element_ty), mask=s_in[:, None] & d_in[None, :])


def _blocks(S: int, D: int) -> tuple[int, int]:
    """(BLOCK_S, BLOCK_D): powers of two, at least 16 (tl.dot's smallest operand)."""
    return max(16, triton.next_power_of_2(S)), max(16, triton.next_power_of_2(D))


def plan(S: int, L: int, D: int, split: int | None = None, block_l: int | None = None) -> AttentionConfig:
    """The launch for S query rows over L keys of width D: a program per (batch, head)
    and KEYS_PER_PROGRAM keys, walking them 64 at a time, unless `split` and `block_l`
    say otherwise."""
    if block_l is None:
        block_l = max(16, min(64, triton.next_power_of_2(L)))
    split = split or triton.cdiv(L, KEYS_PER_PROGRAM)
    return AttentionConfig(block_l=block_l, split=max(1, min(split, triton.cdiv(L, block_l))), num_warps=4)


def _scan(block_s: int, keys: int) -> int:
    """Mask entries per row read per trip of the scan: a program's keys in one trip where
    the [BLOCK_S, SCAN] tile stays within _TILE_ELEMENTS."""
    return max(16, min(triton.next_power_of_2(keys), _TILE_ELEMENTS // block_s))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float | None = None, config: AttentionConfig | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v for q [B, H, S, D] and k, v [B, H, L, D]; `mask`
    is boolean (True: may attend), broadcastable to [B, H, S, L], or None."""
    B, H, S, D = q.shape
    L = k.shape[2]
    assert k.shape == (B, H, L, D) and v.shape == (B, H, L, D), f"k, v must be [{B}, {H}, L, {D}]"
    assert S <= MAX_ROWS, f"{S} query rows: decode_attention takes at most {MAX_ROWS}"
    assert mask is None or mask.dtype == torch.bool, "the mask must be boolean"
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    cfg = config or plan(S, L, D)
    block_s, block_d = _blocks(S, D)
    m = mask.expand(B, H, S, L) if mask is not None else q  # never read without a mask
    l_per_split = triton.cdiv(triton.cdiv(L, cfg.split), cfg.block_l) * cfg.block_l
    split = triton.cdiv(L, l_per_split)
    partial = split > 1
    # Either the output or the slices' partials: the kernel writes one of them, the other
    # arguments are never read (the output of a split launch is _combine's).
    if partial:
        shape = (B, H, split, block_s)
        pm, pl = (torch.empty(shape, device=q.device, dtype=torch.float32) for _ in range(2))
        pa = torch.empty((*shape, block_d), device=q.device, dtype=torch.float32)
        out = pm
    else:
        out = torch.empty((B, H, S, D), device=q.device, dtype=q.dtype)
        pm = pl = pa = out
    kernel = decode_attention_kernel if _interpreted(decode_attention_kernel) else wrap_triton(decode_attention_kernel)
    kernel[(B * H, split)](
        q, k, v, m, out, pm, pl, pa,
        H, S, L, D, l_per_split, scale,
        *q.stride(), *k.stride(), *v.stride(), *(m.stride() if mask is not None else (0, 0, 0, 0)), *out.stride(),
        HAS_MASK=mask is not None, PARTIAL=partial, FP32_DOT=q.dtype == torch.float32,
        BLOCK_S=block_s, BLOCK_L=cfg.block_l, BLOCK_D=block_d, SCAN=_scan(block_s, l_per_split),
        num_warps=cfg.num_warps,
    )
    if partial:
        out = _combine(pm, pl, pa, S, D).to(q.dtype).contiguous()
    return out


def _combine(pm, pl, pa, S: int, D: int) -> torch.Tensor:
    """Merge the slices' online-softmax states [B, H, split, BLOCK_S(, BLOCK_D)] into
    the output [B, H, S, D]."""
    top = pm.amax(dim=2, keepdim=True)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    w = torch.exp(pm - top)
    total = (pl * w).sum(dim=2)
    acc = (pa * w.unsqueeze(-1)).sum(dim=2)
    out = acc / torch.where(total == 0, torch.ones_like(total), total).unsqueeze(-1)
    return out[:, :, :S, :D]
