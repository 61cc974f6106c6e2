"""optc's attention input for decode steps: RMSNorm, q/k/v projections and rotary in one op.

Importing this module registers (and that is all it changes):

    optc::decode_qkv(Tensor x, Tensor norm_weight, float eps, Tensor wq, Tensor wk, Tensor wv,
                     Tensor cos, Tensor sin, int head_dim) -> Tensor

    optc::decode_qkv_cached(<the same>, Tensor(a!) k_cache, Tensor(b!) v_cache,
                            Tensor position) -> Tensor

x [..., K] holding one row (the residual stream), the RMSNorm weight [K], q/k/v weights
[H*D, K] without bias (k and v of one shape), cos and sin of the new position (D values):
[rope(q) | rope(k) | v] flat, in x's dtype, computed in fp32 (kernels/decode_qkv.py says
how). The cached form also writes rope(k) and v into the KV caches [1, Hkv, L, D] at
`position` (one integer), as `cache.index_copy_(2, position, k)` does, except that on
CUDA a position outside the cache writes nothing where index_copy_ fails (the reference
raises, as index_copy_ does). Each is a `torch.library.triton_op` like gemv_ops': on CUDA
it runs the Triton kernel with the target's tile, anywhere else the fp32 reference. The
decode_qkv rewrite puts them into the lowered copy of a program only: exported programs
and artifacts keep aten's ops.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.library import triton_op

from .kernels.configs import target_for_device
from .kernels.decode_qkv import decode_qkv as _decode_qkv_triton
from .kernels.decode_qkv import default_qkv_tile

__all__ = ["decode_qkv", "decode_qkv_cached", "decode_qkv_reference"]


def decode_qkv_reference(x: Tensor, norm_weight: Tensor, eps: float, wq: Tensor, wk: Tensor, wv: Tensor,
                         cos: Tensor, sin: Tensor, head_dim: int) -> Tensor:
    K = x.shape[-1]
    x32 = x.reshape(K).float()
    h = x32 * torch.rsqrt(x32.pow(2).mean() + eps) * norm_weight.reshape(K).float()
    c, s = cos.reshape(head_dim).float(), sin.reshape(head_dim).float()
    half = head_dim // 2

    def rope(w: Tensor) -> Tensor:
        y = (w.float() @ h).view(-1, head_dim)
        rotated = torch.cat([-y[:, half:], y[:, :half]], dim=-1)
        return (y * c + rotated * s).reshape(-1)

    return torch.cat([rope(wq), rope(wk), wv.float() @ h]).to(x.dtype)


@triton_op("optc::decode_qkv", mutates_args=())
def decode_qkv(x: Tensor, norm_weight: Tensor, eps: float, wq: Tensor, wk: Tensor, wv: Tensor,
               cos: Tensor, sin: Tensor, head_dim: int) -> Tensor:
    if x.device.type != "cuda":
        return decode_qkv_reference(x, norm_weight, eps, wq, wk, wv, cos, sin, head_dim)
    tile = default_qkv_tile(target_for_device(x.device), head_dim // 2, x.shape[-1])
    return _decode_qkv_triton(x, norm_weight, eps, wq, wk, wv, cos, sin, head_dim, tile)


@decode_qkv.register_fake
def _decode_qkv_fake(x, norm_weight, eps, wq, wk, wv, cos, sin, head_dim):
    torch._check(math.prod(x.shape[:-1]) == 1, lambda: "optc::decode_qkv takes one row")
    torch._check(wk.shape == wv.shape, lambda: "k and v weights must have one shape")
    return x.new_empty((wq.shape[0] + 2 * wk.shape[0],))


@decode_qkv.register_kernel("cpu")
def _decode_qkv_cpu(x, norm_weight, eps, wq, wk, wv, cos, sin, head_dim):
    return decode_qkv_reference(x, norm_weight, eps, wq, wk, wv, cos, sin, head_dim)


def _cached_reference(x, norm_weight, eps, wq, wk, wv, cos, sin, head_dim, k_cache, v_cache, position) -> Tensor:
    out = decode_qkv_reference(x, norm_weight, eps, wq, wk, wv, cos, sin, head_dim)
    heads = k_cache.shape[1]
    rows = heads * head_dim
    k, v = out[wq.shape[0]:].split(rows)
    index = position.reshape(1).long()
    k_cache.index_copy_(2, index, k.view(1, heads, 1, head_dim))
    v_cache.index_copy_(2, index, v.view(1, heads, 1, head_dim))
    return out


@triton_op("optc::decode_qkv_cached", mutates_args=("k_cache", "v_cache"))
def decode_qkv_cached(x: Tensor, norm_weight: Tensor, eps: float, wq: Tensor, wk: Tensor, wv: Tensor,
                      cos: Tensor, sin: Tensor, head_dim: int, k_cache: Tensor, v_cache: Tensor,
                      position: Tensor) -> Tensor:
    if x.device.type != "cuda":
        return _cached_reference(x, norm_weight, eps, wq, wk, wv, cos, sin, head_dim, k_cache, v_cache, position)
    tile = default_qkv_tile(target_for_device(x.device), head_dim // 2, x.shape[-1])
    return _decode_qkv_triton(x, norm_weight, eps, wq, wk, wv, cos, sin, head_dim, tile,
                              caches=(k_cache, v_cache, position))


@decode_qkv_cached.register_fake
def _decode_qkv_cached_fake(x, norm_weight, eps, wq, wk, wv, cos, sin, head_dim, k_cache, v_cache, position):
    return _decode_qkv_fake(x, norm_weight, eps, wq, wk, wv, cos, sin, head_dim)


@decode_qkv_cached.register_kernel("cpu")
def _decode_qkv_cached_cpu(x, norm_weight, eps, wq, wk, wv, cos, sin, head_dim, k_cache, v_cache, position):
    return _cached_reference(x, norm_weight, eps, wq, wk, wv, cos, sin, head_dim, k_cache, v_cache, position)
