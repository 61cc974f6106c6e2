"""merge_tokens: token merging (ToMe, Bolya et al. 2023) inside an encoder's blocks.

In every block with r > 0, between the attention and the MLP (the anatomy's `mid`
point), the tokens are split alternately into sets A and B, each A token is matched to
its most similar B token by the cosine of the attention keys (mean over heads), and
the r best-matched pairs are merged by size-weighted average. Every later op runs on
the shorter sequence; each token's size (how many inputs it stands for) is carried
forward and added to the attention scores as log(size) (proportional attention).

- Protected tokens (the first `protected`: the class token of a ViT, DeiT's
  distillation token, BERT's [CLS]) never merge and keep their positions.
- Padding (size 0, from the attention mask) merges first and with zero weight, a real
  token never merges into padding, and the key mask shrinks with the sequence.
- Outputs: what reads a protected token (a classifier on the class token, a [CLS]
  pooler) reads it directly; token-level outputs are unmerged (each original position
  takes its merged token's value) with `outputs=unmerge`, or left at the merged length
  with `outputs=merged`.
- r is fixed per block, so shapes are static for a given input shape and the graph
  re-exports and compiles as any other.

The plan needs no calibration data: it is the per-block schedule, read from the
anatomy's token counts. The rewrite is in compiler/token_region.py.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from optc.compiler.anatomy import Anatomy
from optc.compiler.codegen.constant_masks import keeps_every_score
from optc.compiler.config import Choice, Int, PassConfig, knob
from optc.compiler.passes import PassResult, register_pass
from optc.compiler.rewrite import eliminate_dead_code, node_shape, rebuild
from optc.compiler.token_region import Refused, Region
from optc.errors import UsageError

aten = torch.ops.aten


@dataclass(frozen=True)
class MergeTokensConfig(PassConfig):
    r: int = knob(0, low=0, high=4096, search=Int(0, 16, bound="encoder"),
                  doc="tokens merged in every block (clamped to half of what is left)")
    schedule: tuple = knob((), low=0, unique=False, doc="tokens merged per block, e.g. [8,8,4,0]; overrides r")
    protected: int = knob(-1, low=-1, high=64,
                          doc="leading tokens that never merge; -1: the model's prefix tokens (class, "
                              "distillation), at least 1 ([CLS])")
    outputs: str = knob("unmerge", choices=("unmerge", "merged"),
                        doc="token-level outputs: back at every original position, or at the merged length")
    # Searched: without the size bias an encoder without padding (ViT) attends with no mask
    # (rewrite), at a quality cost; what that saves depends on the target's masked attention
    # (little where optc's kernel runs it: benchmarks/NOTES.md), so the search measures it.
    proportional_attention: bool = knob(True, search=Choice((True, False), when=("r", ">", 0)),
                                        doc="add log(size) to the attention scores")
    size_bias: str = knob("mask", choices=("mask", "channel"),
                          doc="how the size bias reaches attention: an additive mask, or one more "
                              "head channel of q and k (no mask, so SDPA may run a flash kernel)")
    # triton by default: the rewritten merge kernel beat the ops Inductor emits for the
    # same merge on merged BERT-base and ViT-B/16 on an H100 (benchmarks/NOTES.md, "The
    # rewritten merge kernel on the GPU"); the search still chooses per model.
    kernels: str = knob("triton", choices=("triton", "torch"), search=Choice(("triton", "torch"), when=("r", ">", 0)),
                        doc="on CUDA: torch ops that Inductor compiles, or optc's Triton kernels")

    def active(self) -> bool:
        return self.enabled and (self.r > 0 or any(self.schedule))


def plan_merge_tokens(ctx, anatomy: Anatomy, cfg: MergeTokensConfig) -> dict:
    """The per-block schedule; reads no data (ctx is never touched)."""
    if anatomy.empty:
        return {"schedule": [], "reason": f"no residual blocks recognised: {anatomy.reason}"}
    blocks = anatomy.blocks
    if cfg.schedule and len(cfg.schedule) != len(blocks):
        raise UsageError(f"merge_tokens.schedule has {len(cfg.schedule)} entries; the model has {len(blocks)} blocks")
    protected = cfg.protected if cfg.protected >= 0 else max(1, anatomy.prefix_tokens)
    wanted = list(cfg.schedule) if cfg.schedule else [cfg.r] * len(blocks)
    why = _refusal(blocks)
    if why:
        return {"schedule": [], "reason": why}
    n = int(node_shape(blocks[0].attention.sdpa.args[0])[2])
    tokens, schedule = [], []
    for block, r in zip(blocks, wanted):
        r = min(r, max(0, (n - protected) // 2)) if block.attention is not None else 0
        tokens.append(n)
        schedule.append(r)
        n -= r
    if not any(schedule):
        return {"schedule": [], "reason": f"nothing to merge: {tokens[0]} tokens, {protected} protected"}
    return {"schedule": schedule, "protected": protected, "tokens": tokens, "tokens_out": n,
            "token_fraction": round(sum(tokens) / (tokens[0] * len(tokens)), 4)}


def _refusal(blocks) -> str | None:
    if blocks[0].attention is None:
        return "the first block has no attention (skip_layers removed it)"
    for b in blocks:
        att = b.attention
        if att is None:
            continue
        if att.causal:
            return "token merging is for encoders: this attention is causal or writes a KV cache"
        if b.parallel:
            return f"block {b.path} computes attention and MLP side by side: there is no point between them to merge at"
        q, mid = node_shape(att.sdpa.args[0]), node_shape(b.mid)
        if q is None or mid is None or len(mid) != 3 or any(isinstance(s, torch.SymInt) for s in q + mid) \
                or mid[1] != q[2]:
            return f"block {b.path}: the residual stream is not [batch, tokens, hidden] with static sizes"
    masks = {_mask(b.attention.sdpa) for b in blocks if b.attention is not None}
    if len(masks) > 1:
        return "the attentions read different masks; merged tokens carry one key mask"
    return None


def _mask(sdpa: fx.Node):
    return sdpa.args[3] if len(sdpa.args) > 3 else sdpa.kwargs.get("attn_mask")


class _Cursor:
    """Emits nodes one after another, starting after a given node."""

    def __init__(self, region: Region, after: fx.Node):
        self.region, self.last = region, after

    def __call__(self, target, args, kwargs=None) -> fx.Node:
        self.last = self.region.emit(target, args, kwargs, after=self.last)
        return self.last


def _initial_size(put: _Cursor, mask, stream: fx.Node) -> fx.Node:
    """[B, N] fp32: 1 for a real token, 0 for padding (the first key row of the mask)."""
    bsz, n = node_shape(stream)[:2]
    if mask is None:
        return put(aten.new_ones.default, (stream, [bsz, n]), {"dtype": torch.float32})
    m = mask
    while len(node_shape(m) or ()) > 2:
        m = put(aten.select.int, (m, len(node_shape(m)) - 2, 0))
    if node_shape(m) is None or node_shape(m)[-1] != n:
        raise Refused(f"the attention mask {mask.name} is not a key mask over {n} tokens")
    if m.meta["val"].dtype != torch.bool:  # additive: a masked key holds a large negative value
        m = put(aten.gt.Scalar, (m, torch.finfo(m.meta["val"].dtype).min / 2))
    m = put(aten.expand.default, (m, [bsz, n]))
    return put(aten._to_copy.default, (m,), {"dtype": torch.float32})


def _merge_at(region: Region, mid: fx.Node, key: fx.Node, r: int, cfg: MergeTokensConfig, first_mask) -> None:
    """Insert match + merge after the block's mid and route the mid's users to the merged tokens."""
    ops, use_triton, p = torch.ops.optc, cfg.kernels == "triton", region.protected
    put = _Cursor(region, mid)
    level = region.tok[mid][1] if mid in region.tok else None
    n = int(node_shape(mid)[1])
    size = region.levels[level]["size"] if level is not None else _initial_size(put, first_mask, mid)
    # The keys [B, heads, N, d] themselves: the match sums them over heads as it reads them.
    match = put(ops.token_match.default, (key, size, r, p, use_triton))
    unm, src, dst = (put(operator.getitem, (match, i)) for i in range(3))
    merged = put(ops.token_merge.default, (mid, size, unm, src, dst, p, use_triton))
    y, new_size = put(operator.getitem, (merged, 0)), put(operator.getitem, (merged, 1))
    dest = put(ops.token_merge_dest.default, (unm, src, dst, n, p))
    source = dest if level is None else put(aten.gather.default, (dest, 1, region.levels[level]["source"]))
    region.levels.append({"n": n - r, "size": new_size, "source": source})
    mid.replace_all_uses_with(y, delete_user_cb=lambda u: u not in region.new_nodes)
    region.tok[y] = (1, len(region.levels) - 1)
    region.old[y] = mid.meta["val"]


def _set_mask(sdpa: fx.Node, mask) -> None:
    args = list(sdpa.args) + [None] * (4 - len(sdpa.args))
    args[3] = mask
    sdpa.args = tuple(args)
    sdpa.kwargs = {k: v for k, v in sdpa.kwargs.items() if k != "attn_mask"}


def _widen_heads(region: Region, sdpa: fx.Node, proportional: bool) -> int:
    """Carry the size bias in one more head channel instead of a mask: q' = [q, 1, 0...],
    k' = [k, bias / scale, 0...], v' = [v, 0...], padded to a multiple of 8, with the
    original scale given explicitly, so that q'.k' * scale = q.k * scale + bias. Without a
    mask, SDPA may pick a flash kernel. Returns the original head dim."""
    q, k, v = sdpa.args[:3]
    bsz, heads, n, d = (int(s) for s in node_shape(q))
    kv_heads = int(node_shape(k)[1])
    if node_shape(v)[-1] != d:
        raise Refused(f"{sdpa.name}: values {node_shape(v)[-1]} wide, queries {d}; size_bias=channel needs one width")
    scale = sdpa.kwargs.get("scale")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    pad = -(d + 1) % 8
    level = region.tok[q][1]
    chan = region.attention_channel(level, q.meta["val"].dtype, scale, sdpa, proportional)

    def widened(x, h, extra):
        parts = [x, *extra]
        if pad:
            parts.append(region.emit(aten.new_zeros.default, (x, [bsz, h, n, pad]), before=sdpa))
        out = region.emit(aten.cat.default, (parts, -1), before=sdpa)
        region.tok[out] = region.tok[x]
        return out

    one = region.emit(aten.new_ones.default, (q, [bsz, heads, n, 1]), before=sdpa)
    key_chan = region.emit(aten.expand.default, (chan, [bsz, kv_heads, n, 1]), before=sdpa)
    no_value = region.emit(aten.new_zeros.default, (v, [bsz, kv_heads, n, 1]), before=sdpa)
    wide = [widened(q, heads, [one]), widened(k, kv_heads, [key_chan]), widened(v, kv_heads, [no_value])]
    sdpa.args = (*wide, *sdpa.args[3:])
    _set_mask(sdpa, None)
    sdpa.kwargs = {**sdpa.kwargs, "scale": scale}
    return d


def _narrow_heads(region: Region, sdpa: fx.Node, d: int) -> None:
    """The widened attention's output back to its head dim, for every user."""
    out = region.emit(aten.slice.Tensor, (sdpa, -1, 0, d), after=sdpa)
    sdpa.replace_all_uses_with(out, delete_user_cb=lambda u: u is not out)
    region.tok[out] = region.tok[sdpa]
    region.old[out] = region.old[sdpa]


def rewrite(gm: fx.GraphModule, anatomy: Anatomy, cfg: MergeTokensConfig, plan: dict) -> dict:
    """Apply the plan to a copy of gm's graph; install it only if every step worked."""
    from optc.compiler.codegen import token_ops  # noqa: F401  (registers optc::token_*)

    copy, mapping = rebuild(gm)
    region = Region(copy, plan["protected"])
    # the keys as captured: _widen_heads gives a merged block's attention other ones
    at_mid = {mapping[b.mid]: (mapping[b.attention.sdpa].args[1], r)
              for b, r in zip(anatomy.blocks, plan["schedule"]) if r > 0}
    sdpa_of = {mapping[b.attention.sdpa] for b in anatomy.blocks if b.attention is not None}
    first_mask = _mask(anatomy.blocks[0].attention.sdpa)
    first_mask = mapping[first_mask] if first_mask is not None else None
    # Without the size bias and without padding every merged token's bias is 0: its attention
    # needs no mask, so SDPA may run its flash kernel.
    unmasked = not cfg.proportional_attention and (first_mask is None or keeps_every_score(first_mask))
    for node in list(copy.graph.nodes):
        head_dim = None
        if node in sdpa_of and node.args[0] in region.tok:
            if unmasked:
                _set_mask(node, None)
            elif cfg.size_bias == "channel":
                head_dim = _widen_heads(region, node, cfg.proportional_attention)
            else:
                level = region.tok[node.args[0]][1]
                bias = region.attention_bias(level, node.args[0].meta["val"].dtype, node,
                                             cfg.proportional_attention)
                _set_mask(node, bias)
        region.follow(node, unmerge_outputs=cfg.outputs == "unmerge")
        if head_dim is not None:
            _narrow_heads(region, node, head_dim)
        if node in at_mid:
            key, r = at_mid[node]
            _merge_at(region, node, key, r, cfg, first_mask)
    eliminate_dead_code(copy)
    copy.graph.lint()
    gm.graph = copy.graph
    gm.recompile()
    return {"tokens": plan["tokens"], "tokens_out": plan["tokens_out"],
            "unmerged_uses": len(region._unmerged)}


@register_pass("merge_tokens", MergeTokensConfig, lossy=True, plan=plan_merge_tokens, discontinuous=True)
def merge_tokens(gm: fx.GraphModule, anatomy: Anatomy, cfg: MergeTokensConfig, plan: dict) -> PassResult:
    """Merge similar tokens inside an encoder's blocks (ToMe), with proportional attention."""
    if not plan.get("schedule"):
        return PassResult(False, plan.get("reason", "nothing to merge"))
    try:
        details = rewrite(gm, anatomy, cfg, plan)
    except Refused as exc:
        return PassResult(False, f"token merging does not apply: {exc}")
    return PassResult(True, details=details)
