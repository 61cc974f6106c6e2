"""prune_heads on a prefill program exported with a dynamic sequence length: the shape
metadata of the narrowed attention is recomputed on the graph's fake tensors, whose
sequence dimension is symbolic. torch 2.11's C++ `linear` (through `matmul`) asks such a
tensor for its numel and raises ("Cannot call numel() on tensor with symbolic
sizes/strides"; a search on an H200 hit it in prune_heads' planning); later versions
read it symbolically. The test puts a C++ `matmul` that raises the same way in place
while the pass runs, so it fails on any version if the pass runs the C++ matmul on a
symbolic tensor instead of the Python dispatcher's decomposition, as torch.export does."""

import warnings

import pytest
import torch

from optc.compiler import capture
from pass_helpers import lm_calib, run_pass


def _matmul_without_symbolic_sizes(x, w):
    """at::native::matmul as torch 2.11 runs it (under linear, among others): a tensor
    with a symbolic size raises; the Python dispatcher's decomposition of matmul, which
    torch.export runs, is not this kernel."""
    if any(isinstance(s, torch.SymInt) for t in (x, w) for s in t.shape):
        raise RuntimeError("Cannot call numel() on tensor with symbolic sizes/strides")
    return (x.unsqueeze(-1) * w.unsqueeze(-3)).sum(-2) if x.dim() > 1 else (x.unsqueeze(-1) * w).sum(-2)


@pytest.fixture
def matmul_without_symbolic_sizes():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # overriding an aten kernel warns once
        with torch.library._scoped_library("aten", "IMPL") as lib:
            lib.impl("matmul", _matmul_without_symbolic_sizes, "CompositeImplicitAutograd")
            yield


def test_the_prefill_metadata_is_symbolic(llama_captured):
    _, captured = llama_captured
    gm = capture.graph_module(captured.programs["prefill"])
    linear = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default)
    assert any(isinstance(s, torch.SymInt) for s in linear.meta["val"].shape)


def test_narrowing_never_hands_linear_a_symbolic_tensor(llama_captured, matmul_without_symbolic_sizes):
    _, captured = llama_captured
    # The plan's calibration losses (no repair, then bias) narrow copies of the prefill
    # program, as the search's trial did; then the pass narrows both programs.
    gms, entry = run_pass(captured, "prune_heads", {"ratio": 0.5, "allocation": "uniform", "repair": "bias"},
                          lm_calib())
    assert entry["applied"], entry["reason"]
    ids = torch.randint(0, 256, (1, 12))
    out = gms["prefill"](input_ids=ids, cache_position=torch.arange(12))
    assert torch.isfinite(out).all()
    linears = [n for n in gms["prefill"].graph.nodes if n.target is torch.ops.aten.linear.default]
    q = linears[0]
    assert q.meta["val"].shape[-1] == q.args[1].meta["val"].shape[0] < 64  # q_proj's rows cut, metadata too
    assert isinstance(q.meta["val"].shape[1], torch.SymInt)
