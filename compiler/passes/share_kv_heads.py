"""share_kv_heads: one-token attention reads each KV head once (lossless).

Grouped-query attention (Llama: 32 query heads over 8 KV heads) is exported as
Hugging Face's repeat_kv: the whole K and V caches are copied once per query head
(expand + reshape) before SDPA. In a decode step that is two copies of each cache per
block, and the query reads them as if they were distinct.

With one query token the G query heads of a group can instead be the G query rows of
their KV head: the query [B, H, 1, D] is viewed as [B, KV, G, D] and attends to the
caches [B, KV, L, D] directly; the output [B, KV, G, D] is viewed back as [B, H, 1, D].
Every (head, key) score is the same dot product as before, and the mask, which holds
one row per batch for one token, broadcasts over the G rows as it did over the heads,
so the function is unchanged (the runner checks it end to end). Head h = kv * G + g in
both forms, which is repeat_kv's order.

Rewritten only where this holds exactly: one query token, no causal flag (it would
mask the G rows differently), no dropout, a mask (if any) that is one row shared by
all heads. Prefill programs (many tokens) are left as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

from optc.compiler.anatomy import Anatomy, Attention
from optc.compiler.gqa import GROUPED_QUERY
from optc.compiler.config import PassConfig, knob
from optc.compiler.passes import PassResult, register_pass
from optc.compiler.rewrite import eliminate_dead_code
from optc.compiler.torch_private import FakeTensor

aten = torch.ops.aten


@dataclass(frozen=True)
class ShareKVHeadsConfig(PassConfig):
    # On by default: in Llama-1B's decode step on the H100 it removes 32 copy launches
    # and about 50 us of kernel time per token (the copies, and cuDNN then picks its sm90
    # attention kernel); end to end 1.00-1.09x over three processes, whose dense rows
    # differed more than that (benchmarks/NOTES.md).
    enabled: bool = knob(True, doc="run this pass at all")


def _sdpa_args(node: fx.Node) -> dict | None:
    norm = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    return dict(norm.kwargs) if norm is not None else None


def _val(node):
    """The node's fake tensor (shape metadata), or None."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, FakeTensor) else None


def _why_not(att: Attention) -> str | None:
    """Why this attention cannot be rewritten exactly, or None. Everything `_rewrite`
    relies on is checked here, so an attention that does not fit is skipped, never
    half rewritten."""
    if att.kv_sources is None:
        return "no repeat_kv copies of K and V recognised in front of SDPA"
    args = _sdpa_args(att.sdpa)
    if args is None:
        return "SDPA arguments could not be read"
    q, out = _val(args["query"]), _val(att.sdpa)
    k, v = (_val(s) for s in att.kv_sources)
    if any(t is None or t.dim() != 4 for t in (q, out, k, v)):
        return "no 4-d fake-tensor metadata on the query, the output or the caches"
    if not isinstance(q.shape[2], int) or q.shape[2] != 1:
        return "more than one query token (only one-token attention, i.e. decode, is rewritten)"
    if not all(isinstance(d, int) for d in (*q.shape[1:], *k.shape[1:], *v.shape[1:])):
        return "symbolic head count, head size or cache length"
    kv = att.num_kv_heads
    if q.shape[1] != att.num_heads or k.shape[1] != kv or v.shape[1] != kv or att.num_heads % kv:
        return "query or cache head counts differ from the projections'"
    if args.get("is_causal") or args.get("dropout_p", 0.0) != 0.0 or args.get("enable_gqa"):
        return "SDPA uses is_causal, dropout or enable_gqa"
    mask = args.get("attn_mask")
    if mask is not None:
        m = _val(mask)
        # Broadcast against [B, H, 1, L] before and [B, KV, G, L] after: the same
        # values only if the head axis (-3) and the query axis (-2) are 1 or absent.
        if m is None or (m.dim() >= 3 and m.shape[-3] != 1) or (m.dim() >= 2 and m.shape[-2] != 1):
            return "the attention mask is not one row shared by all heads"
    return None


def _rewrite(gm: fx.GraphModule, att: Attention) -> None:
    g = gm.graph
    sdpa = att.sdpa
    args = _sdpa_args(sdpa)
    q = args.pop("query")
    rest = {k: v for k, v in args.items() if k not in ("key", "value")}  # mask, scale, ...
    k_src, v_src = att.kv_sources
    qv = _val(q)
    _, H, _, D = qv.shape
    # -1 for the batch: it may be symbolic, and is the same in all three views.
    grouped_shape = [-1, att.num_kv_heads, H // att.num_kv_heads, D]
    out_shape = [-1, *sdpa.meta["val"].shape[1:]]
    with qv.fake_mode:  # shape metadata of the new nodes, for the passes after this one
        q_val = qv.reshape(grouped_shape)
        fake_rest = {k: _val(v) if isinstance(v, fx.Node) else v for k, v in rest.items()}
        out_val = aten.scaled_dot_product_attention.default(q_val, _val(k_src), _val(v_src), **fake_rest)
        back_val = out_val.reshape(out_shape)
    meta = {k: v for k, v in sdpa.meta.items() if k in ("nn_module_stack", "stack_trace")}
    with g.inserting_before(sdpa):
        q_grouped = g.call_function(aten.reshape.default, (q, grouped_shape))
        shared = g.call_function(aten.scaled_dot_product_attention.default, (q_grouped, k_src, v_src), rest)
        back = g.call_function(aten.reshape.default, (shared, out_shape))
    for node, val in ((q_grouped, q_val), (shared, out_val), (back, back_val)):
        node.meta.update(meta, val=val)
    shared.meta[GROUPED_QUERY] = True  # the anatomy reads H = KV * G heads from it
    sdpa.replace_all_uses_with(back)
    g.erase_node(sdpa)


@register_pass("share_kv_heads", ShareKVHeadsConfig, lossy=False)
def share_kv_heads(gm: fx.GraphModule, anatomy: Anatomy, cfg: ShareKVHeadsConfig, plan: dict) -> PassResult:
    """One-token attention over the shared KV heads instead of per-head cache copies."""
    if anatomy.empty:
        return PassResult(False, f"no transformer structure recognised: {anatomy.reason}")
    rewritten, skipped = 0, {}
    for block in anatomy.blocks:
        if block.attention is None:
            continue  # removed by skip_layers
        why = _why_not(block.attention)
        if why is not None:
            skipped[why] = skipped.get(why, 0) + 1
            continue
        _rewrite(gm, block.attention)
        rewritten += 1
    if not rewritten:
        return PassResult(False, "; ".join(f"{why} ({n} blocks)" for why, n in skipped.items()))
    eliminate_dead_code(gm)
    gm.recompile()
    return PassResult(True, details={"attentions_rewritten": rewritten,
                                     **({"skipped": skipped} if skipped else {})})
