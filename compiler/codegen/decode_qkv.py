"""A decode step's RMSNorm, q/k/v projections and rotary run as optc::decode_qkv.

Inductor lowers this part of a Llama-style layer's decode step as several short kernels
(kernels/decode_qkv.py says which and why that costs); optc::decode_qkv (codegen/qkv_ops.py)
computes it in one. Targets ask for it with `decode_qkv`.

Rewritten: the HF Llama form, as torch.export captures it for one new token,

    x32 = x.float(); h = g * (x32 * rsqrt(mean(x32^2, -1, keepdim) + eps)).to(dtype)
    q = linear(h, Wq).view(1, 1, Hq, D).transpose(1, 2); k, v likewise (Hkv heads)
    q' = q * C + cat(-q[..., D/2:], q[..., :D/2]) * S; k' likewise; v unrotated

where the three linears have no bias and read the same norm output, and k and v have
one shape. The rotated q, rotated k and v are replaced by views of the op's output;
what computed them is dropped where nothing else reads it. With `write_cache` (the
target's `decode_qkv_cache`), where k and v are read only by the in-place writes of
one new position into two caches,

    k_cache.index_copy_(2, position, k'); v_cache.index_copy_(2, position, v)

optc::decode_qkv_cached makes those writes itself and the caches are read in their
place. Anything else (biases, a norm of another form, per-head norms before the rotary,
several rows) keeps Inductor's lowering. Like decode_sdpa, the rewrite works on a copy
used for lowering; the lowering check compares it with the program itself.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.fx as fx

from optc.compiler.rewrite import eliminate_dead_code, node_dtype, node_shape

aten = torch.ops.aten

_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default}


@dataclass
class _Match:
    x: fx.Node
    norm_weight: fx.Node
    eps: float
    weights: tuple  # (wq, wk, wv) nodes
    cos: fx.Node
    sin: fx.Node
    head_dim: int
    outputs: tuple  # the nodes replaced: rotated q, rotated k, v (each [1, H, 1, D])
    heads: tuple  # (Hq, Hkv)
    cache_writes: tuple | None = None  # the index_copy_ of k and of v, where they are all that reads them


def _is(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _uncast(node):
    while _is(node, *_CASTS):
        node = node.args[0]
    return node


def _rms_norm(h: fx.Node):
    """(x, weight, eps) if `h` is HF's RMSNorm of x, else None."""
    if not _is(h, aten.mul.Tensor) or len(h.args) != 2:
        return None
    for g, normed in (h.args, h.args[::-1]):
        normed = _uncast(normed)
        shape = node_shape(g)
        if not (isinstance(g, fx.Node) and shape is not None and len(shape) == 1 and _is(normed, aten.mul.Tensor)):
            continue
        x32, rsqrt = normed.args
        if not _is(rsqrt, aten.rsqrt.default) or not _is(rsqrt.args[0], aten.add.Tensor):
            continue
        mean, eps = rsqrt.args[0].args
        if not (_is(mean, aten.mean.dim) and isinstance(eps, float) and list(mean.args[1]) == [-1]
                and len(mean.args) > 2 and mean.args[2] is True):
            continue
        square = mean.args[0]
        if _is(square, aten.pow.Tensor_Scalar) and square.args[0] is x32 and square.args[1] == 2:
            x = _uncast(x32)
            if shape[0] == (node_shape(x) or (None,))[-1]:
                return x, g, eps
    return None


def _heads(lin: fx.Node):
    """(transpose node, H, D) if `lin` is viewed as [1, 1, H, D] and transposed to [1, H, 1, D]."""
    users = list(lin.users)
    if len(users) != 1 or not _is(users[0], aten.view.default):
        return None
    view = users[0]
    shape = node_shape(view)
    tusers = list(view.users)
    if shape is None or len(shape) != 4 or shape[:2] != (1, 1) or len(tusers) != 1:
        return None
    t = tusers[0]
    if not (_is(t, aten.transpose.int) and tuple(t.args[1:]) == (1, 2)):
        return None
    return t, shape[2], shape[3]


def _rotary(t: fx.Node, D: int):
    """(rotated node, C, S) if `t`'s users compute t * C + rotate_half(t) * S, else None."""
    half = D // 2
    for m1 in t.users:
        if not (_is(m1, aten.mul.Tensor) and m1.args[0] is t):
            continue
        for rotated in m1.users:
            if not (_is(rotated, aten.add.Tensor) and rotated.args[0] is m1 and _is(rotated.args[1], aten.mul.Tensor)):
                continue
            cat, S = rotated.args[1].args
            if not (_is(cat, aten.cat.default) and cat.args[1:] in ((-1,), (3,)) and len(cat.args[0]) == 2):
                continue
            neg, first = cat.args[0]
            if not (_is(neg, aten.neg.default) and _is(first, aten.slice.Tensor)
                    and _is(neg.args[0], aten.slice.Tensor)):
                continue
            second = neg.args[0]
            if (first.args[0] is t and second.args[0] is t and tuple(first.args[1:4]) in ((3, 0, half), (-1, 0, half))
                    and tuple(second.args[1:3]) in ((3, half), (-1, half))
                    and (len(second.args) < 4 or second.args[3] >= D)):
                return rotated, m1.args[1], S
    return None


class _Projection(NamedTuple):
    linear: fx.Node
    heads_view: fx.Node  # the [1, H, 1, D] transpose of its output
    heads: int
    head_dim: int
    rotary: tuple | None  # (rotated node, C, S), or None where it is not rotated


def _match(h: fx.Node) -> _Match | None:
    norm = _rms_norm(h)
    if norm is None:
        return None
    linears = [u for u in h.users if _is(u, aten.linear.default)]
    if len(linears) != 3 or len(h.users) != 3:
        return None
    found = []
    for lin in linears:
        if len(lin.args) > 2 and lin.args[2] is not None or lin.kwargs.get("bias") is not None:
            return None
        viewed = _heads(lin)
        if viewed is None:
            return None
        t, H, D = viewed
        found.append(_Projection(lin, t, H, D, _rotary(t, D)))
    rotated = [p for p in found if p.rotary is not None]
    plain = [p for p in found if p.rotary is None]
    D = found[0].head_dim
    if len(rotated) != 2 or len(plain) != 1 or any(p.head_dim != D for p in found) or D % 2:
        return None
    (_, C, S), (_, C2, S2) = rotated[0].rotary, rotated[1].rotary
    if C is not C2 or S is not S2 or (node_shape(C) and node_shape(C)[-1] != D):
        return None
    v = plain[0]
    x, g, eps = norm
    dtype = node_dtype(x)

    writes = [_cache_writes(p.rotary[0], v.heads_view, D, dtype) for p in rotated]
    # k is the rotated projection of v's shape; the other is q. Where both have it, k is
    # the one written to a cache with v (either, where neither is: the op computes the same).
    (q, _), (k, k_writes) = sorted(zip(rotated, writes), key=lambda pw: (pw[0].heads == v.heads, pw[1] is not None))
    if k.heads != v.heads:
        return None
    return _Match(x, g, eps, (q.linear.args[1], k.linear.args[1], v.linear.args[1]), C, S, D,
                  (q.rotary[0], k.rotary[0], v.heads_view), (q.heads, k.heads), k_writes)


def _cache_writes(k: fx.Node, v: fx.Node, D: int, dtype) -> tuple | None:
    """(write of k, write of v) if k and v are each read only by an index_copy_ of one
    position along dim 2 into its own cache of k's heads, [1, H, L, D] with unit stride over
    D and the op's `dtype`, the two of one layout and the same position; else None."""
    writes = []
    k_val = k.meta.get("val")
    for out in (k, v):
        users = list(out.users)
        if len(users) != 1 or not _is(users[0], aten.index_copy_.default) or len(users[0].args) != 4:
            return None
        write = users[0]
        cache, dim, position, source = write.args
        val = cache.meta.get("val") if isinstance(cache, fx.Node) else None
        if source is not out or dim != 2 or val is None or k_val is None or val.dim() != 4 \
                or tuple(val.shape[:2]) != (1, k_val.shape[1]) or val.shape[3] != D or val.stride(3) != 1 \
                or val.dtype != dtype or (node_shape(position) or (None,))[0] != 1:
            return None
        writes.append(write)
    kw, vw = writes
    k_cache, v_cache = kw.args[0].meta["val"], vw.args[0].meta["val"]
    if kw.args[2] is not vw.args[2] or kw.args[0] is vw.args[0] or k_cache.shape != v_cache.shape \
            or k_cache.stride() != v_cache.stride():
        return None
    return kw, vw


def decode_qkv_matches(graph: fx.Graph) -> list[_Match]:
    """The norm + q/k/v + rotary groups of `graph` that optc::decode_qkv computes."""
    found = []
    for node in graph.nodes:
        if _is(node, aten.mul.Tensor) and (m := _match(node)) is not None:
            x_shape = node_shape(m.x)
            if x_shape is not None and len(x_shape) == 3 and x_shape[:2] == (1, 1):
                found.append(m)
    return found


def use_decode_qkv(gm: fx.GraphModule, *, write_cache: bool = False) -> tuple[fx.GraphModule, int]:
    """A copy of `gm` (sharing its parameters) whose such groups call optc::decode_qkv
    (optc::decode_qkv_cached where `write_cache` and the group's k and v only go to a
    cache), and how many it rewrote; `gm` itself when there are none."""
    matches = decode_qkv_matches(gm.graph)
    if not matches:
        return gm, 0
    from optc.compiler.codegen import qkv_ops  # noqa: F401  (registers optc::decode_qkv)

    graph = copy.deepcopy(gm.graph)
    copied = {n.name: n for n in graph.nodes}
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    rewritten_groups = 0
    for m in matches:
        outputs = [copied[n.name] for n in m.outputs]
        writes = [copied[w.name] for w in m.cache_writes] if write_cache and m.cache_writes else None
        first_use = min((u for o in outputs for u in o.users), key=lambda u: order[u.name])
        inputs = [m.x, m.norm_weight, *m.weights, m.cos, m.sin]
        if writes is not None:
            cache_inputs = [writes[0].args[0], writes[1].args[0], writes[0].args[2]]
            if not _writes_move_safely(writes, first_use, order) \
                    or any(order[i.name] >= order[first_use.name] for i in cache_inputs):
                writes = None  # keep the writes where they are, and the op without them
        if any(order[i.name] >= order[first_use.name] for i in inputs):
            continue  # an input is computed after a use of the outputs: leave this group as it is
        with graph.inserting_before(first_use):
            args = (copied[m.x.name], copied[m.norm_weight.name], m.eps, *(copied[w.name] for w in m.weights),
                    copied[m.cos.name], copied[m.sin.name], m.head_dim)
            if writes is None:
                op = graph.call_function(torch.ops.optc.decode_qkv.default, args)
            else:
                op = graph.call_function(torch.ops.optc.decode_qkv_cached.default, (*args, *cache_inputs))
            start = 0
            for old, heads in zip(outputs, (*m.heads, m.heads[1])):
                rows = heads * m.head_dim
                part = graph.call_function(aten.slice.Tensor, (op, 0, start, start + rows))
                view = graph.call_function(aten.view.default, (part, [1, 1, heads, m.head_dim]))
                new = graph.call_function(aten.transpose.int, (view, 1, 2))
                new.meta = dict(old.meta)
                old.replace_all_uses_with(new)
                start += rows
        for write in writes or ():
            write.replace_all_uses_with(write.args[0])  # the cache, which the op has written
            graph.erase_node(write)
        rewritten_groups += 1
    if not rewritten_groups:
        return gm, 0
    rewritten = fx.GraphModule(gm, graph)
    rewritten.meta.update(gm.meta)
    eliminate_dead_code(rewritten)
    rewritten.recompile()
    return rewritten, rewritten_groups


def _writes_move_safely(writes: list, first_use: fx.Node, order: dict) -> bool:
    """Whether the op, placed before `first_use`, may make both cache writes itself: only
    where the first of them is `first_use` and the other follows it directly (as torch.export
    captures HF's cache update), so no node sees one cache written and not the other or reads
    a cache the op wrote early, through whatever alias."""
    at = sorted(order[w.name] for w in writes)
    return at[0] == order[first_use.name] and at[1] == at[0] + 1
