"""merge_projections: linears that read the same tensor become one linear (lossless).

q/k/v of an attention and gate/up of a gated MLP read one input each. At decode each of
them is a GEMV of its own, and each GEMV pays a launch, a ramp-up and a tail that cost
as much as reading megabytes (benchmarks/NOTES.md). One linear over the concatenated
weight, followed by slices of its output, computes every output column with the same
dot product, in one launch over more bytes. Each merged group is checked against its
parts on a random input when it is made.

Unlike the other passes this one works on ops, not on the anatomy: it runs last, so it
must also see the ops earlier passes put in (`optc::sparse_linear` siblings that share
their input and threshold merge the same way, along the columns of their transposed
weights), and the identity it uses ("a @ [B | C] = [a @ B | a @ C]") holds whatever
the model is. The runner checks the merged program against the one before the pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from optc.compiler.anatomy import Anatomy
from optc.compiler.config import Choice, PassConfig, knob
from optc.compiler.passes import PassResult, register_pass
from optc.compiler.rewrite import attr_value as _attr
from optc.compiler.rewrite import drop_unused_attributes, eliminate_dead_code

aten = torch.ops.aten


@dataclass(frozen=True)
class MergeProjectionsConfig(PassConfig):
    # On the H100 (llama-1b decode, benchmarks/NOTES.md) merging the two sparse
    # gate/up GEMVs of TEAL into one 2048->16384 sparse kernel took the step from 1.330
    # to 1.286 ms/token (kernel 2 x 10.0 us -> 16.7 us per block), while merging the
    # dense q/k/v and gate/up made it slower (1.420 vs 1.358: Inductor already fuses
    # RMSNorm + gate + up into one tuned GEMV). So by default only sparse siblings merge.
    # An encoder at batch 1 gains from one q/k/v GEMM instead of three (BERT-base on the
    # H100: 1.19-1.20x over dense in two processes), so the search may choose it.
    enabled: bool = knob(True, doc="run this pass at all")
    ops: str = knob("sparse", choices=("sparse", "all"), search=Choice(("sparse", "all")),
                    doc="which linears merge: 'sparse' (optc::sparse_linear siblings only) or 'all' (dense too)")
    max_group: int = knob(8, low=2, high=64, doc="most linears merged into one (siblings beyond it form another group)")


def _is_attr(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


@dataclass(frozen=True)
class _Kind:
    """How one op type holds its weight: the dimension its output columns run along."""

    name: str
    weight_arg: int
    bias_arg: int
    out_dim: int  # dimension of the stored weight that indexes output columns
    shared_args: tuple[int, ...]  # further arguments every member must share (thresholds)


def _kinds(ops: str) -> dict:
    kinds = {aten.linear.default: _Kind("linear", 1, 2, 0, ())} if ops == "all" else {}
    sparse = getattr(getattr(torch.ops, "optc", None), "sparse_linear", None)
    if sparse is not None:  # registered when optc.compiler.codegen.ops is imported
        kinds[sparse.default] = _Kind("sparse_linear", 1, 3, 1, (2,))
    return kinds


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
    w = _attr(gm, weight.target)
    if w.dim() != 2:
        return None
    in_dim = 1 - kind.out_dim
    return (node.target, args[0], tuple(shared), bias is not None, w.dtype, w.device, w.shape[in_dim])


def _merged_name(targets: list[str]) -> tuple[str, str]:
    """(owner module, attribute) for the concatenation of `targets`: beside their
    common module, named after the parts that differ (q_proj_weight__k_proj_weight)."""
    parts = [t.split(".") for t in targets]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    owner = ".".join(parts[0][:common])
    return owner, "merged__" + "__".join("_".join(p[common:]) for p in parts)


def _register(gm: fx.GraphModule, targets: list[str], dim: int) -> str:
    owner, attr = _merged_name(targets)
    module = gm.get_submodule(owner) if owner else gm
    if not hasattr(module, attr):
        merged = torch.cat([_attr(gm, t).detach() for t in targets], dim=dim)
        module.register_parameter(attr, torch.nn.Parameter(merged, requires_grad=False))
    return f"{owner}.{attr}" if owner else attr


def _values(gm: fx.GraphModule, args: list, x: torch.Tensor) -> list:
    return [x] + [_attr(gm, a.target) if _is_attr(a) else a for a in args[1:]]


def _check_group(gm: fx.GraphModule, members: list[fx.Node], merged_args: list, kind: _Kind) -> float:
    """The merged op against its members on a random input shaped like theirs:
    relative error of the concatenated outputs (the rewrite checked where it happened,
    which stays meaningful in programs whose thresholds make end-to-end checks chaotic)."""
    from optc.compiler.codegen.lowering import TOLERANCE
    from optc.errors import CompileError

    w = _attr(gm, merged_args[kind.weight_arg].target)
    val = members[0].args[0].meta.get("val")
    lead = [d if isinstance(d, int) else 3 for d in val.shape[:-1]] if isinstance(val, torch.Tensor) else [3]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*lead, w.shape[1 - kind.out_dim], generator=gen).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        ref = torch.cat([m.target(*_values(gm, list(m.args), x)).float() for m in members], dim=-1)
        out = members[0].target(*_values(gm, merged_args, x)).float()
    err = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    tol = TOLERANCE.get(w.dtype, 1e-2)
    if not err <= tol:  # NaN fails too
        raise CompileError(f"merge_projections: the merged {kind.name} differs from its {len(members)} parts "
                           f"(relative error {err:.3g} > {tol:g}); disable it with merge_projections.enabled=false")
    return err


def _merge(gm: fx.GraphModule, members: list[fx.Node], kind: _Kind) -> float:
    g = gm.graph
    first = members[0]
    weights = [m.args[kind.weight_arg].target for m in members]
    widths = [_attr(gm, w).shape[kind.out_dim] for w in weights]
    has_bias = len(first.args) > kind.bias_arg and first.args[kind.bias_arg] is not None
    with g.inserting_before(first):
        args = list(first.args)
        args[kind.weight_arg] = g.get_attr(_register(gm, weights, kind.out_dim))
        if has_bias:
            args[kind.bias_arg] = g.get_attr(_register(gm, [m.args[kind.bias_arg].target for m in members], 0))
        err = _check_group(gm, members, args, kind)
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


@register_pass("merge_projections", MergeProjectionsConfig, lossy=False, reads_anatomy=False)
def merge_projections(gm: fx.GraphModule, anatomy: Anatomy | None, cfg: MergeProjectionsConfig, plan: dict) -> PassResult:
    """One linear (or sparse linear) for the linears that read the same input."""
    kinds = _kinds(cfg.ops)
    groups: dict = {}
    for node in gm.graph.nodes:
        key = _group_key(gm, node, kinds)
        if key is not None:
            groups.setdefault(key, []).append(node)
    merged: dict[str, int] = {}
    linears, worst = 0, 0.0
    for key, nodes in groups.items():
        for i in range(0, len(nodes), cfg.max_group):
            members = nodes[i : i + cfg.max_group]
            if len(members) < 2:
                continue
            kind = kinds[key[0]]
            worst = max(worst, _merge(gm, members, kind))
            merged[kind.name] = merged.get(kind.name, 0) + 1
            linears += len(members)
    if not merged:
        what = "linears" if cfg.ops == "all" else "sparse linears (merge_projections.ops=all merges dense ones too)"
        return PassResult(False, f"no two {what} read the same input with stored weights")
    eliminate_dead_code(gm)
    drop_unused_attributes(gm)
    gm.recompile()
    return PassResult(True, details={"merged_groups": merged, "linears_merged": linears,
                                     "group_check_max_rel_err": float(f"{worst:.3g}")})
