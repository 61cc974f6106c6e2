"""optc's attention ops: decode steps, and encoders' masked self-attention.

Importing this module registers (and that is all it changes):

    optc::decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor
    optc::encoder_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor

softmax(q k^T * scale, masked) v for q [B, H, S, D] with at most kernels.decode_attention.MAX_ROWS
rows S, k and v [B, H, L, D], and a boolean mask (True: may attend) broadcastable to
[B, H, S, L]: what aten.scaled_dot_product_attention computes with that mask, no
dropout and no causal flag. A `torch.library.triton_op` like ops.py's: on CUDA it runs
the Triton kernel of kernels/decode_attention.py, anywhere else the SDPA reference.
The decode_sdpa rewrite puts it into the lowered copy of a program only: exported
programs and artifacts keep aten's SDPA.

`encoder_attention` is the same function for any number of query rows, with the mask
boolean or additive (kernels/encoder_attention.py, a flash loop that reads the mask in
tiles); its output is laid out as [B, S, H, D] like a flash kernel's. The encoder_sdpa
rewrite puts it into lowered copies likewise.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import triton_op

from .kernels.decode_attention import MAX_ROWS
from .kernels.decode_attention import decode_attention as _decode_attention_triton
from .kernels.encoder_attention import encoder_attention as _encoder_attention_triton
from .kernels.encoder_attention import output_like

__all__ = ["decode_attention", "decode_attention_reference", "encoder_attention"]


def decode_attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@triton_op("optc::decode_attention", mutates_args=())
def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float) -> Tensor:
    if q.device.type != "cuda":
        return decode_attention_reference(q, k, v, mask, scale)
    return _decode_attention_triton(q, k, v, mask, scale)


@decode_attention.register_fake
def _decode_attention_fake(q, k, v, mask, scale):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "q, k, v must be [B, H, S|L, D]")
    torch._check(q.shape[2] <= MAX_ROWS, lambda: f"decode_attention takes at most {MAX_ROWS} query rows")
    return q.new_empty(q.shape)


@decode_attention.register_kernel("cpu")
def _decode_attention_cpu(q, k, v, mask, scale):
    return decode_attention_reference(q, k, v, mask, scale)


def _encoder_attention_reference(q, k, v, mask, scale):
    return output_like(q).copy_(decode_attention_reference(q, k, v, mask, scale))  # in the kernel's layout


@triton_op("optc::encoder_attention", mutates_args=())
def encoder_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float) -> Tensor:
    if q.device.type != "cuda":
        return _encoder_attention_reference(q, k, v, mask, scale)
    return _encoder_attention_triton(q, k, v, mask, scale)


@encoder_attention.register_fake
def _encoder_attention_fake(q, k, v, mask, scale):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "q, k, v must be [B, H, S|L, D]")
    return output_like(q)


@encoder_attention.register_kernel("cpu")
def _encoder_attention_cpu(q, k, v, mask, scale):
    return _encoder_attention_reference(q, k, v, mask, scale)
