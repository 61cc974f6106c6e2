"""Masked self-attention runs optc's flash kernel instead of Inductor's SDPA.

With a mask, SDPA leaves its flash kernels: on ViT-B/16's shapes cuDNN's masked path took
about three times its unmasked time, whether the mask was BERT-style booleans or
merge_tokens' size bias (benchmarks/NOTES.md, "Where decode_qkv's gap was; merged ViT
attention slower than dense"). `optc::encoder_attention` (codegen/attention_ops.py)
computes the same function as a flash loop that reads the mask in tiles.

Rewritten only where the function is exactly SDPA's: static shapes, not a decode step's
(a few query rows over more keys: decode_sdpa's kernel is made for those), keys and values with the query's batch,
heads and width (at most MAX_HEAD_DIM), one dtype, a boolean or additive mask that
broadcasts to the scores, no dropout, no causal flag, no GQA flag. An SDPA without a mask
keeps Inductor's choice (a flash kernel). Like the other lowering rewrites this works on
a copy used for lowering; the lowering check compares it with the program itself.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

from optc.compiler.rewrite import node_dtype, node_shape, with_calls_replaced

aten = torch.ops.aten

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The widest head the kernel's tiles hold (a [BLOCK_M, D] query tile and the accumulator).
MAX_HEAD_DIM = 128


def _decode_rows() -> int:
    from optc.compiler.codegen.kernels.decode_attention import MAX_ROWS  # see decode_sdpa._rows_limit
    return MAX_ROWS


def _call(node: fx.Node) -> tuple | None:
    """(q, k, v, mask, scale) if `node` is a masked SDPA the kernel computes exactly, else None."""
    if node.op != "call_function" or node.target != aten.scaled_dot_product_attention.default:
        return None
    norm = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    if norm is None:
        return None
    a = norm.kwargs
    if a.get("dropout_p", 0.0) != 0.0 or a.get("is_causal", False) or a.get("enable_gqa", False):
        return None
    q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
    if not isinstance(mask, fx.Node):
        return None
    qs, ks, vs, ms = node_shape(q), node_shape(k), node_shape(v), node_shape(mask)
    if any(s is None or not all(isinstance(d, int) for d in s) for s in (qs, ks, vs, ms)):
        return None
    if not (len(qs) == len(ks) == len(vs) == 4) or len(ms) > 4:
        return None
    B, H, S, D = qs
    L = ks[2]
    if S < L and S <= _decode_rows():
        return None  # a decode step's shape: decode_sdpa's kernel is made for it
    if D > MAX_HEAD_DIM or tuple(ks) != (B, H, L, D) or tuple(vs) != tuple(ks):
        return None
    dtype = node_dtype(q)
    if not (dtype == node_dtype(k) == node_dtype(v) and dtype in _DTYPES):
        return None
    if node_dtype(mask) not in (torch.bool, dtype, torch.float32):
        return None
    full = (B, H, S, L)[4 - len(ms):]
    if any(m not in (1, f) for m, f in zip(ms, full)):
        return None
    scale = a.get("scale")
    return q, k, v, mask, float(scale) if scale is not None else 1.0 / math.sqrt(D)


def _calls(graph: fx.Graph) -> list[tuple[fx.Node, tuple]]:
    return [(node, call) for node in graph.nodes if (call := _call(node)) is not None]


def encoder_sdpa_nodes(graph: fx.Graph) -> list[fx.Node]:
    """The SDPA nodes of `graph` that optc::encoder_attention computes exactly."""
    return [node for node, _ in _calls(graph)]


def use_encoder_attention(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """A copy of `gm` (sharing its parameters) whose masked SDPAs call
    optc::encoder_attention, and how many it rewrote; `gm` itself when there are none."""
    if not encoder_sdpa_nodes(gm.graph):
        return gm, 0
    from optc.compiler.codegen import attention_ops  # noqa: F401  (registers optc::encoder_attention)

    return with_calls_replaced(gm, _calls, torch.ops.optc.encoder_attention.default)
