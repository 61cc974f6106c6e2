"""Attention heads as prune_heads sees them: the units a layer can lose (whole KV
groups, or query heads evenly from every group), how much each unit matters on
calibration data, which heads a kept count keeps, and the parameters that removes.
The pass (compiler/passes/prune_heads.py) plans and applies with these."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from optc.compiler.anatomy import Anatomy
from optc.compiler.head_coupling import HeadCoupling, couple
from optc.compiler.rewrite import attr_value


@dataclass
class HeadLayer:
    """One attention as the plan sees it: its units (KV groups, or query heads) and what
    one step of its kept count is worth."""

    index: int
    coupling: HeadCoupling
    by_group: bool  # units are KV groups; else query heads, counted per group
    count: int  # kept count at full width: groups, or query heads per group

    @property
    def att(self):
        return self.coupling.attention

    def unit_heads(self, u: int) -> list[int]:
        g = self.att.num_heads // self.att.num_kv_heads
        return list(range(u * g, (u + 1) * g)) if self.by_group else [u]

    def columns(self, heads: list[int]) -> torch.Tensor:
        d = self.att.head_dim
        return torch.tensor([h * d + j for h in heads for j in range(d)], dtype=torch.long)

    def step(self, align: int) -> int:
        """The kept count moves in steps that keep the width a multiple of `align`."""
        per = self.att.head_dim * (self.att.num_heads // self.att.num_kv_heads if self.by_group
                                   else self.att.num_kv_heads)
        align = align or 1  # 0 unresolved (a pipeline run without a target): no step
        return align // math.gcd(align, per)


def head_layers(gm, anatomy: Anatomy, granularity: str) -> list[HeadLayer]:
    out = []
    for b in anatomy.blocks:
        att = b.attention
        if att is None:  # skip_layers removed this attention
            continue
        group = att.num_heads // att.num_kv_heads
        by_group = granularity == "group" or group == 1  # one query head a group: the same thing
        out.append(HeadLayer(b.index, couple(gm, att), by_group, att.num_kv_heads if by_group else group))
    return out


def o_weight(gm, layer: HeadLayer) -> torch.Tensor:
    return attr_value(gm, layer.att.o.weight).float()


def v_rows(gm, layer: HeadLayer, kv: int) -> torch.Tensor:
    att, d = layer.att, layer.att.head_dim
    w = attr_value(gm, att.v.weight).float()
    offset = (att.num_heads + att.num_kv_heads) * d if att.fused_qkv else 0
    return w[offset + kv * d: offset + (kv + 1) * d]


def unit_scores(gm, layer: HeadLayer, x: torch.Tensor | None, score: str, centred: bool) -> torch.Tensor:
    wo = o_weight(gm, layer)
    n_units = layer.att.num_kv_heads if layer.by_group else layer.att.num_heads
    group = layer.att.num_heads // layer.att.num_kv_heads
    out = []
    for u in range(n_units):
        cols = layer.columns(layer.unit_heads(u))
        if score == "activation":
            xu = x[:, cols.to(x.device)]
            xu = xu - xu.mean(0) if centred else xu
            out.append((xu @ wo[:, cols].T.to(x.device)).pow(2).sum(1).mean().item())
        else:
            kv = u if layer.by_group else u // group
            out.append(wo[:, cols].pow(2).sum().item() * v_rows(gm, layer, kv).pow(2).sum().item())
    return torch.tensor(out, dtype=torch.float64)


def choose_heads(layer: HeadLayer, scores: torch.Tensor, count: int) -> tuple[list[int], list[int]]:
    """(kept KV heads, kept query heads)."""
    att = layer.att
    if layer.by_group:
        groups = sorted(scores.topk(count).indices.tolist())
        return groups, [h for u in groups for h in layer.unit_heads(u)]
    group = att.num_heads // att.num_kv_heads
    heads = [kv * group + h for kv in range(att.num_kv_heads)
             for h in scores[kv * group:(kv + 1) * group].topk(count).indices.tolist()]
    return list(range(att.num_kv_heads)), sorted(heads)


def params_removed(layer: HeadLayer, kv: list[int], heads: list[int]) -> int:
    att, d = layer.att, layer.att.head_dim
    q_in = att.q.in_features + (att.q.bias is not None)
    kv_in = att.k.in_features + (att.k.bias is not None)
    return ((att.num_heads - len(heads)) * d * (q_in + att.o.out_features)
            + 2 * (att.num_kv_heads - len(kv)) * d * kv_in)
