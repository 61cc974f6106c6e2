"""How grouped-query attention appears in a captured graph (used by the anatomy).

Hugging Face models with fewer KV heads than query heads (Llama: 32 over 8) copy K and V
once per query head before SDPA (repeat_kv: unsqueeze, expand, reshape). share_kv_heads
rewrites one-token attention to read the shared heads instead and marks the new SDPA
node with GROUPED_QUERY, so the anatomy still counts H query heads.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from optc.compiler.rewrite import node_shape

aten = torch.ops.aten

# Node meta flag set by share_kv_heads on an SDPA whose query is [B, KV, G, D].
GROUPED_QUERY = "optc_grouped_query"


_VIEWS = {aten.reshape.default, aten.view.default, aten._unsafe_view.default}


def _repeated_from(node, heads: int, kv_heads: int):
    """`src` if `node` is Hugging Face's repeat_kv(src, heads // kv_heads), i.e.
    src[:, :, None].expand(b, kv, g, s, d).reshape(b, kv * g, s, d) with src [b, kv, s, d];
    else None (other ways of copying heads are not recognised)."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _VIEWS):
        return None
    expand = node.args[0]
    if not (isinstance(expand, fx.Node) and expand.target == aten.expand.default):
        return None
    unsq = expand.args[0]
    if not (isinstance(unsq, fx.Node) and unsq.target == aten.unsqueeze.default and unsq.args[1] == 2):
        return None
    src, sizes, out = unsq.args[0], expand.args[1], node_shape(node)
    src_shape = node_shape(src)
    if (len(sizes) != 5 or sizes[1] != kv_heads or sizes[2] != heads // kv_heads
            or src_shape is None or len(src_shape) != 4 or src_shape[1] != kv_heads
            or out is None or len(out) != 4 or out[1] != heads):
        return None
    return src


def kv_sources(sdpa: fx.Node, heads: int, kv_heads: int):
    """(k, v) before repeat_kv copied them per query head, if both SDPA inputs are such
    copies; None otherwise (no grouped heads, or copies made some other way)."""
    if kv_heads < 1 or heads % kv_heads or heads == kv_heads or len(sdpa.args) < 3:
        return None
    k, v = _repeated_from(sdpa.args[1], heads, kv_heads), _repeated_from(sdpa.args[2], heads, kv_heads)
    return (k, v) if k is not None and v is not None else None
