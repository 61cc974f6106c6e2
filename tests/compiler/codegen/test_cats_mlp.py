"""optc::cats_gate_up: the fused CATS kernel (interpreted, CPU) against an fp64
reference, composition with sparse_linear for the down projection, and export."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel_checks import TOL, assert_matches, rel_err

from optc.compiler.codegen import ops
from optc.compiler.codegen.kernels.cats_mlp import cats_gate_up
from optc.compiler.codegen.kernels.sparse_linear import prepare_weight, sparse_linear
from cats_thresholds import separated_threshold, silu_gate  # noqa: E402


def make_case(m, h, i, dtype, seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*(lead or (m,)), h, generator=g).to(dtype)
    w_gate = (torch.randn(i, h, generator=g) / math.sqrt(h)).to(dtype)
    w_up = (torch.randn(i, h, generator=g) / math.sqrt(h)).to(dtype)
    return x, w_gate, w_up


def reference64(x, w_gate, w_up, t):
    return ops.cats_gate_up_reference(x.double(), w_gate.double(), w_up.double(), t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("per_channel", [False, True])
def test_matches_reference(dtype, m, per_channel, poison_empty):
    x, wg, wu = make_case(m, 37, 45, dtype, seed=m)
    t = separated_threshold(x, wg, 0.5, per_channel, seed=m)
    h = cats_gate_up(x, wg, wu, t)
    ref = reference64(x, wg, wu, t)
    assert h.shape == (m, 45) and h.dtype == dtype and torch.isfinite(h).all()
    assert rel_err(h, ref) < TOL[dtype]
    # The zero pattern is CATS's per-token mask, not the union over tokens.
    assert torch.equal(h == 0, ref == 0)
    assert 0 < (ref == 0).float().mean() < 1


@pytest.mark.parametrize("m", [1, 20])
def test_leading_dims_and_token_blocks(m, poison_empty):
    x, wg, wu = make_case(0, 24, 40, torch.float32, lead=(m, 2))
    t = separated_threshold(x.reshape(-1, 24), wg, 0.3, False)
    h = cats_gate_up(x, wg, wu, t)
    assert h.shape == (m, 2, 40)
    assert rel_err(h, reference64(x, wg, wu, t)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 16])
def test_all_inactive_and_all_active(dtype, m, poison_empty):
    x, wg, wu = make_case(m, 29, 31, dtype)
    wu_nan = torch.full_like(wu, float("nan"))  # no W_up row may be read
    h = cats_gate_up(x, wg, wu_nan, torch.tensor(float("inf")))
    assert torch.equal(h, torch.zeros_like(h))
    h = cats_gate_up(x, wg, wu, torch.tensor(-1.0))
    dense = silu_gate(x, wg) * (x.double() @ wu.double().t())
    assert rel_err(h, dense) < TOL[dtype]


@pytest.mark.parametrize("m", [1, 3, 16])
def test_reads_gate_fully_and_only_kept_up_rows(m, record_loads):
    x, wg, wu = make_case(m, 40, 48, torch.float16, seed=6)
    t = separated_threshold(x, wg, 0.9 if m == 16 else 0.6, False)
    h = cats_gate_up(x, wg, wu, t)
    kept = (silu_gate(x, wg).abs() > t.double()).any(dim=0)
    assert 0 < kept.sum() < 48
    assert record_loads.rows_read(wg).all()
    assert torch.equal(record_loads.rows_read(wu), kept)
    assert rel_err(h, reference64(x, wg, wu, t)) < TOL[torch.float16]


@pytest.mark.parametrize("target", ["h100", "h200"])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_gpu_tiles_under_interpreter(target, m, poison_empty):
    x, wg, wu = make_case(m, 100, 70, torch.float16, seed=2)
    t = separated_threshold(x, wg, 0.5, True)
    h = cats_gate_up(x, wg, wu, t, target=target)
    assert rel_err(h, reference64(x, wg, wu, t)) < TOL[torch.float16]


def test_sparse_mlp_composition(poison_empty):
    """CATS MLP = down(cats_gate_up(x)) with the down projection as sparse_linear at
    threshold 0, which reads only the rows of W_down^T whose channel of h is nonzero."""
    x, wg, wu = make_case(3, 32, 48, torch.float32, seed=9)
    w_down = torch.randn(32, 48) / math.sqrt(48)
    t = separated_threshold(x, wg, 0.7, False)
    h = cats_gate_up(x, wg, wu, t)
    wdt = prepare_weight(w_down).clone()
    dead = (h == 0).all(dim=0)
    assert dead.any()
    wdt[dead] = float("nan")  # rows of channels that are zero for every token: unread
    y = sparse_linear(h, wdt, torch.tensor(0.0))
    ref = reference64(x, wg, wu, t) @ w_down.double().t()
    assert torch.isfinite(y).all() and rel_err(y, ref) < 1e-5


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    m=st.integers(1, 18),
    h=st.integers(1, 60),
    i=st.integers(1, 60),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    per_channel=st.booleans(),
    sparsity=st.sampled_from([0.0, 0.5, 0.9]),
)
def test_fuzz_shapes(m, h, i, dtype, per_channel, sparsity, poison_empty):
    x, wg, wu = make_case(m, h, i, dtype, seed=h * i)
    t = separated_threshold(x, wg, sparsity, per_channel)
    out = cats_gate_up(x, wg, wu, t)
    ref = reference64(x, wg, wu, t)
    assert out.shape == (m, i)
    assert_matches(out, ref, dtype)


def test_host_wrapper_rejects_bad_inputs():
    x, wg, wu = make_case(2, 16, 8, torch.float32)
    t = torch.tensor(0.1)
    with pytest.raises(AssertionError, match="must both be"):
        cats_gate_up(x, wg, wu[:4], t)
    with pytest.raises(AssertionError, match="contiguous"):
        cats_gate_up(x, wg.t().contiguous().t(), wu, t)
    with pytest.raises(AssertionError, match="dtype"):
        cats_gate_up(x, wg.half(), wu.half(), t)
    with pytest.raises(AssertionError, match="threshold must have"):
        cats_gate_up(x, wg, wu, torch.ones(16))


def test_op_schema():
    schema = str(torch.ops.optc.cats_gate_up.default._schema)
    assert schema == "optc::cats_gate_up(Tensor x, Tensor w_gate, Tensor w_up, Tensor threshold) -> Tensor"


class _CatsMLP(torch.nn.Module):
    def __init__(self, h, i, t):
        super().__init__()
        _, wg, wu = make_case(1, h, i, torch.float32, seed=4)
        self.register_buffer("w_gate", wg)
        self.register_buffer("w_up", wu)
        self.register_buffer("threshold", t)

    def forward(self, x):
        return torch.ops.optc.cats_gate_up(x, self.w_gate, self.w_up, self.threshold)


def test_export_runs_on_cpu():
    x = torch.randn(2, 5, 24)
    _, wg, _ = make_case(1, 24, 40, torch.float32, seed=4)
    t = separated_threshold(x.reshape(-1, 24), wg, 0.5, False)
    mod = _CatsMLP(24, 40, t).eval()
    ep = torch.export.export(mod, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch", max=32)}})
    assert torch.ops.optc.cats_gate_up.default in [n.target for n in ep.graph.nodes]
    y = ep.module()(x)
    assert y.shape == (2, 5, 40)
    assert rel_err(y, reference64(x, mod.w_gate, mod.w_up, t)) < 1e-5
