"""Calibration for sparsify_activations: which activations a method thresholds (units),
their thresholds at a target sparsity, and how the sparsity is spread over layers.

A unit is one thresholded tensor: the input of one or more linears (TEAL; CHESS's
attention inputs) or the activation act(gate) of an MLP (CATS, CHESS). A zero in it
skips one row of each weight in `weights` (the weight reads the kernels save), and its
effect on the output is measured through `error_weight` applied to `effective` (the
tensor the zero actually removes from: the linear's input, or act(gate) * up).

Scores are |x| (per-layer threshold) or |x| * importance[c] (CHESS, per channel): one
cutoff tau on the scores is the quantile at the target sparsity, and the per-channel
threshold is tau / importance[c], so a channel whose zeros cost more (larger
E|up_c| * ||W_down[:, c]||) keeps more of its values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import math

import torch
import torch.fx as fx
import torch.nn.functional as F

from optc.compiler.anatomy import Anatomy, Block, Linear
from optc.compiler.rewrite import attr_value

LEVELS = [round(0.05 * i, 2) for i in range(20)]  # greedy allocation grid, 0 .. 0.95
MAX_TOKENS = 512  # calibration tokens used for the error proxy


@dataclass
class Unit:
    key: str  # "3.qkv", "3.o", "3.gate_up", "3.down", "3.act"
    block: Block
    kind: str
    source: fx.Node  # the node whose |value| is thresholded
    weights: list[Linear]  # linears whose rows a zero skips
    error_weight: Linear  # maps the removed part to the error the proxy measures
    consumers: list[fx.Node] = field(default_factory=list)  # read the masked value
    effective: fx.Node | None = None  # None: the source itself (else act(gate) * up)
    up: fx.Node | None = None  # CHESS: the up projection's output (E|up_c|)
    per_channel: bool = False
    params: int = 0

    @property
    def layer(self) -> int:
        return self.block.index


def act_mul(block: Block) -> fx.Node | None:
    """The node act(gate) * up of a gated MLP, if the graph has that exact shape."""
    mlp = block.mlp
    if mlp.act_node is None:
        return None
    if not mlp.gated:
        return mlp.act_node if mlp.down.node.args[0] is mlp.act_node else None
    for user in mlp.act_node.users:
        if user.target == torch.ops.aten.mul.Tensor and set(user.args) == {mlp.act_node, mlp.up.node}:
            return user if mlp.down.node.args[0] is user else None
    return None


def units_for(method: str, anatomy: Anatomy) -> tuple[list[Unit], list[str]]:
    """The units a method thresholds, and why blocks were left out."""
    units, skipped = [], []
    for b in anatomy.blocks:
        att, mlp = b.attention, b.mlp
        if method in ("teal", "chess") and att is not None:
            qkv = [att.q] if att.fused_qkv else [att.q, att.k, att.v]
            if len({lin.node.args[0] for lin in qkv}) == 1:
                units.append(Unit(f"{b.index}.qkv", b, "qkv", att.q.node.args[0], qkv, att.v))
            units.append(Unit(f"{b.index}.o", b, "o", att.o.node.args[0], [att.o], att.o))
        if mlp is None:
            continue
        if method == "teal":
            ins = [lin for lin in (mlp.gate, mlp.up) if lin is not None]
            if len({lin.node.args[0] for lin in ins}) == 1:
                units.append(Unit(f"{b.index}.gate_up", b, "gate_up", ins[0].node.args[0], ins, ins[-1]))
            units.append(Unit(f"{b.index}.down", b, "down", mlp.down.node.args[0], [mlp.down], mlp.down))
            continue
        h = act_mul(b)
        if h is None:
            skipped.append(f"block {b.index}: no act(gate)*up -> down chain")
            continue
        skipping = [mlp.up, mlp.down] if mlp.gated else [mlp.down]
        units.append(
            Unit(f"{b.index}.act", b, "act", mlp.act_node, skipping, mlp.down,
                 consumers=[h if mlp.gated else mlp.down.node], effective=h,
                 up=mlp.up.node if (mlp.gated and method == "chess") else None, per_channel=method == "chess")
        )
    for u in units:
        u.consumers = u.consumers or [lin.node for lin in u.weights]
        u.params = sum(lin.in_features * lin.out_features for lin in u.weights)
    return units, skipped


@dataclass
class Stats:
    """One unit's calibration values, flattened to [tokens, channels] in fp32, and the
    residual stream its error lands in (squared norm per token)."""

    x: torch.Tensor
    effective: torch.Tensor
    importance: torch.Tensor | None  # [channels] (per-channel units)
    stream_sq: torch.Tensor  # [tokens] ||residual stream after the sub-block||^2
    sorted_scores: torch.Tensor = field(default=None)

    def scores(self) -> torch.Tensor:
        s = self.x.abs()
        return s * self.importance if self.importance is not None else s


def _stream_node(u: Unit) -> fx.Node:
    """The residual stream after the unit's sub-block adds its output."""
    return u.block.mid if u.kind in ("qkv", "o") else u.block.output


def collect(ctx, units: list[Unit], gm: fx.GraphModule, n: int) -> dict[str, Stats]:
    nodes = []
    for u in units:
        nodes += [u.source, _stream_node(u)] + [m for m in (u.effective, u.up) if m is not None]
    nodes = list(dict.fromkeys(nodes))
    pos = {node: i for i, node in enumerate(nodes)}
    values = ctx.stream_values(nodes, n)

    def cat(node):
        t = torch.cat([v[pos[node]].detach().float().reshape(-1, v[pos[node]].shape[-1]) for v in values])
        return t[:: max(1, t.shape[0] // MAX_TOKENS)][:MAX_TOKENS]

    out = {}
    for u in units:
        x = cat(u.source)
        eff = cat(u.effective) if u.effective is not None else x
        imp = None
        if u.per_channel:
            col = gm.get_parameter(u.error_weight.weight).detach().float().norm(dim=0)  # ||W_down[:, c]||
            up = cat(u.up).abs().mean(0) if u.up is not None else torch.ones_like(col)
            imp = (col * up).clamp_min(0)
            imp = imp / imp.mean().clamp_min(1e-30)
        st = Stats(x, eff, imp, cat(_stream_node(u)).pow(2).sum(-1).clamp_min(1e-30))
        st.sorted_scores = st.scores().flatten().sort().values
        out[u.key] = st
    return out


def cutoff(st: Stats, sparsity: float) -> float:
    """The score below or at which a fraction `sparsity` of the calibration values lies."""
    k = int(sparsity * st.sorted_scores.numel())
    return 0.0 if k <= 0 else float(st.sorted_scores[k - 1])


def threshold_tensor(st: Stats, tau: float) -> torch.Tensor:
    """The stored threshold: [1] per layer, or tau / importance[c] per channel."""
    if st.importance is None:
        return torch.tensor([tau], dtype=torch.float32, device=st.x.device)
    t = torch.where(st.importance > 0, tau / st.importance.clamp_min(1e-30), float("inf"))
    return t.clamp(max=torch.finfo(torch.float32).max).float()


def reached(st: Stats, threshold: torch.Tensor) -> float:
    return float((st.x.abs() <= threshold).float().mean())


_ACT = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
        "none": lambda z: z}


def _weights(gm: fx.GraphModule, lin: Linear):
    w = gm.get_parameter(lin.weight).detach().float()
    if lin.bias is None:
        return w, None
    return w, attr_value(gm, lin.bias).detach().float()


_PASS_THROUGH = {torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten.transpose.int,
                 torch.ops.aten.permute.default, torch.ops.aten.clone.default, torch.ops.aten._unsafe_view.default,
                 torch.ops.aten.contiguous.default, torch.ops.aten.expand.default, torch.ops.aten.unsqueeze.default,
                 torch.ops.aten._to_copy.default}


def _v_rows(att) -> slice | None:
    """Which output rows of a fused q/k/v projection are the values: SDPA's value input
    traced back through views, copies and the KV-cache write to one slice of the
    projection's last dim (None where it is not one slice, e.g. heads interleaved)."""
    if not att.fused_qkv:
        return None
    node = att.sdpa.args[2]
    while isinstance(node, fx.Node) and node.op == "call_function":
        # Other slices on the way are repeat_kv's full-range indexing.
        if node.target == torch.ops.aten.slice.Tensor and node.args[0] is att.q.node:
            dim = node.args[1] if len(node.args) > 1 else 0
            start = node.args[2] if len(node.args) > 2 else 0
            end = node.args[3] if len(node.args) > 3 else None
            rank = len(att.q.node.meta["val"].shape) if "val" in att.q.node.meta else None
            if dim in (-1, (rank or 0) - 1) and isinstance(start, int) and isinstance(end, int):
                return slice(start, min(end, att.q.out_features))
            return None
        if node.target == torch.ops.aten.index_copy_.default:  # a KV cache: follow what is written
            node = node.args[3]
            continue
        if node.target not in _PASS_THROUGH and node.target != torch.ops.aten.slice.Tensor:
            return None
        node = node.args[0]
    return None


def _mlp_widths_match(mlp) -> bool:
    """act(gate) * up (or act(up)) has the width down reads: not so for a fused gate/up
    projection that fused_mlp does not split (its halves not act(half 0) * half 1), which
    the anatomy sees as one wide `up`. Phi-3's is split before this pass reads the model."""
    return mlp.up.out_features == mlp.down.in_features


class ErrorProxy:
    """The error a unit's zeros add to the residual stream, relative to the stream, per
    token and averaged: comparable across units and layers, with no model forward.

    o, down, act(gate): exactly W (v * dropped), added to the stream.
    gate/up input: exactly down(h(x) - h(x - dropped)) through the MLP.
    q/k/v input: through v and o (o(v(dropped)), each token attending to itself);
    errors in q and k (attention weights) are not modelled.
    Normalising instead by each linear's own output, or scaling a linear's relative
    error by its sub-block's share of the stream, measured worse than uniform on
    SmolLM2 (calibration loss), while this proxy measured better.
    """

    TOKENS = 256

    def __init__(self, gm: fx.GraphModule, unit: Unit, st: Stats):
        step = max(1, st.x.shape[0] // self.TOKENS)
        self.st, self.scores = st, st.scores()[::step]
        self.effective, self.stream_sq = st.effective[::step], st.stream_sq[::step]
        b = unit.block
        att, mlp = b.attention, b.mlp
        v_rows = _v_rows(att) if unit.kind == "qkv" else None
        if unit.kind == "qkv" and (not att.fused_qkv or v_rows is not None):
            wv, _ = _weights(gm, att.v)
            wv = wv if v_rows is None else wv[v_rows]  # the value rows of a fused q/k/v weight
            wo, _ = _weights(gm, att.o)
            rep, hd = att.num_heads // att.num_kv_heads, att.head_dim

            def through(d):
                v = (d @ wv.t()).unflatten(-1, (-1, hd)).repeat_interleave(rep, dim=-2).flatten(-2)
                return v @ wo.t()
        elif unit.kind == "gate_up" and _mlp_widths_match(mlp):
            act = _ACT.get(mlp.activation, _ACT["none"])
            wu, bu = _weights(gm, mlp.up)
            wg, bg = _weights(gm, mlp.gate) if mlp.gated else (None, None)
            wd, _ = _weights(gm, mlp.down)

            def h(x):
                up = F.linear(x, wu, bu)
                return act(F.linear(x, wg, bg)) * up if wg is not None else act(up)

            x = self.effective
            h0 = h(x)

            def through(d):
                return (h0 - h(x - d)) @ wd.t()
        else:
            # o, down, act(gate); and, where the paths above cannot be followed (a fused
            # q/k/v whose value columns are not one slice, a fused gate/up left unsplit),
            # the error at the unit's own projection output.
            w, _ = _weights(gm, unit.error_weight)

            def through(d):
                return d @ w.t()
        self.through = through

    def __call__(self, sparsity: float) -> float:
        tau = cutoff(self.st, sparsity)
        if tau <= 0:
            return 0.0
        err = self.through(self.effective * (self.scores <= tau)).pow(2).sum(-1)
        return float((err / self.stream_sq).mean())


def greedy(units: list[Unit], proxies: dict[str, ErrorProxy], target: float) -> dict[str, float]:
    """Per-unit sparsities whose parameter-weighted mean meets `target`: each step raises
    the unit whose next 5% costs the least proxy error per weight row skipped. The
    proxy is measured every 10% and interpolated in between."""
    coarse = LEVELS[::2] + [LEVELS[-1]]
    err = {}
    for u in units:
        at = {s: proxies[u.key](s) for s in coarse}
        err[u.key] = [at[s] if s in at else (at[round(s - 0.05, 2)] + at[round(s + 0.05, 2)]) / 2 for s in LEVELS]
    level = {u.key: 0 for u in units}
    total = sum(u.params for u in units)
    done, step = 0.0, LEVELS[1]
    while done < target * total - 1e-6:
        best, best_cost = None, float("inf")
        for u in units:
            i = level[u.key]
            if i + 1 < len(LEVELS):
                cost = (err[u.key][i + 1] - err[u.key][i]) / (u.params * step)
                if cost < best_cost:
                    best, best_cost = u, cost
        if best is None:
            break
        level[best.key] += 1
        done += best.params * step
    return {k: LEVELS[i] for k, i in level.items()}


def sig(v: float) -> float:
    """Four significant digits, for the plan's JSON."""
    return float(f"{v:.4g}")


def summary(t: torch.Tensor) -> dict:
    """A per-channel threshold vector as the plan shows it (the vector is a buffer)."""
    finite = t[torch.isfinite(t) & (t < torch.finfo(torch.float32).max)]
    q = finite.quantile(torch.tensor([0.0, 0.5, 1.0], device=t.device)).tolist() if finite.numel() else [math.nan] * 3
    return {"channels": t.numel(), "min": q[0], "median": q[1], "max": q[2],
            "always_zero": int(t.numel() - finite.numel())}
