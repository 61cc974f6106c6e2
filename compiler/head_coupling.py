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
from optc.compiler.rewrite import attr_value

aten = torch.ops.aten

KV, G, QKV = "kv", "g", "qkv"  # head factors; QKV marks a fused projection's output
HEAD_FACTORS = (KV, G)

_SAME_SHAPE = {
    aten.alias.default, aten.clone.default, aten.contiguous.default, aten.detach.default, aten.neg.default,
    aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other,
    aten.rsqrt.default, aten.sqrt.default, aten.exp.default, aten.tanh.default, aten.sigmoid.default,
    aten.silu.default, aten.gelu.default, aten.relu.default, aten.pow.Tensor_Scalar, aten.dropout.default,
}
_BROADCAST = {
    aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.add.Scalar,
    aten.sub.Scalar, aten.div.Scalar, aten.type_as.default, aten.where.self, aten.maximum.default,
    aten.minimum.default,
}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default}
_INPLACE_WRITES = {aten.index_copy_.default, aten.index_copy.default, aten.index_put_.default,
                   aten.index_put.default, aten.copy_.default}
_SDPA = aten.scaled_dot_product_attention.default
_SLICE_END = 2**63 - 1


class Uncoupled(Exception):
    """The head count reaches something whose coupling to it cannot be proven."""


@dataclass
class HeadCoupling:
    """For one attention: each tensor carrying the head count, with its factors per
    dimension (None: a dimension pruning leaves alone)."""

    attention: Attention
    sizes: dict  # factor -> its size before pruning: {"kv": KV, "g": G}
    roles: dict = field(default_factory=dict)  # fx.Node -> tuple of (factors | None) per dim
    caches: list = field(default_factory=list)  # get_attr nodes of KV-cache tensors written
    o_factors: tuple = ()  # factors of o_proj's input dimension
    o_node: fx.Node | None = None  # o_proj's linear

    def moved(self, mapping: dict) -> "HeadCoupling":
        """The same coupling on a copy of the graph (`rewrite.rebuild`'s node mapping)."""
        return HeadCoupling(self.attention, dict(self.sizes), {mapping[n]: r for n, r in self.roles.items()},
                            [mapping[n] for n in self.caches], self.o_factors, mapping[self.o_node])


def source_factors(att: Attention) -> dict:
    """Factors of the projections' output dimension, by role."""
    d = att.head_dim
    q = tuple(f for f, n in ((KV, att.num_kv_heads), (G, att.num_heads // att.num_kv_heads)) if n > 1) + (d,)
    kv = ((KV,) if att.num_kv_heads > 1 else ()) + (d,)
    return {"q": q, "kv": kv}


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
    if not c.o_factors:
        raise Uncoupled(f"the heads do not reach {att.o.path} as its input")
    if _strip(c.o_factors) != _strip(source_factors(att)["q"]):
        raise Uncoupled(f"{att.o.path} reads the heads in another order than q_proj makes them")
    return c


def _strip(factors) -> tuple:
    return tuple(f for f in factors if f in HEAD_FACTORS)


def _same_storage(gm: fx.GraphModule, found: dict) -> dict:
    """Every get_attr holding the same view of a found cache tensor (the named buffer
    `key_cache_i` and the lifted constant the graph writes alias each other); another
    view of that storage could not be narrowed alike."""
    views = {}
    for node, r in found.items():
        t = attr_value(gm, node.target)
        views[t.untyped_storage().data_ptr()] = (_view_key(t), r)
    out = dict(found)
    for node in gm.graph.nodes:
        t = attr_value(gm, node.target) if node.op == "get_attr" else None
        if not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() not in views:
            continue
        key, r = views[t.untyped_storage().data_ptr()]
        if _view_key(t) != key:
            raise Uncoupled(f"{node.target} is another view of a KV-cache tensor")
        out[node] = r
    return out


def _view_key(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.stride(), t.storage_offset(), t.dtype


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
            if _strip(src[key]):
                roles[lin.node] = _last(lin.node, src[key])
    for node in gm.graph.nodes:
        if node in roles or node.op not in ("call_function", "output"):
            continue
        if not any(a in roles for a in _flat((node.args, node.kwargs))):
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
        out = _rule(node, roles, c)
        if out is not None:
            roles[node] = out
    return found


def _flat(obj) -> list:
    out = []
    fx.node.map_aggregate(obj, lambda a: out.append(a) if isinstance(a, fx.Node) else None)
    return out


def _shape(node) -> tuple:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        raise Uncoupled(f"{getattr(node, 'name', node)} has no tensor shape metadata")
    return tuple(val.shape)


def _last(node, factors) -> tuple:
    return (None,) * (len(_shape(node)) - 1) + (factors,)


def _int(size):
    """The size as an int, or None when it is symbolic."""
    if isinstance(size, int):
        return size
    try:
        return size.node.maybe_as_int()
    except AttributeError:
        return None


def _dim(d, rank: int) -> int:
    return d + rank if d < 0 else d


def factor_size(f, sizes: dict) -> int:
    return sizes[f] if f in HEAD_FACTORS else f


def _o_input(node, roles) -> tuple:
    r = roles.get(node.args[0])
    if r is None or any(x is not None for x in r[:-1]) or r[-1] is None or QKV in r[-1]:
        raise Uncoupled(f"{node.name} reads the heads other than as its input's last dimension")
    if any(a in roles for a in _flat((node.args[1:], node.kwargs))):
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
    rank = len(_shape(target))
    if len(r) != rank or any(f is not None and _shape(src)[d] != _shape(target)[d] for d, f in enumerate(r)):
        raise Uncoupled(f"{node.name} writes a tensor of another rank or head count than its buffer")
    for d in along if isinstance(along, list) else [along]:
        if r[_dim(d, rank)] is not None:
            raise Uncoupled(f"{node.name} indexes the head dimension")
    if target in roles and roles[target] != r:
        raise Uncoupled(f"{node.name} writes heads laid out differently from its buffer's")
    return target, r


def _rule(node, roles, c: HeadCoupling):
    """The factors of `node`'s output from its inputs', or Uncoupled."""
    t = node.target
    if t is aten._assert_tensor_metadata.default:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("size")
        stride = node.args[2] if len(node.args) > 2 else node.kwargs.get("stride")
        if size is not None or stride is not None:
            raise Uncoupled(f"{node.name} asserts the shape of a tensor of the heads")
        return None
    if t is aten.sym_size.int:
        x, d = node.args[0], node.args[1]
        if roles[x][_dim(d, len(roles[x]))] is not None:
            raise Uncoupled(f"{node.name} reads the head count as a symbolic size")
        return None
    x = node.args[0]
    if t in _SAME_SHAPE:
        return roles[x]
    if t in _BROADCAST:
        return _broadcast(node, roles)
    if t in _VIEWS:
        return _view(node, roles[x], c)
    if t is aten.transpose.int:
        r = list(roles[x])
        a, b = _dim(node.args[1], len(r)), _dim(node.args[2], len(r))
        r[a], r[b] = r[b], r[a]
        return tuple(r)
    if t is aten.permute.default:
        return tuple(roles[x][_dim(d, len(roles[x]))] for d in node.args[1])
    if t is aten.unsqueeze.default:
        r = list(roles[x])
        r.insert(_dim(node.args[1], len(r) + 1), None)
        return tuple(r)
    if t in (aten.squeeze.dim, aten.select.int):
        d = _dim(node.args[1], len(roles[x]))
        if roles[x][d] is not None:
            raise Uncoupled(f"{node.name} removes the head dimension")
        return roles[x][:d] + roles[x][d + 1:]
    if t is aten.expand.default:
        return _expand(node, roles[x], c)
    if t is aten.slice.Tensor:
        return _slice(node, roles[x], c)
    if t is aten.cat.default:
        return _cat(node, roles)
    if t in _REDUCTIONS:
        return _reduce(node, roles[x])
    if t is _SDPA:
        return _sdpa(node, roles)
    raise Uncoupled(f"{node.name} ({t}) reads a tensor of the heads in a way prune_heads does not follow")


def _broadcast(node, roles) -> tuple:
    rank = len(_shape(node))
    out = [None] * rank
    for arg in _flat((node.args, node.kwargs)):
        val = arg.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        shape, r = tuple(val.shape), roles.get(arg)
        for i in range(1, len(shape) + 1):
            f = r[-i] if r is not None else None
            if f is not None:
                if out[-i] is not None and out[-i] != f:
                    raise Uncoupled(f"{node.name} combines heads laid out differently")
                out[-i] = f
    for arg in _flat((node.args, node.kwargs)):  # others broadcast along the head dimensions
        val = arg.meta.get("val")
        if isinstance(val, torch.Tensor):
            shape, r = tuple(val.shape), roles.get(arg)
            for i in range(1, len(shape) + 1):
                if out[-i] is not None and (r is None or r[-i] is None) and _int(shape[-i]) != 1:
                    raise Uncoupled(f"{node.name} combines the heads with a tensor of their width "
                                    f"({arg.name}) that prune_heads would not narrow")
    return tuple(out)


def _stream(shape, r) -> list:
    """A tensor's dimensions as one list of factors, major first (sizes 1 left out)."""
    out = []
    for size, f in zip(shape, r):
        if f is not None:
            out.extend(f)
        elif _int(size) is None:
            out.append(("sym", str(size)))
        elif _int(size) != 1:
            out.append(_int(size))
    return out


def _view(node, r, c: HeadCoupling) -> tuple:
    """Factors regrouped into the view's dimensions, major first; a head factor is never
    split (views that would split one, or move it past a symbolic size, are refused)."""
    stream, pos, out = _stream(_shape(node.args[0]), r), 0, []
    for size in _shape(node):
        n = _int(size)
        if n is None:
            if pos < len(stream) and stream[pos] == ("sym", str(size)):
                pos += 1
                out.append(None)
                continue
            raise Uncoupled(f"{node.name} regroups a symbolic size with the heads")
        taken = []
        while n > 1:
            if pos >= len(stream) or isinstance(stream[pos], tuple):
                raise Uncoupled(f"{node.name} regroups the heads in a way prune_heads does not follow")
            f = stream[pos]
            v = factor_size(f, c.sizes)
            if n % v == 0:
                taken.append(f)
                n //= v
                pos += 1
            elif isinstance(f, int) and v % n == 0:
                taken.append(n)
                stream[pos] = v // n
                n = 1
            else:
                raise Uncoupled(f"{node.name} splits a head factor")
        out.append(tuple(taken) if _strip(taken) else None)
    _literal_sizes(node, out)
    if pos != len(stream):
        raise Uncoupled(f"{node.name} regroups the heads in a way prune_heads does not follow")
    return tuple(out)


def _expand(node, r, c: HeadCoupling) -> tuple:
    shape, sizes = _shape(node.args[0]), node.args[1]
    lead = len(sizes) - len(shape)
    out = [None] * lead
    for i, (old, f) in enumerate(zip(shape, r)):
        new = _shape(node)[lead + i]
        if f is None and _int(old) == 1 and _int(new) == c.sizes[G] and c.sizes[G] > 1:
            f = (G,)  # repeat_kv: one copy of each KV head per query head of its group
        out.append(f)
    _literal_sizes(node, out)
    return tuple(out)


def _literal_sizes(node, r) -> None:
    """The size argument of a view or expand gives each head dimension as an int (or
    -1), which narrowing rewrites; a size computed in the graph cannot be."""
    sizes = node.args[1]
    if len(sizes) != len(r):
        raise Uncoupled(f"{node.name} has a size argument of another rank than its output")
    if any(f is not None and not isinstance(s, int) for s, f in zip(sizes, r)):
        raise Uncoupled(f"{node.name} gives a head count as a size computed in the graph")


def _slice(node, r, c: HeadCoupling) -> tuple:
    d = _dim(node.args[1] if len(node.args) > 1 else 0, len(r))
    f = r[d]
    if f is None:
        return r
    start = node.args[2] if len(node.args) > 2 else 0
    end = node.args[3] if len(node.args) > 3 else _SLICE_END
    step = node.args[4] if len(node.args) > 4 else 1
    size = _int(_shape(node.args[0])[d])
    if step != 1 or not isinstance(start, int) or not isinstance(end, int):
        raise Uncoupled(f"{node.name} slices the heads with a step or symbolic bounds")
    end = min(end, size)
    if f == (QKV,):
        part = fused_parts(c).get((start, end))
        if part is None:
            raise Uncoupled(f"{node.name} cuts a fused q/k/v output other than into q, k and v")
        return r[:d] + (part,) + r[d + 1:]
    if (start, end) != (0, size):
        raise Uncoupled(f"{node.name} keeps part of the heads")
    return r


def fused_parts(c: HeadCoupling) -> dict:
    """{(start, end): factors} of the q, k and v rows of a fused projection's output."""
    att = c.attention
    src = source_factors(att)
    q, kv = att.num_heads * att.head_dim, att.num_kv_heads * att.head_dim
    return {(0, q): src["q"], (q, q + kv): src["kv"], (q + kv, q + 2 * kv): src["kv"]}


def _cat(node, roles) -> tuple:
    parts = node.args[0]
    rank = len(_shape(node))
    d = _dim(node.args[1] if len(node.args) > 1 else 0, rank)
    rs = {roles.get(p) for p in parts}
    if len(rs) != 1 or None in rs:
        raise Uncoupled(f"{node.name} joins tensors whose heads are laid out differently")
    r = rs.pop()
    if r[d] is not None:
        raise Uncoupled(f"{node.name} joins along the head dimension")
    return r


def _reduce(node, r) -> tuple:
    dims = node.args[1] if len(node.args) > 1 else None
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if dims is None:
        raise Uncoupled(f"{node.name} reduces over all dimensions, heads included")
    dims = {_dim(d, len(r)) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
    if any(r[d] is not None for d in dims):
        raise Uncoupled(f"{node.name} reduces over the heads")
    return tuple(None if d in dims else f for d, f in enumerate(r) if keep or d not in dims)


def _sdpa(node, roles) -> tuple:
    q, k, v = node.args[:3]
    rq, rk, rv = (roles.get(a) for a in (q, k, v))
    if rq is None or rk is None or rv is None:
        raise Uncoupled(f"{node.name}: only some of query, key and value carry the pruned heads")
    enable_gqa = node.kwargs.get("enable_gqa", node.args[7] if len(node.args) > 7 else False)
    for d in range(len(rq) - 2):
        same = rq[d] == rk[d] == rv[d] or (enable_gqa and rk[d] == rv[d] and _strip(rq[d])[:1] == _strip(rk[d] or ()))
        if not same:
            raise Uncoupled(f"{node.name}: query heads do not line up with the key and value heads")
    if rk[-2] is not None or rq[-1] is not None or rk[-1] is not None or rv[-1] is not None:
        raise Uncoupled(f"{node.name}: the heads are in the token or head-size dimension")
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if isinstance(mask, fx.Node):
        if mask in roles:
            raise Uncoupled(f"{node.name}: the mask depends on the heads")
        shape = _shape(mask)
        for i in range(2, len(rq) + 1):  # aligned right against [B, heads..., Lq, Lk]
            if i <= len(shape) and rq[-i] is not None and _int(shape[-i]) != 1:
                raise Uncoupled(f"{node.name}: the mask differs per head")
    return rq[:-1] + (None,)
