"""How each aten op carries an attention's head factors from its inputs to its output:
the rules compiler/head_coupling.py follows the head count with.

A tensor's head-carrying dimensions are tuples of factors, major first: "kv" (KV heads)
and "g" (query heads per KV head), which pruning changes, and ints, which stay. An op
not listed here, or used in a way these rules cannot follow, raises `Uncoupled`.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from optc.compiler.anatomy_types import Attention

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
_SDPA = aten.scaled_dot_product_attention.default
_SLICE_END = 2**63 - 1
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default}


class Uncoupled(Exception):
    """The head count reaches something whose coupling to it cannot be proven."""


def source_factors(att: Attention) -> dict:
    """Factors of the projections' output dimension, by role."""
    d = att.head_dim
    q = tuple(f for f, n in ((KV, att.num_kv_heads), (G, att.num_heads // att.num_kv_heads)) if n > 1) + (d,)
    kv = ((KV,) if att.num_kv_heads > 1 else ()) + (d,)
    return {"q": q, "kv": kv}


def fused_parts(att: Attention) -> dict:
    """{(start, end): factors} of the q, k and v rows of a fused projection's output."""
    src = source_factors(att)
    q, kv = att.num_heads * att.head_dim, att.num_kv_heads * att.head_dim
    return {(0, q): src["q"], (q, q + kv): src["kv"], (q + kv, q + 2 * kv): src["kv"]}


def head_factors_of(factors) -> tuple:
    return tuple(f for f in factors if f in HEAD_FACTORS)


def flat_nodes(obj) -> list:
    out = []
    fx.node.map_aggregate(obj, lambda a: out.append(a) if isinstance(a, fx.Node) else None)
    return out


def shape_of(node) -> tuple:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        raise Uncoupled(f"{getattr(node, 'name', node)} has no tensor shape metadata")
    return tuple(val.shape)


def int_size(size):
    """The size as an int, or None when it is symbolic."""
    if isinstance(size, int):
        return size
    try:
        return size.node.maybe_as_int()
    except AttributeError:
        return None


def norm_dim(d, rank: int) -> int:
    return d + rank if d < 0 else d


def factor_size(f, sizes: dict) -> int:
    return sizes[f] if f in HEAD_FACTORS else f


def out_factors(node, roles, c):
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
        if roles[x][norm_dim(d, len(roles[x]))] is not None:
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
        a, b = norm_dim(node.args[1], len(r)), norm_dim(node.args[2], len(r))
        r[a], r[b] = r[b], r[a]
        return tuple(r)
    if t is aten.permute.default:
        return tuple(roles[x][norm_dim(d, len(roles[x]))] for d in node.args[1])
    if t is aten.unsqueeze.default:
        r = list(roles[x])
        r.insert(norm_dim(node.args[1], len(r) + 1), None)
        return tuple(r)
    if t in (aten.squeeze.dim, aten.select.int):
        d = norm_dim(node.args[1], len(roles[x]))
        if roles[x][d] is not None:
            raise Uncoupled(f"{node.name} removes the head dimension")
        return roles[x][:d] + roles[x][d + 1:]
    if t is aten.expand.default:
        return _expand(node, roles[x], c)
    if t is aten.slice.Tensor:
        return _slice(node, roles[x], c)
    if t in _SPLITS:
        return _split(node, roles[x], c)
    if t is operator.getitem and isinstance(roles[x], list):  # one part of a split
        return roles[x][node.args[1]]
    if t is aten.cat.default:
        return _cat(node, roles)
    if t in _REDUCTIONS:
        return _reduce(node, roles[x])
    if t is _SDPA:
        return _sdpa(node, roles)
    raise Uncoupled(f"{node.name} ({t}) reads a tensor of the heads in a way prune_heads does not follow")


def _broadcast(node, roles) -> tuple:
    rank = len(shape_of(node))
    out = [None] * rank
    for arg in flat_nodes((node.args, node.kwargs)):
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
    for arg in flat_nodes((node.args, node.kwargs)):  # others broadcast along the head dimensions
        val = arg.meta.get("val")
        if isinstance(val, torch.Tensor):
            shape, r = tuple(val.shape), roles.get(arg)
            for i in range(1, len(shape) + 1):
                if out[-i] is not None and (r is None or r[-i] is None) and int_size(shape[-i]) != 1:
                    raise Uncoupled(f"{node.name} combines the heads with a tensor of their width "
                                    f"({arg.name}) that prune_heads would not narrow")
    return tuple(out)


def _stream(shape, r) -> list:
    """A tensor's dimensions as one list of factors, major first (sizes 1 left out)."""
    out = []
    for size, f in zip(shape, r):
        if f is not None:
            out.extend(f)
        elif int_size(size) is None:
            out.append(("sym", str(size)))
        elif int_size(size) != 1:
            out.append(int_size(size))
    return out


def _view(node, r, c) -> tuple:
    """Factors regrouped into the view's dimensions, major first; a head factor is never
    split (views that would split one, or move it past a symbolic size, are refused)."""
    stream, pos, out = _stream(shape_of(node.args[0]), r), 0, []
    for size in shape_of(node):
        n = int_size(size)
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
            if f == QKV:
                raise Uncoupled(f"{node.name} reshapes a fused q/k/v output whole (q, k and v interleaved per "
                                "head, as in GPT-NeoX); prune_heads follows fused projections split into q, k, v")
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
        out.append(tuple(taken) if head_factors_of(taken) else None)
    _literal_sizes(node, out)
    if pos != len(stream):
        raise Uncoupled(f"{node.name} regroups the heads in a way prune_heads does not follow")
    return tuple(out)


def _expand(node, r, c) -> tuple:
    shape, sizes = shape_of(node.args[0]), node.args[1]
    lead = len(sizes) - len(shape)
    out = [None] * lead
    for i, (old, f) in enumerate(zip(shape, r)):
        new = shape_of(node)[lead + i]
        if f is None and int_size(old) == 1 and int_size(new) == c.sizes[G] and c.sizes[G] > 1:
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


def _slice(node, r, c) -> tuple:
    d = norm_dim(node.args[1] if len(node.args) > 1 else 0, len(r))
    f = r[d]
    if f is None:
        return r
    start = node.args[2] if len(node.args) > 2 else 0
    end = node.args[3] if len(node.args) > 3 else _SLICE_END
    step = node.args[4] if len(node.args) > 4 else 1
    size = int_size(shape_of(node.args[0])[d])
    if step != 1 or not isinstance(start, int) or not isinstance(end, int):
        raise Uncoupled(f"{node.name} slices the heads with a step or symbolic bounds")
    end = min(end, size)
    if f == (QKV,):
        part = fused_parts(c.attention).get((start, end))
        if part is None:
            raise Uncoupled(f"{node.name} cuts a fused q/k/v output other than into q, k and v")
        return r[:d] + (part,) + r[d + 1:]
    if (start, end) != (0, size):
        raise Uncoupled(f"{node.name} keeps part of the heads")
    return r


def split_bounds(node) -> tuple[int, list[tuple]]:
    """(dim, [(start, end)] of each part) of a split node (GPT-2 splits its fused c_attn)."""
    size = node.args[1]
    d = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    total = int_size(shape_of(node.args[0])[d])
    if total is None or not all(isinstance(n, int) for n in (size if isinstance(size, (list, tuple)) else [size])):
        raise Uncoupled(f"{node.name} splits at symbolic bounds")
    sizes = [size] * -(-total // size) if isinstance(size, int) else list(size)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return d, [(a, min(a + n, total)) for a, n in zip(starts, sizes)]


def _split(node, r, c) -> list:
    """A list of factors, one per part: a fused q/k/v output split into q, k and v."""
    d, bounds = split_bounds(node)
    d = norm_dim(d, len(r))
    if r[d] is None:
        return [r] * len(bounds)
    if r[d] != (QKV,):
        raise Uncoupled(f"{node.name} splits the heads")
    parts = [fused_parts(c.attention).get(b) for b in bounds]
    if None in parts:
        raise Uncoupled(f"{node.name} cuts a fused q/k/v output other than into q, k and v")
    return [r[:d] + (part,) + r[d + 1:] for part in parts]


def _cat(node, roles) -> tuple:
    parts = node.args[0]
    rank = len(shape_of(node))
    d = norm_dim(node.args[1] if len(node.args) > 1 else 0, rank)
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
    dims = {norm_dim(d, len(r)) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
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
        same = rq[d] == rk[d] == rv[d] or (enable_gqa and rk[d] == rv[d] and head_factors_of(rq[d])[:1] == head_factors_of(rk[d] or ()))
        if not same:
            raise Uncoupled(f"{node.name}: query heads do not line up with the key and value heads")
    if rk[-2] is not None or rq[-1] is not None or rk[-1] is not None or rv[-1] is not None:
        raise Uncoupled(f"{node.name}: the heads are in the token or head-size dimension")
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if isinstance(mask, fx.Node):
        if mask in roles:
            raise Uncoupled(f"{node.name}: the mask depends on the heads")
        shape = shape_of(mask)
        for i in range(2, len(rq) + 1):  # aligned right against [B, heads..., Lq, Lk]
            if i <= len(shape) and rq[-i] is not None and int_size(shape[-i]) != 1:
                raise Uncoupled(f"{node.name}: the mask differs per head")
    return rq[:-1] + (None,)
