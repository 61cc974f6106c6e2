"""Flash attention with a mask read in tiles: an encoder's self-attention with a padding
mask or merged tokens' size bias, in one Triton kernel.

Why: with any mask, SDPA on Hopper leaves the flash kernels; cuDNN's masked path took
about three times its unmasked time on ViT-B/16's shapes at batch 64, and the
memory-efficient kernel was no faster (benchmarks/NOTES.md, "Where decode_qkv's gap was;
merged ViT attention slower than dense"). The masks encoders carry are small and
broadcast: BERT's padding mask ([B, 1, S, L] booleans), merge_tokens' size bias ([B, 1,
1, L] additive). This kernel is the flash loop with that mask loaded tile by tile
beside K and V.

Index math, for program (pid_m, pid_bh) of the grid (cdiv(S, BLOCK_M), B * H), the query
blocks of one head launched together so that they share its K and V in L2:

    b, h = pid_bh // H, pid_bh % H
    rows  s in [pid_m * BLOCK_M, +BLOCK_M)      (masked s < S)
    keys  l walked BLOCK_N at a time            (masked l < L)
    q[b, h, s, d]    at q_ptr + b*sqb + h*sqh + s*sqs + d*sqd       (likewise k, v, out)
    mask[b, h, s, l] at m_ptr + b*smb + h*smh + s*sms + l*sml       (stride 0 where it broadcasts)

A mask with sms == 0 (the same for every query row) is loaded as one row of BLOCK_N keys
a trip (MASK_ROWS off), not as a [BLOCK_M, BLOCK_N] tile of pointers.

A boolean mask (True: may attend) turns into -inf where False; an additive one is added
to the scaled scores. Online softmax in fp32 (decode_attention's step); scores and the
weighted sum are tensor-core dots (fp32 operands ask for exact fp32). A row that may see
no key gives 0, as torch's SDPA does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .decode_attention import online_softmax_step
from .sparse_linear import _interpreted

__all__ = ["EncoderAttentionConfig", "encoder_attention", "plan", "MAX_BATCH_HEADS"]

# CUDA's limit on a grid's second axis, which holds the (batch, head) pairs.
MAX_BATCH_HEADS = 65535

@dataclass(frozen=True)
class EncoderAttentionConfig:
    block_m: int  # query rows a program
    block_n: int  # keys a loop trip
    num_warps: int
    num_stages: int


@triton.jit
def encoder_attention_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, o_ptr,
    H, S, L, D, scale,
    sqb, sqh, sqs, sqd,
    skb, skh, skl, skd,
    svb, svh, svl, svd,
    smb, smh, sms, sml,
    sob, soh, sos, sod,
    MASK: tl.constexpr,  # 0: none, 1: boolean, 2: additive
    MASK_ROWS: tl.constexpr,  # the mask differs between query rows (else one row of it is loaded a tile)
    FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # Inductor passes a Python float as fp64: one conversion here keeps the loop in fp32.
    scale = tl.full([], scale, tl.float32)
    b = pid_bh // H
    h = pid_bh % H
    offs_s = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    s_in = offs_s < S
    d_in = offs_d < D
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_s[:, None] * sqs + offs_d[None, :] * sqd,
                mask=s_in[:, None] & d_in[None, :], other=0.0)
    m_base = m_ptr + b * smb + h * smh + offs_s[:, None] * sms
    k_base = k_ptr + b * skb + h * skh + offs_d[None, :] * skd
    v_base = v_ptr + b * svb + h * svh + offs_d[None, :] * svd

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, L, BLOCK_N):
        offs_l = start + tl.arange(0, BLOCK_N)
        l_in = offs_l < L
        kv_mask = l_in[:, None] & d_in[None, :]
        k = tl.load(k_base + offs_l[:, None] * skl, mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_l[:, None] * svl, mask=kv_mask, other=0.0)
        if FP32_DOT:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = scores.to(tl.float32) * scale
        # Rows past S hold zeros and are never stored: only the keys past L need masking.
        allowed = l_in[None, :]
        if MASK != 0:
            if MASK_ROWS:
                bias = tl.load(m_base + offs_l[None, :] * sml, mask=s_in[:, None] & allowed, other=0)
            else:
                bias = tl.load(m_ptr + b * smb + h * smh + offs_l * sml, mask=l_in, other=0)[None, :]
            if MASK == 1:
                allowed = allowed & (bias != 0)
            else:
                scores = scores + bias.to(tl.float32)
        scores = tl.where(allowed, scores, float("-inf"))
        m_i, l_i, acc = online_softmax_step(scores, v, m_i, l_i, acc, FP32_DOT)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(o_ptr + b * sob + h * soh + offs_s[:, None] * sos + offs_d[None, :] * sod,
             out.to(o_ptr.dtype.element_ty), mask=s_in[:, None] & d_in[None, :])


def plan(S: int, D: int) -> EncoderAttentionConfig:
    """The launch for S query rows of width D. Up to 256 rows of width 64 or less: 64 rows
    a program, 64 keys a trip, 4 warps, 2 stages, the fastest launch of the H100 sweep at
    every token count of ViT-B/16's r=13 schedule (benchmarks/NOTES.md, "encoder_attention
    on the H100"). Longer sequences keep the flash tutorial's 128 rows (not swept); wide
    heads take 64 rows, where a program's tiles would not fit."""
    if S <= 256 or D > 64:
        return EncoderAttentionConfig(block_m=64, block_n=64, num_warps=4, num_stages=2)
    return EncoderAttentionConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)


def output_like(q: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] laid out as [B, S, H, D]: what a flash kernel gives, so the transpose
    and reshape encoders apply to the attention's output are views."""
    B, H, S, D = q.shape
    return torch.empty((B, S, H, D), device=q.device, dtype=q.dtype).transpose(1, 2)


def encoder_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      scale: float | None = None, config: EncoderAttentionConfig | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for q [B, H, S, D] and k, v [B, H, L, D]; `mask`
    is boolean (True: may attend) or additive, broadcastable to [B, H, S, L], or None."""
    B, H, S, D = q.shape
    L = k.shape[2]
    assert k.shape == (B, H, L, D) and v.shape == (B, H, L, D), f"k, v must be [{B}, {H}, L, {D}]"
    assert B * H <= MAX_BATCH_HEADS, f"{B * H} (batch, head) pairs: the grid's second axis takes {MAX_BATCH_HEADS}"
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    cfg = config or plan(S, D)
    block_d = max(16, triton.next_power_of_2(D))
    m = mask.expand(B, H, S, L) if mask is not None else q  # never read without a mask
    kind = 0 if mask is None else 1 if mask.dtype == torch.bool else 2
    out = output_like(q)
    kernel = encoder_attention_kernel
    kernel = kernel if _interpreted(kernel) else wrap_triton(kernel)
    kernel[(triton.cdiv(S, cfg.block_m), B * H)](
        q, k, v, m, out,
        H, S, L, D, scale,
        *q.stride(), *k.stride(), *v.stride(), *(m.stride() if mask is not None else (0, 0, 0, 0)), *out.stride(),
        MASK=kind, MASK_ROWS=mask is not None and m.stride(2) != 0, FP32_DOT=q.dtype == torch.float32,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
