"""The graph rewrite behind merge_tokens: merge tokens at blocks' `mid` points and
carry the shorter sequence through everything after them.

After a merge, every tensor downstream that has a token dimension holds fewer tokens
than the exported graph says. Walking the nodes in order, each node reading such a
tensor is handled by a rule for its op that says where the token dimension goes (and
fixes the literal sizes a view or expand names it with), and its shape metadata is
recomputed on the graph's fake tensors. An op without a rule (a reduction over tokens,
a gather, the program's output) reads the tokens unmerged instead: each original
position takes its merged token's value (`optc::token_unmerge`). Anything that cannot
be followed (a tensor of the original token count from outside the blocks, such as a
relative position bias) raises Refused, and the caller leaves the graph as it was.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from optc.compiler.torch_private import detect_fake_mode, python_dispatcher

aten = torch.ops.aten
_SDPA = aten.scaled_dot_product_attention.default
_UNARY = {aten.linear.default, aten.layer_norm.default, aten.rms_norm.default, aten.gelu.default,
          aten.relu.default, aten.silu.default, aten.tanh.default, aten.sigmoid.default, aten.dropout.default,
          aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.clone.default,
          aten.contiguous.default, aten.alias.default, aten.detach.default, aten.neg.default, aten.exp.default,
          aten.erf.default, aten.rsqrt.default, aten.sqrt.default, aten.pow.Tensor_Scalar, aten.mul.Scalar,
          aten.add.Scalar, aten.sub.Scalar, aten.div.Scalar, aten.softmax.int, aten._softmax.default}
_BINARY = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.where.self,
           aten.maximum.default, aten.minimum.default}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_IGNORED = {aten._assert_tensor_metadata.default}


class Refused(Exception):
    """The token dimension cannot be followed through the graph."""


class _Unmerge(Exception):
    """No rule for this use: it reads the tokens unmerged."""


class Region:
    """Token-dimension bookkeeping over one graph. `tok[node] = (dim, level)`; a level is
    one merge: {"n": tokens, "size": node [B, n] fp32, "source": node [B, N0] or None}."""

    def __init__(self, gm: fx.GraphModule, protected: int):
        self.gm, self.graph, self.protected = gm, gm.graph, protected
        vals = [n.meta.get("val") for n in gm.graph.nodes]
        self.mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
        if self.mode is None:
            raise Refused("the graph has no fake-tensor metadata to recompute shapes with")
        self.tok: dict[fx.Node, tuple[int, int]] = {}
        self.levels: list[dict] = []
        self.old: dict[fx.Node, torch.Tensor] = {}  # shape metadata before the rewrite
        self.new_nodes: set[fx.Node] = set()
        self._unmerged: dict[fx.Node, fx.Node] = {}
        self._bias: dict = {}

    # -- emitting nodes ------------------------------------------------------------------

    def emit(self, target, args, kwargs=None, *, before: fx.Node | None = None, after: fx.Node | None = None):
        ctx = self.graph.inserting_before(before) if before is not None else self.graph.inserting_after(after)
        with ctx:
            node = self.graph.call_function(target, tuple(args), kwargs or {})
        self._refresh(node)
        self.new_nodes.add(node)
        return node

    def _refresh(self, node: fx.Node) -> None:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
        try:
            with self.mode, python_dispatcher():  # as head_narrow: sizes may be symbolic
                node.meta["val"] = node.target(*args, **kwargs)
        except Exception as exc:
            raise Refused(f"{node.name} ({_name(node.target)}) cannot take the merged tokens: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None

    # -- proportional attention and unmerging -----------------------------------------------

    def attention_bias(self, level: int, dtype: torch.dtype, before: fx.Node, proportional: bool) -> fx.Node:
        """[B, 1, 1, n] additive bias: log(size) (or 0) where a token holds any real
        token, the dtype's minimum where it holds only padding."""
        key = (level, dtype)
        if key not in self._bias:
            size = self.levels[level]["size"]
            real = self.emit(aten.gt.Scalar, (size, 0.0), before=before)
            val = self.emit(aten.log.default, (size,), before=before) if proportional else \
                self.emit(aten.mul.Scalar, (size, 0.0), before=before)
            low = self.emit(aten.full_like.default, (size, torch.finfo(dtype).min), before=before)
            bias = self.emit(aten.where.self, (real, val, low), before=before)
            bias = self.emit(aten._to_copy.default, (bias,), {"dtype": dtype}, before=before)
            bias = self.emit(aten.unsqueeze.default, (bias, 1), before=before)
            self._bias[key] = self.emit(aten.unsqueeze.default, (bias, 1), before=before)
        return self._bias[key]

    def attention_channel(self, level: int, dtype: torch.dtype, scale: float, before: fx.Node,
                          proportional: bool) -> fx.Node:
        """[B, 1, n, 1]: the same bias divided by the attention's scale, for a key channel
        whose query channel is 1; padding gets a score that exp() takes to 0 in fp32 yet
        stays finite in dtype after the division."""
        key = ("channel", level, dtype, scale)
        if key not in self._bias:
            size = self.levels[level]["size"]
            real = self.emit(aten.gt.Scalar, (size, 0.0), before=before)
            val = self.emit(aten.log.default, (size,), before=before) if proportional else \
                self.emit(aten.mul.Scalar, (size, 0.0), before=before)
            val = self.emit(aten.div.Scalar, (val, scale), before=before)
            low = self.emit(aten.full_like.default,
                            (size, -min(1e4, torch.finfo(dtype).max * scale / 2) / scale), before=before)
            chan = self.emit(aten.where.self, (real, val, low), before=before)
            chan = self.emit(aten._to_copy.default, (chan,), {"dtype": dtype}, before=before)
            chan = self.emit(aten.unsqueeze.default, (chan, 1), before=before)
            self._bias[key] = self.emit(aten.unsqueeze.default, (chan, -1), before=before)
        return self._bias[key]

    def unmerge(self, node: fx.Node, before: fx.Node) -> fx.Node:
        dim, level = self.tok[node]
        if dim != 1:
            raise Refused(f"{node.name} carries the tokens in dimension {dim}; only dimension 1 is unmerged")
        if node not in self._unmerged:
            source = self.levels[level]["source"]
            self._unmerged[node] = self.emit(torch.ops.optc.token_unmerge.default, (node, source), before=before)
        return self._unmerged[node]

    # -- following the token dimension ------------------------------------------------------

    def follow(self, node: fx.Node, unmerge_outputs: bool) -> None:
        """Handle one original node that may read merged tokens."""
        if node in self.new_nodes or node.op not in ("call_function", "output"):
            return
        inputs = [a for a in node.all_input_nodes if a in self.tok]
        if not inputs:
            return
        if node.op == "output":
            if unmerge_outputs:
                for a in inputs:
                    node.replace_input_with(a, self.unmerge(a, node))
            return
        if node.target in _IGNORED:
            return
        levels = {self.tok[a][1] for a in inputs}
        if len(levels) > 1:
            raise Refused(f"{node.name} combines tokens merged to different lengths")
        self.old[node] = node.meta.get("val")
        try:
            dim = self._rule(node, inputs)
        except _Unmerge:
            for a in inputs:
                node.replace_input_with(a, self.unmerge(a, node))
            self._refresh(node)
            return
        self._refresh(node)
        if dim is not None:
            self.tok[node] = (dim, levels.pop())

    def _rule(self, node: fx.Node, inputs: list[fx.Node]) -> int | None:
        t = node.target
        x = node.args[0]
        if t in _UNARY and x in self.tok and len(inputs) == 1:
            dim = self.tok[x][0]
            ndim = _ndim(node)
            if t == aten.linear.default and dim == ndim - 1:
                raise _Unmerge
            if t in (aten.layer_norm.default, aten.rms_norm.default) and dim >= ndim - len(node.args[1]):
                raise _Unmerge
            if t in (aten.softmax.int, aten._softmax.default) and node.args[1] % ndim == dim:
                raise _Unmerge
            return dim
        if t in _BINARY:
            ndim = _ndim(node)
            dims = {ndim - (_ndim(a) - self.tok[a][0]) for a in inputs}
            if len(dims) != 1:
                raise Refused(f"{node.name} combines merged tokens along different dimensions")
            return dims.pop()
        if t == _SDPA:  # queries carry the output's tokens; keys and values are reduced
            if x not in self.tok:
                raise Refused(f"{node.name} attends from unmerged queries to merged keys")
            return self.tok[x][0]
        if x not in self.tok or len(inputs) != 1:
            raise _Unmerge
        dim, level = self.tok[x]
        n_new = self.levels[level]["n"]
        args = list(node.args)
        if t in _VIEWS:
            j = _view_dim(self.old.get(x, x.meta["val"]).shape, dim, self.old[node].shape)
            if j is None:
                raise _Unmerge
            sizes = list(args[1])
            if sizes[j] != -1:
                sizes[j] = n_new
            node.args = (x, sizes, *args[2:])
            return j
        if t == aten.expand.default:
            j = dim + len(args[1]) - _ndim(x)
            sizes = list(args[1])
            if sizes[j] != -1:
                sizes[j] = n_new
            node.args = (x, sizes, *args[2:])
            return j
        if t == aten.transpose.int:
            nd = _ndim(x)
            d0, d1 = args[1] % nd, args[2] % nd
            return d1 if dim == d0 else d0 if dim == d1 else dim
        if t == aten.permute.default:
            return [d % _ndim(x) for d in args[1]].index(dim)
        if t == aten.unsqueeze.default:
            d = args[1] % _ndim(node)
            return dim + (d <= dim)
        if t == aten.select.int:
            d = args[1] % _ndim(x)
            if d != dim:
                return dim - (d < dim)
            if 0 <= args[2] < self.protected:  # a protected token keeps its position
                return None
            raise _Unmerge
        if t == aten.slice.Tensor:
            return self._slice(node, dim, n_new)
        raise _Unmerge

    def _slice(self, node: fx.Node, dim: int, n_new: int) -> int | None:
        x, d = node.args[0], node.args[1] % _ndim(node.args[0])
        if d != dim:
            return dim
        start = node.args[2] if len(node.args) > 2 else 0
        end = node.args[3] if len(node.args) > 3 else None
        step = node.args[4] if len(node.args) > 4 else 1
        n_old = self.old.get(x, x.meta["val"]).shape[dim]
        if start in (0, None) and step == 1 and end is not None and end <= self.protected:
            return None  # protected tokens only
        if start in (0, None) and step == 1 and (end is None or end >= n_old):
            args = list(node.args)
            if len(args) > 3:
                args[3] = min(end, n_new)
            node.args = tuple(args)
            return dim
        raise _Unmerge


def _ndim(node: fx.Node) -> int:
    return node.meta["val"].dim()


def _view_dim(shape_in, dim: int, shape_out) -> int | None:
    """The output dimension of a view that carries input dimension `dim` whole: the same
    product of sizes before it and after it."""
    shape_in, shape_out = [int(s) for s in shape_in], [int(s) for s in shape_out]
    before, after = _prod(shape_in[:dim]), _prod(shape_in[dim + 1:])
    for j, size in enumerate(shape_out):
        if size == shape_in[dim] and _prod(shape_out[:j]) == before and _prod(shape_out[j + 1:]) == after:
            return j
    return None


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def _name(target) -> str:
    return getattr(target, "__name__", None) or str(target)
