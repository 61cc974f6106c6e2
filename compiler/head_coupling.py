"""Where an attention's head count lives in a captured graph (read by prune_heads).

Removing heads narrows more than the projections: every tensor between q/k/v and o
carries the head count in some dimension (views to [B, S, H, D], transposes, repeat_kv's
expand to [B, KV, G, S, D] and reshape to [B, H, S, D], the KV-cache buffers
[B, KV, L, D] and their writes, SDPA, the reshape back to [B, S, H * D]). This module
follows the head count forward from the projections, op by op, and says for each
tensor which of its dimensions carry it and how: a dimension is a product of factors,
major first, where "kv" (the KV heads) and "g" (query heads per KV head) are the head
factors that pruning changes, and ints are sizes that stay (head_dim, or part of it).
Query rows are laid out h * D + j with h = kv * G + g (repeat_kv's order), so the q
projection's output dimension is ("kv", "g", D) and k/v's is ("kv", D).

Every op on the way must be one whose effect on those dimensions is known; anything
else (a reduction over heads, a parameter of the heads' width other than the
projections', a head count given as a symbolic size) raises `Uncoupled` with the node,
so a pass refuses instead of narrowing one side only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from optc.compiler.anatomy_types import Attention
from optc.compiler.head_ops import (G, KV, QKV, Uncoupled, flat_nodes, head_factors_of, norm_dim, out_factors,
                                    shape_of, source_factors)
from optc.compiler.rewrite import attr_value, tensor_attributes, view_key

aten = torch.ops.aten
_INPLACE_WRITES = {aten.index_copy_.default, aten.index_copy.default, aten.index_put_.default,
                   aten.index_put.default, aten.copy_.default}


@dataclass
class HeadCoupling:
    """For one attention: each tensor carrying the head count, with its factors per
    dimension (None: a dimension pruning leaves alone)."""

    attention: Attention
    sizes: dict  # factor -> its size before pruning: {"kv": KV, "g": G}
    roles: dict = field(default_factory=dict)  # fx.Node -> tuple of (factors | None) per dim
    caches: list = field(default_factory=list)  # get_attr nodes of KV-cache tensors written
    cache_names: dict = field(default_factory=dict)  # every attribute aliasing one -> its get_attr
    o_factors: tuple = ()  # factors of o_proj's input dimension
    o_node: fx.Node | None = None  # o_proj's linear

    def moved(self, mapping: dict) -> "HeadCoupling":
        """The same coupling on a copy of the graph (`rewrite.rebuild`'s node mapping)."""
        return HeadCoupling(self.attention, dict(self.sizes), {mapping[n]: r for n, r in self.roles.items()},
                            [mapping[n] for n in self.caches], {k: mapping[n] for k, n in self.cache_names.items()},
                            self.o_factors, mapping[self.o_node])


def couple(gm: fx.GraphModule, att: Attention) -> HeadCoupling:
    """The head-carrying tensors of `att`, or Uncoupled with the reason."""
    if att.num_heads % att.num_kv_heads:
        raise Uncoupled(f"{att.num_heads} heads do not split into {att.num_kv_heads} KV groups")
    c = HeadCoupling(att, {KV: att.num_kv_heads, G: att.num_heads // att.num_kv_heads})
    seeds: dict = {}
    # A cache is found at its write; walking again with it seeded follows the readers
    # that come before the write in the graph too.
    for _ in range(3):
        try:
            found = _walk(gm, c, seeds)
        except Uncoupled as exc:
            raise Uncoupled(f"{att.path}: {exc}") from None
        if not found:
            break
        seeds.update(_same_storage(gm, found))
    else:
        raise Uncoupled("the KV-cache tensors could not be settled")
    c.caches, c.o_node = list(seeds), att.o.node
    c.cache_names = cache_aliases(gm, c.caches)
    if not c.o_factors:
        raise Uncoupled(f"the heads do not reach {att.o.path} as its input")
    if head_factors_of(c.o_factors) != head_factors_of(source_factors(att)["q"]):
        raise Uncoupled(f"{att.o.path} reads the heads in another order than q_proj makes them")
    return c


def _same_storage(gm: fx.GraphModule, found: dict) -> dict:
    """Every get_attr holding the same view of a found cache tensor (the named buffer
    `key_cache_i` and the lifted constant the graph writes alias each other)."""
    keys = {view_key(attr_value(gm, node.target)): r for node, r in found.items()}
    keys.pop(None, None)  # a cache without memory (zero-size) shares it with nothing
    out = dict(found)
    for node in gm.graph.nodes:
        t = attr_value(gm, node.target) if node.op == "get_attr" else None
        if isinstance(t, torch.Tensor) and view_key(t) in keys:
            out[node] = keys[view_key(t)]
    return out


def cache_aliases(gm: fx.GraphModule, caches: list) -> dict:
    """{attribute name: the cache get_attr it aliases} for every buffer or constant of
    `gm` holding the same view as a cache the graph writes, read by the graph or not
    (skip_layers drops unread get_attr nodes; the runtime ties caches by buffer name).
    Another view of a cache's storage could not be narrowed alike: Uncoupled."""
    by_storage = {}
    for node in caches:
        t = attr_value(gm, node.target)
        by_storage.setdefault(t.untyped_storage().data_ptr(), (view_key(t), node))
    out = {}
    for name, t in tensor_attributes(gm).items():
        hit = by_storage.get(t.untyped_storage().data_ptr()) if t.untyped_storage().data_ptr() else None
        if hit is None:
            continue
        if view_key(t) != hit[0]:
            raise Uncoupled(f"{name} is another view of the KV-cache tensor {hit[1].target}")
        out[name] = hit[1]
    return out


def _walk(gm: fx.GraphModule, c: HeadCoupling, seeds: dict) -> dict:
    """One pass over the graph in order; returns caches found that were not seeded."""
    att = c.attention
    roles = dict(seeds)
    c.roles, c.o_factors, found = roles, (), {}
    src = source_factors(att)
    if att.fused_qkv:
        roles[att.q.node] = _last(att.q.node, (QKV,))
    else:
        for lin, key in ((att.q, "q"), (att.k, "kv"), (att.v, "kv")):
            if head_factors_of(src[key]):
                roles[lin.node] = _last(lin.node, src[key])
    for node in gm.graph.nodes:
        if node in roles or node.op not in ("call_function", "output"):
            continue
        if not any(a in roles for a in flat_nodes((node.args, node.kwargs))):
            continue
        if node.op == "output":
            raise Uncoupled("the program returns a tensor of the heads' width")
        if node is att.o.node:
            c.o_factors = _o_input(node, roles)
            continue
        if node.target in _INPLACE_WRITES:
            target, r = _write(node, roles)
            if target not in roles:
                found[target] = r
            roles[node] = r
            continue
        out = out_factors(node, roles, c)
        if out is not None:
            roles[node] = out
    return found


def _last(node, factors) -> tuple:
    return (None,) * (len(shape_of(node)) - 1) + (factors,)


def _o_input(node, roles) -> tuple:
    r = roles.get(node.args[0])
    if r is None or any(x is not None for x in r[:-1]) or r[-1] is None or QKV in r[-1]:
        raise Uncoupled(f"{node.name} reads the heads other than as its input's last dimension")
    if any(a in roles for a in flat_nodes((node.args[1:], node.kwargs))):
        raise Uncoupled(f"{node.name}'s weight depends on the heads")
    return r[-1]


def _write(node, roles):
    """(the written tensor, its factors) for an in-place write of head-carrying values
    into a tensor (a KV cache): along a dimension pruning leaves alone."""
    target = node.args[0]
    if node.target in (aten.index_copy_.default, aten.index_copy.default):
        src, along = node.args[3], node.args[1]
    elif node.target in (aten.index_put_.default, aten.index_put.default):
        src, along = node.args[2], [i for i, ix in enumerate(node.args[1]) if ix is not None]
    else:
        src, along = node.args[1], []
    if src not in roles or not (isinstance(target, fx.Node) and (target.op == "get_attr" or target in roles)):
        raise Uncoupled(f"{node.name} writes the heads into something other than a buffer")
    r = roles[src]
    rank = len(shape_of(target))
    if len(r) != rank or any(f is not None and shape_of(src)[d] != shape_of(target)[d] for d, f in enumerate(r)):
        raise Uncoupled(f"{node.name} writes a tensor of another rank or head count than its buffer")
    for d in along if isinstance(along, list) else [along]:
        if r[norm_dim(d, rank)] is not None:
            raise Uncoupled(f"{node.name} indexes the head dimension")
    if target in roles and roles[target] != r:
        raise Uncoupled(f"{node.name} writes heads laid out differently from its buffer's")
    return target, r
