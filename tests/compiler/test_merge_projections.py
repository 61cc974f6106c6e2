"""merge_projections: q/k/v and gate/up (and sparse_linear siblings) become one op each,
the function is unchanged (checked by the runner and against the unmerged programs),
and the programs re-export."""

import torch

from optc.compiler import capture, pipeline
from optc.compiler.calibration import CalibrationContext
from optc.compiler.codegen.lowering import reset_state

aten = torch.ops.aten


def _run(captured, sets, calib=None):
    gms = {n: capture.graph_module(ep) for n, ep in captured.programs.items()}
    config = pipeline.resolve("default", sets)
    report = pipeline.run(gms, "prefill", config,
                          (lambda gm: CalibrationContext("causal-lm", gm, calib)) if calib else None,
                          log=lambda m: None, check_inputs=captured.example_inputs)
    return gms, report[-1]


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def _decode(gms, ids):
    reset_state(gms["decode"])
    return gms["decode"](input_ids=ids, cache_position=torch.tensor([3]))


def test_dense_merge_is_lossless_and_reexports(llama_captured):
    _, captured = llama_captured
    plain, off = _run(captured, {})
    merged, entry = _run(captured, {"merge_projections": {"ops": "all"}})
    # By default only sparse siblings merge, and a dense model has none.
    assert not off["applied"] and "ops=all" in off["reason"] and entry["applied"]
    for name in ("prefill", "decode"):
        prog = entry["programs"][name]
        # 4 blocks: q/k/v (3) and gate/up (2) each become one linear.
        assert prog["merged_groups"] == {"linear": 8} and prog["linears_merged"] == 20
        assert prog["lossless_check"]["max_rel_err"] <= 1e-4
        assert prog["before"]["params"] == prog["after"]["params"]
        assert _count(merged[name], aten.linear.default) == _count(plain[name], aten.linear.default) - 12
    ids = torch.randint(0, 256, (1, 1), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_decode(merged, ids), _decode(plain, ids), rtol=1e-5, atol=1e-5)
    for name, gm in merged.items():
        capture.reexport(gm, captured.example_inputs[name], captured.dynamic_shapes[name], what=name)


def test_sparse_siblings_merge(llama_captured):
    _, captured = llama_captured
    g = torch.Generator().manual_seed(5)
    calib = [((), {"input_ids": x, "cache_position": torch.arange(24)})
             for x in [torch.randint(0, 256, (1, 24), generator=g) for _ in range(2)]]
    teal = {"method": "teal", "sparsity": 0.5, "kernels": "sparse", "allocation": "uniform"}
    plain, _ = _run(captured, {"sparsify_activations": teal, "merge_projections": {"enabled": False}}, calib)
    merged, entry = _run(captured, {"sparsify_activations": teal}, calib)  # on by default for sparse siblings
    op = torch.ops.optc.sparse_linear.default
    # Per block: q/k/v share input and threshold (3 -> 1), gate/up too (2 -> 1); o and down stay.
    assert _count(plain["decode"], op) == 7 * 4 and _count(merged["decode"], op) == 4 * 4
    prog = entry["programs"]["decode"]
    assert prog["merged_groups"] == {"sparse_linear": 8} and prog["group_check_max_rel_err"] <= 1e-4
    assert "skipped" in prog["lossless_check"]  # thresholded program: checked per group instead
    ids = torch.randint(0, 256, (1, 1), generator=g)
    torch.testing.assert_close(_decode(merged, ids), _decode(plain, ids), rtol=1e-5, atol=1e-5)
