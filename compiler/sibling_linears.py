"""Linears that read the same tensor, computed as one linear over their concatenated
weights followed by slices of its output ("a @ [B | C] = [a @ B | a @ C]"): every output
column comes from the same dot product, in one launch over more bytes.

Two owners use it. The merge_projections pass merges in the program itself (the
concatenation replaces the parts in their module). The lowering's `merge_gemms`
rewrite (codegen/merge_gemms.py) merges in a copy made for Inductor, so the program
that the passes, the anatomy and the artifact see keeps its parts. Each merged group is
checked against its parts on a random input when it is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from optc.compiler.rewrite import attr_value
from optc.errors import CompileError

aten = torch.ops.aten


@dataclass(frozen=True)
class Kind:
    """How one op type holds its weight: the dimension its output columns run along."""

    name: str
    weight_arg: int
    bias_arg: int
    out_dim: int  # dimension of the stored weight that indexes output columns
    shared_args: tuple[int, ...]  # further arguments every member must share (thresholds)


DENSE = {aten.linear.default: Kind("linear", 1, 2, 0, ())}


def sparse_kinds() -> dict:
    """optc::sparse_linear's kind, where the op is registered (optc.compiler.codegen.ops)."""
    sparse = getattr(getattr(torch.ops, "optc", None), "sparse_linear", None)
    return {} if sparse is None else {sparse.default: Kind("sparse_linear", 1, 3, 1, (2,))}


# Where a group's concatenated weight goes: (gm, the parts' attribute names, the
# dimension to concatenate along) -> the new attribute's name.
Register = Callable[[fx.GraphModule, list, int], str]


def _is_attr(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def _group_key(gm: fx.GraphModule, node: fx.Node, kinds: dict):
    """Nodes with equal keys compute columns of one product; None: not mergeable."""
    if node.op != "call_function" or node.target not in kinds or node.kwargs:
        return None
    kind = kinds[node.target]
    args = node.args
    weight = args[kind.weight_arg]
    bias = args[kind.bias_arg] if len(args) > kind.bias_arg else None
    if not _is_attr(weight) or (bias is not None and not _is_attr(bias)):
        return None
    shared = []
    for i in kind.shared_args:
        if not _is_attr(args[i]):
            return None
        shared.append(args[i].target)
    w = attr_value(gm, weight.target)
    if w.dim() != 2:
        return None
    in_dim = 1 - kind.out_dim
    return (node.target, args[0], tuple(shared), bias is not None, w.dtype, w.device, w.shape[in_dim])


def sibling_groups(gm: fx.GraphModule, kinds: dict, max_group: int) -> list[list[fx.Node]]:
    """The groups of at least two nodes that merge, each at most `max_group` long
    (siblings beyond it form another group)."""
    by_key: dict = {}
    for node in gm.graph.nodes:
        key = _group_key(gm, node, kinds)
        if key is not None:
            by_key.setdefault(key, []).append(node)
    return [nodes[i:i + max_group] for nodes in by_key.values() for i in range(0, len(nodes), max_group)
            if len(nodes[i:i + max_group]) >= 2]


def concatenated(gm: fx.GraphModule, targets: list[str], dim: int) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.cat([attr_value(gm, t).detach() for t in targets], dim=dim), requires_grad=False)


def _values(gm: fx.GraphModule, args: list, x: torch.Tensor) -> list:
    return [x] + [attr_value(gm, a.target) if _is_attr(a) else a for a in args[1:]]


def _check_group(gm, members: list[fx.Node], merged_args: list, kind: Kind, tolerance: dict, owner: str,
                 remedy: str) -> float:
    """The merged op against its members on a random input shaped like theirs:
    relative error of the concatenated outputs (the rewrite checked where it happened,
    which stays meaningful in programs whose thresholds make end-to-end checks chaotic)."""
    w = attr_value(gm, merged_args[kind.weight_arg].target)
    val = members[0].args[0].meta.get("val")
    lead = [d if isinstance(d, int) else 3 for d in val.shape[:-1]] if isinstance(val, torch.Tensor) else [3]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*lead, w.shape[1 - kind.out_dim], generator=gen).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        ref = torch.cat([m.target(*_values(gm, list(m.args), x)).float() for m in members], dim=-1)
        out = members[0].target(*_values(gm, merged_args, x)).float()
    err = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    tol = tolerance.get(w.dtype, 1e-2)
    if not err <= tol:  # NaN fails too
        raise CompileError(f"{owner}: the merged {kind.name} differs from its {len(members)} parts "
                           f"(relative error {err:.3g} > {tol:g}); {remedy}")
    return err


def merge_group(gm: fx.GraphModule, members: list[fx.Node], kind: Kind, register: Register, tolerance: dict,
                owner: str, remedy: str) -> float:
    """Replace `members` (one group of sibling_groups) by one op and slices of its output;
    returns the group check's relative error (CompileError beyond `tolerance`, naming
    `owner`, the pass or rewrite, and `remedy`)."""
    g = gm.graph
    first = members[0]
    weights = [m.args[kind.weight_arg].target for m in members]
    widths = [attr_value(gm, w).shape[kind.out_dim] for w in weights]
    has_bias = len(first.args) > kind.bias_arg and first.args[kind.bias_arg] is not None
    with g.inserting_before(first):
        args = list(first.args)
        args[kind.weight_arg] = g.get_attr(register(gm, weights, kind.out_dim))
        if has_bias:
            args[kind.bias_arg] = g.get_attr(register(gm, [m.args[kind.bias_arg].target for m in members], 0))
        err = _check_group(gm, members, args, kind, tolerance, owner, remedy)
        merged = g.call_function(first.target, tuple(args))
    merged.meta["nn_module_stack"] = first.meta.get("nn_module_stack", {})
    start = 0
    for member, width in zip(members, widths):
        with g.inserting_after(merged):
            part = g.call_function(aten.slice.Tensor, (merged, -1, start, start + width))
        part.meta.update({k: v for k, v in member.meta.items() if k in ("val", "nn_module_stack", "stack_trace")})
        start += width
        # A slice of the last dimension is not contiguous: `view` may refuse what it
        # accepted before, `reshape` copies only where it must.
        for user in list(member.users):
            if user.op == "call_function" and user.target == aten.view.default:
                user.target = aten.reshape.default
        member.replace_all_uses_with(part)
        g.erase_node(member)
    return err
