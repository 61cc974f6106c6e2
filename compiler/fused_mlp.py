"""Split a fused gate/up projection into a gate and an up linear (lossless).

Phi-3 (and others) compute a gated MLP's gate and up in one linear and cut its output:

    gu = linear(x, W_gate_up)            # W_gate_up = [W_gate; W_up], [2I, H]
    gate, up = chunk(gu, 2, dim=-1)
    h = up * act(gate)

Passes that threshold act(gate) (CATS, CHESS) skip rows of W_up and W_down per channel,
and TEAL's error proxy follows gate and up separately, so they need the two halves as
linears of their own. The split computes every output element with the same dot
product over the same weight rows; only the weights' storage changes (two parameters
holding the halves). The anatomy then reads an ordinary gated MLP; merge_projections
can join the halves again where they stay siblings (sparse ones, by default).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from optc.compiler.anatomy import ACTIVATIONS
from optc.compiler.rewrite import attr_value, drop_unused_attributes, eliminate_dead_code, node_shape

aten = torch.ops.aten


def _halves(lin: fx.Node):
    """(gate getitem, up getitem) when `lin` is a fused gate/up projection, else None:
    its only user chunks it in two along the last dim, half 0 goes through an
    activation whose only user multiplies it with half 1."""
    users = list(lin.users)
    if len(users) != 1:
        return None
    chunk = users[0]
    if chunk.target != aten.chunk.default:
        return None
    dim = chunk.args[2] if len(chunk.args) > 2 else chunk.kwargs.get("dim", 0)
    if chunk.args[1] != 2 or dim not in (-1, len(node_shape(lin) or ()) - 1):
        return None
    items = {}
    for g in chunk.users:
        if g.target is not operator.getitem:
            return None
        items[g.args[1]] = g
    if set(items) != {0, 1} or len(items[0].users) != 1:
        return None
    act = next(iter(items[0].users))
    if act.target not in ACTIVATIONS or len(act.users) != 1:  # the gate activations the anatomy reads
        return None
    mul = next(iter(act.users))
    if mul.target != aten.mul.Tensor or set(mul.args) != {act, items[1]}:
        return None
    return items[0], items[1]


def _half_param(gm: fx.GraphModule, target: str, rows: slice, part: str, g: fx.Graph) -> fx.Node:
    """A get_attr of a new parameter holding `rows` of `target`, beside it (same owner
    module, name suffixed with the part). A view, not a copy: a row range of a
    contiguous weight is contiguous, and the prefill and decode programs (and the
    caller's model) then share one copy of the weight."""
    owner, _, attr = target.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    value = attr_value(gm, target).detach()[rows]
    module.register_parameter(f"{attr}__{part}", torch.nn.Parameter(value, requires_grad=False))
    node = g.get_attr(f"{owner}.{attr}__{part}" if owner else f"{attr}__{part}")
    # Shape metadata like every get_attr of the program (the anatomy reads weight shapes).
    node.meta["val"] = torch.empty(value.shape, dtype=value.dtype, device="meta")
    return node


def _half_linear(gm: fx.GraphModule, lin: fx.Node, weight: str, bias: str | None, rows: slice,
                 part: str, like: fx.Node) -> fx.Node:
    """linear(x, W[rows], b[rows]) on new parameters beside the fused ones."""
    g = gm.graph
    with g.inserting_before(lin):
        w = _half_param(gm, weight, rows, part, g)
        b = _half_param(gm, bias, rows, part, g) if bias is not None else None
        new = g.call_function(aten.linear.default, (lin.args[0], w, b) if b is not None else (lin.args[0], w))
    # A module path of its own (the fused projection's, plus the half), so the anatomy
    # tells the two linears apart.
    stack = dict(lin.meta.get("nn_module_stack", {}))
    if stack:
        key, (path, cls) = list(stack.items())[-1]
        stack[f"{key}.{part}"] = (f"{path}.{part}", cls)
    new.meta.update({"nn_module_stack": stack, "val": like.meta.get("val")})
    for k in ("stack_trace", "source_fn_stack"):
        if k in lin.meta:
            new.meta[k] = lin.meta[k]
    return new


def split_fused_gate_up(gm: fx.GraphModule) -> dict:
    """Rewrite every fused gate/up projection of `gm` as two linears; returns
    {"fused_gate_up_split": count} (empty when there was none)."""
    done = 0
    for lin in list(gm.graph.nodes):
        if lin.op != "call_function" or lin.target != aten.linear.default:
            continue
        weight, bias = lin.args[1], (lin.args[2] if len(lin.args) > 2 else None)
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
            continue
        if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
            continue
        halves = _halves(lin)
        rows = attr_value(gm, weight.target).shape[0]
        if halves is None or rows % 2:
            continue
        inter = rows // 2
        gate_item, up_item = halves
        for item, part, sl in ((gate_item, "gate", slice(0, inter)), (up_item, "up", slice(inter, rows))):
            new = _half_linear(gm, lin, weight.target, bias.target if bias is not None else None, sl, part, item)
            item.replace_all_uses_with(new)
        done += 1
    if not done:
        return {}
    eliminate_dead_code(gm)
    drop_unused_attributes(gm)
    gm.recompile()
    return {"fused_gate_up_split": done}
