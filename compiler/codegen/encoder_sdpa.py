"""Masked self-attention runs optc's flash kernel instead of Inductor's SDPA.

With a mask, SDPA leaves its flash kernels: on ViT-B/16's shapes cuDNN's masked path took
about three times its unmasked time, whether the mask was BERT-style booleans or
merge_tokens' size bias (benchmarks/NOTES.md, "Where decode_qkv's gap was; merged ViT
attention slower than dense"). `optc::encoder_attention` (codegen/attention_ops.py)
computes the same function as a flash loop that reads the mask in tiles.

Rewritten only where the function is exactly SDPA's: static shapes, not a decode step's
(a few query rows over more keys: decode_sdpa's kernel is made for those), keys and values
with the query's batch, heads and width (at most MAX_HEAD_DIM), one dtype, a boolean or
additive mask that broadcasts to the scores, no dropout, no causal flag, no GQA flag. An
SDPA without a mask keeps Inductor's choice (a flash kernel) unless the target asks for the
kernel there too (`encoder_attention_unmasked`). A boolean mask's factor that
keeps every score is left out (constant_masks.without_constant_factor), so BERT's padding
mask reaches the kernel as one row a sequence, read once a trip, not as a row per query.
Like the other lowering rewrites this works on a copy used for lowering; the lowering check
compares it with the program itself.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from optc.compiler.codegen.constant_masks import without_constant_factor
from optc.compiler.codegen.decode_sdpa import decode_rows, mask_broadcasts, plain_sdpa
from optc.compiler.rewrite import node_dtype, with_calls_replaced

# Elements a tensor the kernel reads may span: its offsets are int32.
_INT32_OFFSETS = 2**31
# The widest head the kernel's tiles hold (a [BLOCK_M, D] query tile and the accumulator).
MAX_HEAD_DIM = 128


def _max_batch_heads() -> int:
    from optc.compiler.codegen.kernels.encoder_attention import MAX_BATCH_HEADS  # see decode_sdpa.decode_rows
    return MAX_BATCH_HEADS


def _call(node: fx.Node, masked: bool, unmasked: bool) -> tuple | None:
    """(q, k, v, mask, scale, scores shape) if `node` is an SDPA the kernel computes
    exactly, with a mask if `masked`, without one if `unmasked`; else None."""
    call = plain_sdpa(node)
    if call is None:
        return None
    q, k, v, mask, scale, (B, H, S, L, D) = call
    wanted = masked if isinstance(mask, fx.Node) else unmasked and mask is None
    if not wanted or D > MAX_HEAD_DIM:
        return None
    if S < L and S <= decode_rows():
        return None  # a decode step's shape: decode_sdpa's kernel is made for it
    if mask is not None and (node_dtype(mask) not in (torch.bool, node_dtype(q))
                             or not mask_broadcasts(mask, (B, H, S, L))):
        return None
    if max(B * H * S * D, B * H * L * D, B * H * S * L) >= _INT32_OFFSETS or B * H > _max_batch_heads():
        return None  # the kernel's offsets are 32-bit; its grid holds (batch, head) pairs on one axis
    return q, k, v, mask, scale, (B, H, S, L)


def _calls(graph: fx.Graph, masked: bool, unmasked: bool) -> list[tuple[fx.Node, tuple]]:
    """(SDPA node, the kernel's arguments) for each SDPA rewritten. A boolean mask goes
    without a factor that keeps every score (BERT's: one row a sequence), worked out once
    for the mask every layer reads."""
    found, narrowed = [], {}
    for node in graph.nodes:
        call = _call(node, masked, unmasked)
        if call is None:
            continue
        q, k, v, mask, scale, scores = call
        if mask is not None and node_dtype(mask) == torch.bool:
            if (mask, scores) not in narrowed:
                narrowed[mask, scores] = without_constant_factor(mask, scores)
            mask = narrowed[mask, scores]
        found.append((node, (q, k, v, mask, scale)))
    return found


def encoder_sdpa_nodes(graph: fx.Graph, *, masked: bool = True, unmasked: bool = False) -> list[fx.Node]:
    """The SDPA nodes of `graph` that optc::encoder_attention computes exactly: those with
    a mask if `masked`, those without one if `unmasked`."""
    return [node for node in graph.nodes if _call(node, masked, unmasked) is not None]


def _encoder_attention_op():
    from optc.compiler.codegen import attention_ops  # noqa: F401  (registers optc::encoder_attention)
    return torch.ops.optc.encoder_attention.default


def use_encoder_attention(gm: fx.GraphModule, *, masked: bool = True,
                          unmasked: bool = False) -> tuple[fx.GraphModule, int]:
    """A copy of `gm` (sharing its parameters) whose SDPAs, masked ones if `masked` and
    those without a mask if `unmasked`, call optc::encoder_attention, and how many it
    rewrote; `gm` itself when there are none."""
    return with_calls_replaced(gm, lambda graph: _calls(graph, masked, unmasked), _encoder_attention_op)
