"""Decode-step attention runs optc's one-launch kernel instead of Inductor's SDPA.

Inductor lowers aten SDPA to a library kernel (cuDNN on Hopper) with a mask conversion
and a workspace memset around it, per layer. In a decode step each of those launches
moves a few hundred kilobytes, so the step pays their fixed costs and the gaps between
them rather than bytes (benchmarks/NOTES.md, "Where the 1.13 ms go now").
`optc::decode_attention` (codegen/attention_ops.py) computes the same function in one
Triton kernel that reads the boolean mask as the graph computed it.

Rewritten only where the function is exactly SDPA's: at most MAX_ROWS query rows per
(batch, head), keys and values with the query's batch, heads and width, a boolean mask
or none, no dropout, no causal flag, no GQA flag; and only where it was measured faster:
fewer query rows than keys (a decode step, not an encoder's self-attention) over at most
MAX_KEYS keys. Like gemv_inputs, the rewrite works on a copy used for lowering; the
lowering check compares it with the program itself.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

from optc.compiler.rewrite import node_dtype, node_shape, with_calls_replaced

aten = torch.ops.aten

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The longest cache the kernel was timed over (benchmarks/NOTES.md, "Decode attention on
# the H200"). A longer cache keeps SDPA until the kernel's split launch for it
# (kernels.decode_attention.KEYS_PER_PROGRAM) is timed against SDPA.
MAX_KEYS = 256


def decode_rows() -> int:
    # Imported here, not at the top: importing the kernels fixes Triton's interpreter
    # mode for the process, and the lowering module is imported long before any kernel runs.
    from optc.compiler.codegen.kernels.decode_attention import MAX_ROWS
    return MAX_ROWS


def plain_sdpa(node: fx.Node) -> tuple | None:
    """(q, k, v, mask, scale, (B, H, S, L, D)) if `node` is an SDPA with static 4-D q, k and v
    of one dtype (fp16, bf16, fp32), keys and values of the query's batch, heads and width,
    no dropout, no causal flag and no GQA flag; else None. The mask is not checked."""
    if node.op != "call_function" or node.target != aten.scaled_dot_product_attention.default:
        return None
    norm = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    if norm is None:
        return None
    a = norm.kwargs
    if a.get("dropout_p", 0.0) != 0.0 or a.get("is_causal", False) or a.get("enable_gqa", False):
        return None
    q, k, v = a["query"], a["key"], a["value"]
    qs, ks, vs = node_shape(q), node_shape(k), node_shape(v)
    if qs is None or ks is None or vs is None or not (len(qs) == len(ks) == len(vs) == 4):
        return None
    if not all(isinstance(d, int) for d in (*qs, *ks, *vs)):
        return None  # a dynamic length (a prefill program): its row count is not known here
    B, H, S, D = qs
    L = ks[2]
    if tuple(ks) != (B, H, L, D) or tuple(vs) != tuple(ks):
        return None
    if not (node_dtype(q) == node_dtype(k) == node_dtype(v) and node_dtype(q) in _DTYPES):
        return None
    scale = a.get("scale")
    return q, k, v, a.get("attn_mask"), float(scale) if scale is not None else 1.0 / math.sqrt(D), (B, H, S, L, D)


def mask_broadcasts(mask: fx.Node, scores: tuple) -> bool:
    """Whether `mask` has a static shape that broadcasts to `scores` ([B, H, S, L])."""
    ms = node_shape(mask)
    if ms is None or len(ms) > 4 or not all(isinstance(d, int) for d in ms):
        return False
    return all(m in (1, f) for m, f in zip(ms, scores[4 - len(ms):]))


def _call(node: fx.Node) -> tuple | None:
    """(q, k, v, mask, scale) if `node` is an SDPA the kernel computes exactly, else None."""
    call = plain_sdpa(node)
    if call is None:
        return None
    q, k, v, mask, scale, (B, H, S, L, D) = call
    if S > decode_rows() or not S < L <= MAX_KEYS:
        return None
    if mask is not None and (node_dtype(mask) != torch.bool or not mask_broadcasts(mask, (B, H, S, L))):
        return None
    return q, k, v, mask, scale


def decode_sdpa_nodes(graph: fx.Graph) -> list[fx.Node]:
    """The SDPA nodes of `graph` that optc::decode_attention computes exactly."""
    return [node for node, _ in _calls(graph)]


def _calls(graph: fx.Graph) -> list[tuple[fx.Node, tuple]]:
    return [(node, call) for node in graph.nodes if (call := _call(node)) is not None]


def _decode_attention_op():
    from optc.compiler.codegen import attention_ops  # noqa: F401  (registers optc::decode_attention)
    return torch.ops.optc.decode_attention.default


def use_decode_attention(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """A copy of `gm` (sharing its parameters) whose decode-step SDPAs call
    optc::decode_attention, and how many it rewrote; `gm` itself when there are none."""
    return with_calls_replaced(gm, _calls, _decode_attention_op)
