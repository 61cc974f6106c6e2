"""merge_projections: linears that read the same tensor become one linear (lossless).

q/k/v of an attention and gate/up of a gated MLP read one input each. At decode each of
them is a GEMV of its own, and each GEMV pays a launch, a ramp-up and a tail that cost
as much as reading megabytes (benchmarks/NOTES.md). One linear over the concatenated
weight, followed by slices of its output, computes every output column with the same
dot product, in one launch over more bytes (compiler/sibling_linears.py, which the
lowering's `merge_gemms` rewrite shares).

Unlike the other passes this one works on ops, not on the anatomy: it runs last, so it
must also see the ops earlier passes put in (`optc::sparse_linear` siblings that share
their input and threshold merge the same way, along the columns of their transposed
weights), and the identity it uses holds whatever the model is. The runner checks the
merged program against the one before the pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from optc.compiler.anatomy import Anatomy
from optc.compiler.config import Choice, PassConfig, knob
from optc.compiler.passes import PassResult, register_pass
from optc.compiler.rewrite import drop_unused_attributes, eliminate_dead_code
from optc.compiler.sibling_linears import DENSE, concatenated, merge_group, sibling_groups, sparse_kinds


@dataclass(frozen=True)
class MergeProjectionsConfig(PassConfig):
    # On the H100 (llama-1b decode, benchmarks/NOTES.md) merging the two sparse
    # gate/up GEMVs of TEAL into one 2048->16384 sparse kernel took the step from 1.330
    # to 1.286 ms/token (kernel 2 x 10.0 us -> 16.7 us per block), while merging the
    # dense q/k/v and gate/up made it slower (1.420 vs 1.358: Inductor already fuses
    # RMSNorm + gate + up into one tuned GEMV). So by default only sparse siblings merge.
    # Where the target merges a forward program's dense siblings in its lowering
    # (Target.merge_gemms: h100, h200), `all` changes nothing an encoder runs, so a search there
    # leaves it out (optc/search.py); elsewhere it is how an encoder gets one q/k/v GEMM,
    # so the search may choose it.
    enabled: bool = knob(True, doc="run this pass at all")
    ops: str = knob("sparse", choices=("sparse", "all"), search=Choice(("sparse", "all")),
                    doc="which linears merge: 'sparse' (optc::sparse_linear siblings only) or 'all' (dense too)")
    max_group: int = knob(8, low=2, high=64, doc="most linears merged into one (siblings beyond it form another group)")


def _merged_name(targets: list[str]) -> tuple[str, str]:
    """(owner module, attribute) for the concatenation of `targets`: beside their
    common module, named after the parts that differ (q_proj_weight__k_proj_weight)."""
    parts = [t.split(".") for t in targets]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    owner = ".".join(parts[0][:common])
    return owner, "merged__" + "__".join("_".join(p[common:]) for p in parts)


def _register_beside(gm: fx.GraphModule, targets: list[str], dim: int) -> str:
    """The concatenation as a parameter of the parts' common module."""
    owner, attr = _merged_name(targets)
    module = gm.get_submodule(owner) if owner else gm
    if not hasattr(module, attr):
        module.register_parameter(attr, concatenated(gm, targets, dim))
    return f"{owner}.{attr}" if owner else attr


@register_pass("merge_projections", MergeProjectionsConfig, lossy=False, reads_anatomy=False)
def merge_projections(gm: fx.GraphModule, anatomy: Anatomy | None, cfg: MergeProjectionsConfig, plan: dict) -> PassResult:
    """One linear (or sparse linear) for the linears that read the same input."""
    from optc.compiler.codegen.lowering import TOLERANCE

    kinds = {**(DENSE if cfg.ops == "all" else {}), **sparse_kinds()}
    merged: dict[str, int] = {}
    linears, worst = 0, 0.0
    for members in sibling_groups(gm, kinds, cfg.max_group):
        kind = kinds[members[0].target]
        err = merge_group(gm, members, kind, _register_beside, TOLERANCE, "merge_projections",
                          "disable it with merge_projections.enabled=false")
        worst = max(worst, err)
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
