"""Dense linears that read the same input run as one GEMM in the lowered program.

An encoder's q, k and v are three GEMMs over one normalised input; at batch 1 each
is a launch with a ramp-up and a tail, and one GEMM over the concatenated weight does
the same work in one launch (benchmarks/NOTES.md: BERT-base and ViT-B/16 on the H100,
merged by the merge_projections pass). Here the merge is a lowering rewrite, like the
decode rewrites: it works on a copy of the program made for Inductor, so the program the
passes, the anatomy, the artifact's portable programs and the lowering check see keeps
q, k and v apart. The concatenated weights belong to that copy alone (nothing is added to
or dropped from the modules it shares with the program); they hold the merged weights a
second time beside the program's own, which is why it applies to forward programs only:
an LM's prefill and decode programs share their weights with each other, and its decode
step gained nothing from merged dense GEMVs (merge_projections' note).

Targets ask for it with `merge_gemms` (compiler/targets.py).
"""

from __future__ import annotations

import copy

import torch.fx as fx

from optc.compiler.sibling_linears import DENSE, concatenated, merge_group, sibling_groups

# As merge_projections' default: q/k/v (3) and gate/up (2) fit with room to spare.
MAX_GROUP = 8
MERGED_PREFIX = "merged_gemm_"  # the copy's own weights: merged_gemm_0, merged_gemm_1, ...


def _register_on_copy(gm: fx.GraphModule, targets: list[str], dim: int) -> str:
    """The concatenation as a parameter of the copy's root (a module the program
    does not share), numbered in graph order so a load names it as the compile did."""
    name = f"{MERGED_PREFIX}{sum(1 for n, _ in gm.named_parameters(recurse=False) if n.startswith(MERGED_PREFIX))}"
    gm.register_parameter(name, concatenated(gm, targets, dim))
    return name


def use_merged_gemms(gm: fx.GraphModule, tolerance: dict) -> tuple[fx.GraphModule, int]:
    """A copy of `gm` whose dense sibling linears run as one linear each, and how many
    groups it merged; `gm` itself when there are none. Each group is checked against
    its parts on a random input (CompileError beyond `tolerance`)."""
    if not sibling_groups(gm, DENSE, MAX_GROUP):
        return gm, 0
    work = fx.GraphModule(gm, copy.deepcopy(gm.graph))  # fresh containers over the shared tensors
    work.meta.update(gm.meta)
    groups = sibling_groups(work, DENSE, MAX_GROUP)
    for members in groups:
        merge_group(work, members, DENSE[members[0].target], _register_on_copy, tolerance,
                    "merge_gemms", "lower without it: target.merge_gemms=false")
    work.graph.eliminate_dead_code()
    rewritten = fx.GraphModule(work, work.graph)  # holds only what the merged graph reads
    rewritten.meta.update(gm.meta)
    return rewritten, len(groups)
