"""GPT-2-style Conv1D projections as ordinary linears, right after capture.

Hugging Face's Conv1D (GPT-2, and models copied from it) stores its weight as
[in, out] and computes `addmm(bias, x.view(-1, in), W).view(*lead, out)`. Every pass
and the anatomy read linear layers as `aten.linear(x, W[out, in], bias)`; rewriting the
pattern once, with the weight transposed into a new parameter of the same name, lets
them all apply to these models unchanged. The result is the same function (one GEMM
either way), so the rewrite is lossless and is verified like every lowering.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from optc.compiler.rewrite import attr_value, get_attr_nodes, node_shape, set_param

aten = torch.ops.aten
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def _match(addmm: fx.Node, getattrs: dict):
    """(x, flatten view, weight node, bias node, unflatten view) of a Conv1D, or None."""
    if len(addmm.args) != 3 or addmm.kwargs.get("beta", 1) != 1 or addmm.kwargs.get("alpha", 1) != 1:
        return None
    bias, flat, weight = addmm.args
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr" and len(getattrs.get(weight.target, [])) == 1
            and len(weight.users) == 1):
        return None  # a weight read elsewhere too (tied) keeps its layout
    if not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        return None
    if not (isinstance(flat, fx.Node) and flat.target in _VIEWS and len(flat.users) == 1):
        return None
    users = list(addmm.users)
    if len(users) != 1 or users[0].target not in _VIEWS:
        return None
    x, unflat = flat.args[0], users[0]
    x_shape, out_shape, w_shape = node_shape(x), node_shape(unflat), node_shape(weight)
    if x_shape is None or out_shape is None or w_shape is None or len(w_shape) != 2:
        return None
    if tuple(map(str, x_shape[:-1])) != tuple(map(str, out_shape[:-1])) or str(x_shape[-1]) != str(w_shape[0]):
        return None
    return x, flat, weight, bias, unflat


def conv1d_as_linear(gm: fx.GraphModule) -> int:
    """Rewrite every Conv1D pattern of `gm` into aten.linear; returns how many."""
    getattrs = get_attr_nodes(gm)
    done = 0
    for addmm in list(gm.graph.find_nodes(op="call_function", target=aten.addmm.default)):
        found = _match(addmm, getattrs)
        if found is None:
            continue
        x, flat, weight, bias, unflat = found
        set_param(gm, getattrs, weight.target, attr_value(gm, weight.target).detach().t())
        with gm.graph.inserting_before(addmm):
            linear = gm.graph.call_function(aten.linear.default, (x, weight, bias))
        linear.meta = {k: v for k, v in addmm.meta.items() if k != "val"}
        linear.meta["val"] = unflat.meta["val"]
        unflat.replace_all_uses_with(linear)
        for node in (unflat, addmm, flat):
            gm.graph.erase_node(node)
        done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
    return done

