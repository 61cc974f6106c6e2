"""Narrow one attention to the heads it keeps (prune_heads' rewrite).

Given the coupling `head_coupling.couple` found, every head-carrying tensor is cut
alike: the rows of q/k/v (or of a fused q/k/v projection, block by block) and their
biases, o's input columns, the KV-cache buffers (new, narrower tensors under the same
names, so the runtime still ties prefill and decode through them), the size arguments
of views, expands and the fused projection's slices, and the shape metadata of every
node on the way (recomputed with the graph's fake tensors, so later passes and the
anatomy read the new head counts).
"""

from __future__ import annotations

import itertools

import torch
import torch.fx as fx

from optc.compiler.head_coupling import HeadCoupling
from optc.compiler.head_ops import G, KV, QKV, factor_size, fused_parts, norm_dim, source_factors, split_bounds
from optc.compiler.rewrite import attr_value, get_attr_nodes, set_param
from optc.compiler.torch_private import detect_fake_mode, python_dispatcher, set_tensor_attr

aten = torch.ops.aten
_SLICE_END = 2**63 - 1
_SIZED = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}


class Kept:
    """The heads one attention keeps: KV heads `kv` and query heads `heads` (each kept
    KV head keeps the same number of its query heads, so the grouping stays valid)."""

    def __init__(self, c: HeadCoupling, kv: list[int], heads: list[int]):
        if not kv or len(heads) % len(kv):
            raise ValueError(f"{len(heads)} query heads do not split over {len(kv)} KV heads")
        group = c.sizes[G]
        if any(h // group not in kv for h in heads):
            raise ValueError("a kept query head belongs to a removed KV head")
        self.kv, self.heads = sorted(kv), sorted(heads)
        self.old = dict(c.sizes)
        self.new = {KV: len(kv), G: len(heads) // len(kv)}

    def size(self, factors) -> int:
        n = 1
        for f in factors:
            n *= factor_size(f, self.new)
        return n

    def index(self, factors) -> torch.Tensor:
        """Indices kept along a dimension made of `factors` (major first)."""
        heads, kv = set(self.heads), set(self.kv)
        ranges = [range(factor_size(f, self.old)) for f in factors]
        keep = []
        for i, coords in enumerate(itertools.product(*ranges)):
            at = dict(zip(factors, coords))
            if KV in at and G in at:
                ok = at[KV] * self.old[G] + at[G] in heads
            elif KV in at:
                ok = at[KV] in kv
            elif G in at:
                ok = at[G] in heads
            else:
                ok = True
            if ok:
                keep.append(i)
        return torch.tensor(keep, dtype=torch.long)


def narrow(gm: fx.GraphModule, c: HeadCoupling, kept: Kept, getattrs: dict | None = None) -> None:
    """Cut every tensor of `c` to the `kept` heads, in place on `gm`."""
    getattrs = get_attr_nodes(gm) if getattrs is None else getattrs
    _narrow_projections(gm, getattrs, c, kept)
    new_caches = _narrow_caches(gm, c, kept)
    _narrow_sizes(c, kept)
    _refresh_meta(gm, c, new_caches)


def _rows(gm, getattrs, name: str | None, index: torch.Tensor, dim: int = 0) -> None:
    if name is not None:
        t = attr_value(gm, name).detach()
        set_param(gm, getattrs, name, t.index_select(dim, index.to(t.device)))


def _narrow_projections(gm, getattrs, c: HeadCoupling, kept: Kept) -> None:
    att, src = c.attention, source_factors(c.attention)
    if att.fused_qkv:
        offsets = sorted(fused_parts(c.attention).items())
        index = torch.cat([start + kept.index(f) for (start, _), f in offsets])
        _rows(gm, getattrs, att.q.weight, index)
        _rows(gm, getattrs, att.q.bias, index)
    else:
        for lin, key in ((att.q, "q"), (att.k, "kv"), (att.v, "kv")):
            _rows(gm, getattrs, lin.weight, kept.index(src[key]))
            _rows(gm, getattrs, lin.bias, kept.index(src[key]))
    _rows(gm, getattrs, att.o.weight, kept.index(c.o_factors), dim=1)


def _narrow_caches(gm, c: HeadCoupling, kept: Kept) -> dict:
    """One new, narrower tensor per cache, bound to every attribute that aliased it (the
    named buffer and the constant the graph writes stay one tensor); returns the new
    tensor of each cache get_attr node."""
    made = {}
    for node in c.caches:
        new = attr_value(gm, node.target).detach()
        for d, f in enumerate(c.roles[node]):
            if f is not None:
                new = new.index_select(d, kept.index(f).to(new.device))
        made[node] = new.contiguous()
    for name, node in c.cache_names.items():
        _set_tensor_attr(gm, name, made[node])
    return made


def _set_tensor_attr(gm: fx.GraphModule, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    try:
        owner = gm.get_submodule(owner_name) if owner_name else gm
    except AttributeError:  # a copy of the graph holds only the attributes it reads
        return
    if not hasattr(owner, leaf):
        return
    set_tensor_attr(owner, leaf, value)  # a buffer keeps its slot; a lifted constant is a plain attribute


def _narrow_sizes(c: HeadCoupling, kept: Kept) -> None:
    """Size arguments of views and expands, and the bounds of slices of the heads."""
    bounds, start = {}, 0  # a fused projection's q, k and v slices: old bounds -> new
    for (a, b), f in sorted(fused_parts(c.attention).items()) if c.attention.fused_qkv else ():
        bounds[(a, b)] = (start, start + kept.size(f))
        start += kept.size(f)
    for node, r in c.roles.items():
        if node.op != "call_function":
            continue
        if node.target in _SIZED:
            sizes = list(node.args[1])
            for i, f in enumerate(r):
                if f is not None and sizes[i] != -1:
                    sizes[i] = kept.size(f)
            node.args = (node.args[0], sizes, *node.args[2:])
        elif node.target is aten.slice.Tensor:
            _narrow_slice(node, c, kept, bounds)
        elif node.target in (aten.split.Tensor, aten.split_with_sizes.default):
            d, _ = split_bounds(node)
            d = norm_dim(d, len(c.roles[node.args[0]]))
            if c.roles[node.args[0]][d] == (QKV,):  # q, k and v may now differ in width
                node.target = aten.split_with_sizes.default
                node.args, node.kwargs = (node.args[0], [kept.size(part[d]) for part in r], d), {}


def _narrow_slice(node, c: HeadCoupling, kept: Kept, bounds: dict) -> None:
    src = c.roles[node.args[0]]
    args = list(node.args) + [0, 0, _SLICE_END][len(node.args) - 1:]
    d = args[1] + len(src) if args[1] < 0 else args[1]
    if src[d] is None:
        return
    if src[d] == (QKV,):  # the analysis matched these bounds to q, k or v
        size = node.args[0].meta["val"].shape[d]
        args[2], args[3] = bounds[(args[2], min(args[3], size))]
    elif args[3] != _SLICE_END:  # the whole dimension, given as its size
        args[3] = kept.size(src[d])
    node.args = tuple(args[:max(len(node.args), 4)])


def _refresh_meta(gm: fx.GraphModule, c: HeadCoupling, new_caches: dict) -> None:
    """Shape metadata recomputed on fake tensors for every node the heads pass through."""
    vals = [n.meta.get("val") for n in c.roles]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    for node, t in new_caches.items():
        node.meta["val"] = mode.from_tensor(t, static_shapes=True) if mode is not None else \
            torch.empty(t.shape, dtype=t.dtype, device="meta")
    if mode is None:
        return
    for node in gm.graph.nodes:
        if node.op != "call_function" or node not in c.roles:
            continue
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
        with mode, python_dispatcher():  # a prefill program's sequence length is symbolic
            node.meta["val"] = node.target(*args, **kwargs)
