"""Attention masks that keep every score are dropped before Inductor sees them.

Hugging Face's encoders build a mask even where nothing is masked: ViT's is
`arange(tokens) >= 0`, broadcast over the rows (transformers 5's bidirectional mask with
no padding). Any mask rules out SDPA's flash kernel, and this one, a broadcast view whose
last dimension has stride 0, rules out the memory-efficient and cuDNN kernels too, so
SDPA falls back to its math path: two fp32 GEMMs, a softmax and casts per layer
(benchmarks/NOTES.md: ViT-B/16 on the H100; torch.compile's max-autotune runs the same
path). Such a mask is computed from constants alone, so it is evaluated here, once per
lowering, and an SDPA whose mask keeps every score (a boolean mask all true, an additive
one all zero) runs without it: the same function, with a fused kernel allowed.

Like the decode rewrites this works on a copy used for lowering; the lowering check
compares it with the program itself. A mask that reads an input (BERT's padding mask)
or a parameter or buffer is never evaluated.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

from optc.compiler.codegen.decode_sdpa import mask_broadcasts
from optc.compiler.rewrite import node_dtype, with_calls_replaced

aten = torch.ops.aten

# A constant mask larger than this is left alone rather than evaluated at every lowering.
MAX_ELEMENTS = 1 << 24
# Allocations whose contents are whatever memory held: not constants, though fx counts
# them pure.
_UNINITIALISED = {aten.empty, aten.empty_like, aten.new_empty, aten.empty_strided, aten.new_empty_strided,
                  aten.empty_permuted}


def _constant_ancestry(mask: fx.Node) -> list[fx.Node] | None:
    """The nodes `mask` is computed from, in graph order, when they are all calls on
    constants (no input, parameter, buffer, random op or uninitialised memory); else None."""
    seen: dict[fx.Node, None] = {}
    stack = [mask]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        if node.op != "call_function" or node.is_impure() or \
                getattr(node.target, "overloadpacket", None) in _UNINITIALISED:
            return None
        seen[node] = None
        stack.extend(node.all_input_nodes)
    order = {n: i for i, n in enumerate(mask.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def _evaluate(nodes: list[fx.Node]):
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(env[nodes[-1]])
    with torch.no_grad():
        return fx.GraphModule(torch.nn.Module(), graph)()


def keeps_every_score(mask: fx.Node) -> bool:
    """Whether `mask`, an SDPA attn_mask, is computed from constants and masks nothing."""
    nodes = _constant_ancestry(mask)  # first: a mask that reads an input may have a symbolic size
    val = mask.meta.get("val")
    if nodes is None or not isinstance(val, torch.Tensor) or val.numel() > MAX_ELEMENTS:
        return False
    value = _evaluate(nodes)
    if not isinstance(value, torch.Tensor):
        return False
    return bool(value.all()) if value.dtype == torch.bool else bool((value == 0).all())


# Boolean ands of masks: `a & b` as exported (transformers 5 ands its mask functions).
_AND = (aten.__and__.Tensor, aten.bitwise_and.Tensor, aten.logical_and.default)


def without_constant_factor(mask: fx.Node, scores: tuple) -> fx.Node:
    """`mask` (a boolean SDPA mask for scores of shape `scores`) with a factor that keeps
    every score left out: for `expand(a & c)` with `c` computed from constants and all
    true, `a`, when it broadcasts to the scores by itself; else `mask`. BERT's padding
    mask is `padding[B, 1, 1, L] & (query_index >= 0)[1, 1, S, 1]` (transformers 5),
    expanded to [B, 1, S, L]: the same mask for every query row, which SDPA and a kernel
    read as one row per sequence once the all-true factor is gone."""
    node = mask
    while node.op == "call_function" and node.target is aten.expand.default:
        node = node.args[0]
    if node.op != "call_function" or node.target not in _AND:
        return mask
    for keep, factor in (node.args[:2], node.args[1::-1]):
        if isinstance(keep, fx.Node) and isinstance(factor, fx.Node) and node_dtype(keep) == torch.bool \
                and node_dtype(factor) == torch.bool and mask_broadcasts(keep, scores) and keeps_every_score(factor):
            return keep
    return mask


def _maskless_calls(graph: fx.Graph) -> list[tuple]:
    """(SDPA node, its args, its kwargs without the mask) for each SDPA whose mask keeps
    every score."""
    found, verdicts = [], {}
    for node in graph.find_nodes(op="call_function", target=aten.scaled_dot_product_attention.default):
        norm = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
        mask = norm.kwargs.get("attn_mask") if norm is not None else None
        if not isinstance(mask, fx.Node):
            continue
        if mask not in verdicts:  # one mask is often read by every layer
            verdicts[mask] = keeps_every_score(mask)
        if verdicts[mask]:
            found.append((node, (), {**norm.kwargs, "attn_mask": None}))
    return found


def drop_constant_masks(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """A copy of `gm` (sharing its parameters) whose SDPAs with a mask that keeps every
    score run without it, and how many; `gm` itself when there are none."""
    rewritten, count = with_calls_replaced(gm, _maskless_calls, aten.scaled_dot_product_attention.default)
    if count:
        rewritten.graph.eliminate_dead_code()  # the masks' own nodes, which nothing reads now
        rewritten.recompile()
    return rewritten, count
