"""Features of a program for the latency cost model (compiler/search/cost_model.py).

Features (`program_features`) walk the graph once and group its nodes into the kernels
Inductor would launch:
- kernels of their own: matmuls/linears/convolutions, attention, and each optc op;
- everything else that computes (elementwise, reductions, gathers, casts, in-place
  cache writes) fuses: two such nodes share a kernel when one reads the other directly
  (views in between are free) and no kernel lies between them on any path, which is
  the case when both sit behind the same number of kernels ("level"); joining nodes of
  one level never makes a cycle, so the groups are schedulable as Inductor's are;
- views and metadata ops are free: no bytes, no launch.
A kernel's bytes are the tensors it reads from outside itself plus those it writes for
others (a fused group's intermediates never touch memory). Reading through a view reads
the view, but never more than its base (an expanded KV cache is read once). Gathers
(embedding, index) read only the rows they return; in-place writes into a cache write
the new entries, not the cache. Parameters read count as `weight_bytes`.

optc's sparse ops read the weight rows of non-zero activations only: each op's density
comes from sparsify_activations' plan in the manifest (per unit, found by the threshold
buffer the op reads; the W_down op after a CATS gate inherits the gate's unit). A tile
of M tokens reads a row if any token needs it; with independent tokens that is
1 - s**M of the rows, an upper bound when activity is correlated. Without a plan the
op counts as dense. Removed blocks and merged tokens need no rule: their nodes are gone
or their shapes are smaller.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from optc.compiler.torch_private import op_schema

VIEWS = {
    "view", "_unsafe_view", "reshape", "expand", "expand_as", "unsqueeze", "squeeze", "permute", "transpose",
    "t", "slice", "select", "alias", "detach", "as_strided", "unflatten", "flatten", "split", "split_with_sizes",
    "chunk", "unbind", "narrow", "view_as", "lift_fresh_copy", "dropout", "_assert_tensor_metadata",
    "_assert_async", "sym_size", "sym_numel", "sym_stride", "sym_constrain_range_for_size",
}
MATMULS = {"linear", "mm", "addmm", "bmm", "baddbmm", "matmul"}
CONVS = {"convolution", "conv1d", "conv2d", "conv3d", "_convolution", "conv_transpose1d", "conv_transpose2d"}
ATTENTION = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu"}
GATHERS = {"embedding", "index", "index_select", "gather"}  # read only the rows they return
SPARSE_PASS = "sparsify_activations"
SPARSE_OPS = {("optc", "sparse_linear"), ("optc", "cats_gate_up")}  # their own kernels, priced apart


def _op(node: fx.Node) -> tuple[str, str]:
    """(namespace, op name) of a call_function node: ('aten', 'linear')."""
    parts = str(node.target).split(".")
    return (parts[0], parts[1]) if len(parts) >= 2 else ("", getattr(node.target, "__name__", str(node.target)))


def _tensors(val) -> list:
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (list, tuple)):
        return [v for v in val if isinstance(v, torch.Tensor)]
    return []


class _Sizes:
    """Concrete sizes of (possibly symbolic) shapes. In inputs of two or more dims (ids,
    masks, images; not a 1-d cache_position) a symbolic first dim is the batch and a
    symbolic second dim the sequence; any other symbol, and these when not given, take
    the value the program was traced with."""

    def __init__(self, gm: fx.GraphModule, batch: int | None, seq: int | None):
        self.given, self.values = {}, {}
        for n in gm.graph.find_nodes(op="placeholder"):
            val = n.meta.get("val")
            if not isinstance(val, torch.Tensor) or val.dim() < 2:
                continue
            for d, size in zip(val.shape[:2], (batch, seq)):
                if size is not None and isinstance(d, torch.SymInt) and d.node.expr.is_Symbol:
                    self.given[d.node.expr] = size

    def dim(self, d) -> int:
        if not isinstance(d, torch.SymInt):
            return int(d)
        env = d.node.shape_env
        if id(env) not in self.values:
            self.values[id(env)] = {**(getattr(env, "backed_var_to_val", None) or env.var_to_val), **self.given}
        try:
            return int(d.node.expr.xreplace(self.values[id(env)]))
        except (TypeError, ValueError):
            return int(d.node.hint) if d.node.hint is not None else 1

    def numel(self, t: torch.Tensor) -> int:
        return math.prod(self.dim(d) for d in t.shape)

    def nbytes(self, val) -> int:
        return sum(self.numel(t) * t.element_size() for t in _tensors(val))

    def shape(self, node: fx.Node) -> list[int]:
        return [self.dim(d) for d in _tensors(node.meta.get("val"))[0].shape]


def _unit_sparsity(manifest: dict | None) -> dict[str, float]:
    """Threshold buffer -> the fraction of its activations expected to be zero."""
    for entry in (manifest or {}).get("passes", []):
        if entry.get("name") == SPARSE_PASS and entry.get("applied"):
            plan = entry.get("plan") or {}
            return {r["buffer"]: float(r.get("calibration_sparsity", r.get("sparsity", plan.get("target", 0.0))))
                    for r in plan.get("units", [])}
    return {}


class _Walk:
    def __init__(self, gm: fx.GraphModule, manifest, batch, seq):
        self.gm, self.sizes = gm, _Sizes(gm, batch, seq)
        self.params = {name for name, _ in gm.named_parameters()}
        self.sparsity = _unit_sparsity(manifest)
        self.kind = {n: self._kind(n) for n in gm.graph.nodes}

    def _kind(self, n: fx.Node) -> str:
        """'free' (no work), 'kernel' (its own launch) or 'fused' (joins a group)."""
        if n.op != "call_function" or not _tensors(n.meta.get("val")):
            return "free"
        ns, name = _op(n)
        if name == "getitem" or name in VIEWS:
            return "free"
        if name in ("to", "_to_copy") and isinstance(n.args[0], fx.Node):
            src = _tensors(n.args[0].meta.get("val"))
            if src and src[0].dtype == n.meta["val"].dtype:
                return "free"  # a cast to the same dtype is a no-op
        if ns == "optc" or name in MATMULS or name in CONVS or name in ATTENTION:
            return "kernel"
        return "fused"

    def base(self, n: fx.Node) -> fx.Node:
        """The node whose memory `n` views (itself when it computes)."""
        while self.kind[n] == "free" and n.op == "call_function" and n.args and isinstance(n.args[0], fx.Node):
            n = n.args[0]
        return n

    def read(self, arg: fx.Node, cap: int | None = None) -> tuple[fx.Node, int]:
        b = self.base(arg)
        nbytes = min(self.sizes.nbytes(arg.meta.get("val")), self.sizes.nbytes(b.meta.get("val")))
        return b, nbytes if cap is None else min(nbytes, cap)

    def is_weight(self, b: fx.Node) -> bool:
        return b.op == "get_attr" and b.target in self.params

    def density(self, n: fx.Node, threshold: fx.Node) -> float:
        """Fraction of weight rows an optc op reads."""
        s = self.sparsity.get(self.base(threshold).target)
        if s is None:
            s = self._upstream_sparsity(n.args[0])
        x = self.sizes.shape(n.args[0])
        tokens = math.prod(x[:-1])
        return 1.0 - (s or 0.0) ** max(tokens, 1)

    def _upstream_sparsity(self, start: fx.Node, depth: int = 8) -> float | None:
        """The unit whose zeros reach `start` through fused ops: a CATS gate op, or a
        mask `|x| > t` on a planned threshold."""
        seen, frontier = set(), [start]
        for _ in range(depth):
            nxt = []
            for n in frontier:
                if n in seen or not isinstance(n, fx.Node):
                    continue
                seen.add(n)
                ns, name = _op(n) if n.op == "call_function" else ("", "")
                if ns == "optc" and name == "cats_gate_up":
                    return self.sparsity.get(self.base(n.args[3]).target)
                if name == "gt" and isinstance(n.args[1], fx.Node) and self.base(n.args[1]).target in self.sparsity:
                    return self.sparsity[self.base(n.args[1]).target]
                if self.kind[n] != "kernel":
                    nxt.extend(n.all_input_nodes)
            frontier = nxt
        return None


def _kernel_cost(w: _Walk, n: fx.Node) -> tuple[int, int, int]:
    """(bytes, weight bytes, flops) of a node that is a kernel of its own."""
    ns, name = _op(n)
    out = _tensors(n.meta["val"])[0]
    nbytes, weight, factor = w.sizes.nbytes(out), 0, {}
    if ns == "optc" and name == "sparse_linear":
        d = w.density(n, n.args[2])
        factor[n.args[1]] = d
        k, cols = w.sizes.shape(n.args[1])
        flops = 2 * w.sizes.numel(out) // max(cols, 1) * k * cols * d
    elif ns == "optc" and name == "cats_gate_up":
        d = w.density(n, n.args[3])  # the gate is computed for every channel, W_up only where kept
        factor[n.args[2]] = d
        flops = 2 * w.sizes.numel(out) * w.sizes.shape(n.args[1])[1] * (1 + d)
    elif name in MATMULS:
        a = n.args[1] if name in ("addmm", "baddbmm") else n.args[0]
        flops = 2 * w.sizes.numel(out) * w.sizes.shape(a)[-1]
    elif name in CONVS:
        wshape = w.sizes.shape(n.args[1])
        flops = 2 * w.sizes.numel(out) * math.prod(wshape) // max(wshape[0], 1)
    elif name in ATTENTION:
        q, k = w.sizes.shape(n.args[0]), w.sizes.shape(n.args[1])
        flops = 2 * (math.prod(q) + w.sizes.numel(out)) * k[-2]
        if n.kwargs.get("is_causal") or (len(n.args) > 4 and n.args[4] is True):
            flops /= 2
    else:  # another custom op: count its traffic, assume no arithmetic worth a roof
        flops = 0
    seen = set()
    for arg in n.all_input_nodes:
        b, size = w.read(arg)
        if b in seen:
            continue
        seen.add(b)
        size = int(size * factor.get(arg, 1.0))
        nbytes += size
        weight += size if w.is_weight(b) else 0
    return nbytes, weight, int(flops)


def _fused_groups(w: _Walk) -> dict[fx.Node, list[fx.Node]]:
    """Fused nodes joined into Inductor-like kernels (see the module's docstring)."""
    level, parent = {}, {}

    def find(n):
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n in w.gm.graph.nodes:
        if w.kind[n] == "free":
            continue
        bases = [w.base(a) for a in n.all_input_nodes]
        level[n] = max((level.get(b, 0) + (w.kind[b] == "kernel") for b in bases), default=0)
        if w.kind[n] == "fused":
            parent[n] = n
            for b in bases:
                if w.kind[b] == "fused" and level[b] == level[n]:
                    parent[find(b)] = find(n)
    groups: dict = {}
    for n in parent:
        groups.setdefault(find(n), []).append(n)
    return groups


def _users_through_views(w: _Walk, n: fx.Node):
    for u in n.users:
        if w.kind[u] == "free" and u.op == "call_function":
            yield from _users_through_views(w, u)
        else:
            yield u


def _group_cost(w: _Walk, members: list[fx.Node]) -> tuple[int, int, int]:
    inside = set(members)
    reads: dict = {}
    written = flops = 0
    for n in members:
        _, name = _op(n)
        mutates = getattr(op_schema(n.target), "is_mutable", False)
        args = n.all_input_nodes
        if mutates and len(args) > 1 and args[0] is n.args[0]:
            # an in-place write of new entries into existing storage (a cache): it reads
            # and writes the entries, never the storage
            args = args[1:]
            written += min(max(w.sizes.nbytes(a.meta.get("val")) for a in args), w.sizes.nbytes(n.meta["val"]))
        elif mutates or any(u not in inside for u in _users_through_views(w, n)):
            written += w.sizes.nbytes(n.meta["val"])
        cap = w.sizes.nbytes(n.meta["val"]) if name in GATHERS else None
        for i, arg in enumerate(args):
            b, size = w.read(arg, cap if i == 0 else None)
            if b not in inside:
                reads[b] = max(reads.get(b, 0), size)
        flops += sum(w.sizes.numel(t) for t in _tensors(n.meta["val"]))
    weight = sum(size for b, size in reads.items() if w.is_weight(b))
    return written + sum(reads.values()), weight, flops


def program_features(ep_or_gm, manifest: dict | None = None, *, batch: int | None = 1,
                     seq: int | None = None) -> dict:
    """Bytes moved, weight bytes, FLOPs and kernel launches of one program (an
    ExportedProgram or a GraphModule with parameters as attributes). `manifest` gives
    sparsify_activations' plan (optc's sparse ops count as dense without it). `batch`
    and `seq` size a dynamic batch or sequence dim (None: as traced); static shapes are
    used as they are (a decoder's batch is fixed by its cache).
    `kernels` lists [bytes, flops, count] per distinct kernel, for a roofline per kernel;
    `sparse_kernels` the same for optc's sparse ops alone (among `kernels` too), which
    the cost model prices apart."""
    from torch.export import ExportedProgram

    if isinstance(ep_or_gm, ExportedProgram):
        from optc.compiler.capture import graph_module

        ep_or_gm = graph_module(ep_or_gm)
    w = _Walk(ep_or_gm, manifest, batch, seq)
    own = [n for n in ep_or_gm.graph.nodes if w.kind[n] == "kernel"]
    costs = [_kernel_cost(w, n) for n in own]
    sparse = [cost for n, cost in zip(own, costs) if _op(n) in SPARSE_OPS]
    costs += [_group_cost(w, members) for members in _fused_groups(w).values()]
    return {
        "bytes": sum(c[0] for c in costs),
        "weight_bytes": sum(c[1] for c in costs),
        "flops": sum(c[2] for c in costs),
        "launches": len(costs),
        "nodes": sum(1 for n in ep_or_gm.graph.nodes if n.op == "call_function"),
        "kernels": _distinct(costs),
        "sparse_kernels": _distinct(sparse),
    }


def _distinct(costs: list) -> list[list[int]]:
    """[bytes, flops, count] per distinct (bytes, flops) of kernel costs."""
    kernels: dict = {}
    for nbytes, _, flops in costs:
        kernels[(nbytes, flops)] = kernels.get((nbytes, flops), 0) + 1
    return sorted([b, f, c] for (b, f), c in kernels.items())
