"""optc::sparse_linear: the Triton kernel (interpreted, CPU) against an fp64 reference,
its configs, and the registered op through torch.export."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel_checks import TOL, assert_matches, rel_err

from optc.compiler.codegen import ops
from optc.compiler.codegen.kernels import configs
from optc.compiler.codegen.kernels.sparse_linear import prepare_weight, sparse_linear


def make_case(m, k, n, dtype, thr_kind, with_bias, seed=0, sparsity=0.5, lead=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*(lead or (m,)), k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / math.sqrt(k)).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    # Thresholds at the sparsity-quantile of |x| (per layer) or spread per channel.
    q = torch.quantile(x.float().abs().flatten(), sparsity).item()
    if thr_kind == "0d":
        thr = torch.tensor(q)
    elif thr_kind == "1elem":
        thr = torch.tensor([q], dtype=torch.float16)
    else:
        thr = torch.rand(k, generator=g) * 2 * q
    return x, prepare_weight(w), thr, bias


def reference64(x, weight_t, thr, bias):
    return ops.sparse_linear_reference(
        x.double(), weight_t.double(), thr, None if bias is None else bias.double()
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("thr_kind", ["0d", "1elem", "per_channel"])
def test_matches_reference(dtype, m, thr_kind, poison_empty):
    with_bias = thr_kind != "1elem"
    x, wt, thr, bias = make_case(m, 37, 45, dtype, thr_kind, with_bias, seed=m)
    y = sparse_linear(x, wt, thr, bias)
    assert y.shape == (m, 45) and y.dtype == dtype
    assert torch.isfinite(y).all()
    assert rel_err(y, reference64(x, wt, thr, bias)) < TOL[dtype]


@pytest.mark.parametrize("split_k", [1, 2, 3, 4])
@pytest.mark.parametrize("m", [1, 20])
def test_split_k_and_token_blocks(split_k, m, poison_empty):
    # K=70 spans 5 BLOCK_K=16 chunks, so splits are uneven; m=20 spans two 16-token tiles.
    x, wt, thr, bias = make_case(m, 70, 33, torch.float32, "0d", True, seed=split_k)
    y = sparse_linear(x, wt, thr, bias, split_k=split_k)
    assert torch.isfinite(y).all()
    assert rel_err(y, reference64(x, wt, thr, bias)) < 1e-5


def test_leading_dims_and_strided_x(poison_empty):
    x, wt, thr, bias = make_case(0, 24, 40, torch.float32, "per_channel", False, lead=(2, 3))
    y = sparse_linear(x, wt, thr, bias)
    assert y.shape == (2, 3, 40)
    assert rel_err(y, reference64(x, wt, thr, bias)) < 1e-5
    xt = torch.randn(24, 5).t()  # [5, 24] with stride (1, 5): not row-contiguous
    y = sparse_linear(xt, wt, thr)
    assert rel_err(y, reference64(xt, wt, thr, None)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_all_inactive_gives_bias_exactly(dtype, m, poison_empty):
    x, wt, thr, bias = make_case(m, 29, 31, dtype, "0d", True)
    wt = torch.full_like(wt, float("nan"))  # no row may be read
    y = sparse_linear(x, wt, torch.tensor(float("inf")), bias)
    assert torch.equal(y, bias.expand(m, -1))
    y = sparse_linear(x, wt, torch.tensor(1e9), None)
    assert torch.equal(y, torch.zeros_like(y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 16])
def test_all_active_is_dense(dtype, m, poison_empty):
    x, wt, _, bias = make_case(m, 29, 31, dtype, "0d", True)
    x[0, :5] = 0  # zeros are "active" under a negative threshold; they still add 0
    y = sparse_linear(x, wt, torch.tensor(-1.0), bias)
    dense = x.double() @ wt.double() + bias.double()
    assert rel_err(y, dense) < TOL[dtype]


@pytest.mark.parametrize("m", [1, 3, 16])
def test_inactive_rows_are_not_read(m, poison_empty):
    """NaN weights in rows whose channel is inactive for every token must not reach y:
    the kernel's masked loads skip them (NaN * 0 would be NaN)."""
    x, wt, thr, bias = make_case(m, 50, 40, torch.float16, "0d", True, seed=7)
    dead = torch.arange(50) % 3 == 0
    x[:, dead] = 0
    wt_nan = wt.clone()
    wt_nan[dead] = float("nan")
    y = sparse_linear(x, wt_nan, thr, bias)
    assert torch.isfinite(y).all()
    assert rel_err(y, reference64(x, wt, thr, bias)) < TOL[torch.float16]


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("split_k", [None, 1])
@pytest.mark.parametrize("n", [40, 48])  # 48: a multiple of the tile's BLOCK_N (no column mask)
def test_reads_exactly_the_active_rows(m, split_k, n, record_loads):
    """The weight rows loaded are the union over tokens of the active channels (one
    token tile here), and nothing else."""
    x, wt, thr, bias = make_case(m, 60, n, torch.float16, "per_channel", True, seed=11, sparsity=0.8)
    y = sparse_linear(x, wt, thr, bias, split_k=split_k)
    active = (x.float().abs() > thr).any(dim=0)
    assert 0 < active.sum() < 60
    assert torch.equal(record_loads.rows_read(wt), active)
    assert rel_err(y, reference64(x, wt, thr, bias)) < TOL[torch.float16]


@pytest.mark.parametrize("target", ["h100", "h200"])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_gpu_tiles_under_interpreter(target, m, poison_empty):
    """The GPU targets' real tile shapes and split-K choice, on an irregular shape."""
    x, wt, thr, bias = make_case(m, 100, 150, torch.float16, "per_channel", True, seed=3)
    y = sparse_linear(x, wt, thr, bias, target=target)
    assert rel_err(y, reference64(x, wt, thr, bias)) < TOL[torch.float16]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    m=st.integers(1, 18),
    k=st.integers(1, 70),
    n=st.integers(1, 70),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    thr_kind=st.sampled_from(["0d", "1elem", "per_channel"]),
    with_bias=st.booleans(),
    sparsity=st.sampled_from([0.0, 0.5, 0.9]),
)
def test_fuzz_shapes(m, k, n, dtype, thr_kind, with_bias, sparsity, poison_empty):
    x, wt, thr, bias = make_case(m, k, n, dtype, thr_kind, with_bias, seed=k * n, sparsity=sparsity)
    y = sparse_linear(x, wt, thr, bias)
    ref = reference64(x, wt, thr, bias)
    assert y.shape == (m, n)
    assert_matches(y, ref, dtype)


def test_host_wrapper_rejects_bad_inputs():
    x, wt, thr, bias = make_case(2, 16, 8, torch.float32, "0d", True)
    with pytest.raises(AssertionError, match="contiguous"):
        sparse_linear(x, wt.t().contiguous().t(), thr)
    with pytest.raises(AssertionError, match="dtype"):
        sparse_linear(x.half(), wt, thr)
    with pytest.raises(AssertionError, match="features"):
        sparse_linear(x[:, :8], wt, thr)
    with pytest.raises(AssertionError, match="threshold must have"):
        sparse_linear(x, wt, torch.ones(3))


def test_prepare_weight_layout():
    w = torch.randn(6, 4)
    wt = prepare_weight(w)
    assert wt.shape == (4, 6) and wt.is_contiguous() and torch.equal(wt, w.t())


def test_split_k_policy():
    h100 = configs.sparse_linear_target("h100")
    one = configs.pick_bucket(h100.buckets, 1)
    # Small N: split K to fill the 132 SMs; large N fills them without splitting much.
    small = configs.choose_split_k(h100, one, 1, 512, 2048, 2)
    large = configs.choose_split_k(h100, one, 1, 8192, 2048, 2)
    assert small > large >= 1
    assert small <= h100.max_split_k
    # The fp32 partials never cost more than workspace_fraction of the weight bytes.
    cfg16 = configs.pick_bucket(h100.buckets, 16)
    split = configs.choose_split_k(h100, cfg16, 16, 8192, 2048, 2)
    assert split * 16 * 8192 * 4 * 2 <= h100.workspace_fraction * 2048 * 8192 * 2
    assert configs.pick_bucket(h100.buckets, 2).block_m == 16
    assert configs.pick_bucket(h100.buckets, 100).block_m == 16


def test_large_weights_get_their_own_one_token_tile():
    """h100: Llama-3.1-8B's MLP weights (>= 32M elements) use the large GEMV tile at one
    token, with the split the policy gives (measured best: 2 for 4096->14336, 8 for
    14336->4096); Llama-1B's keep the bucket tile, and 16 tokens always do."""
    from optc.compiler.codegen.kernels.sparse_linear import plan

    h100 = configs.sparse_linear_target("h100")
    large = h100.large_gemv[1]
    assert large != h100.buckets[0][1]
    assert plan(h100, 1, 14336, 4096, 2)[:2] == (large, 2)  # (M, N, K): 4096 -> 14336
    assert plan(h100, 1, 4096, 14336, 2)[:2] == (large, 8)
    assert plan(h100, 1, 8192, 2048, 2)[0] == h100.buckets[0][1]
    assert plan(h100, 16, 14336, 4096, 2)[0] == h100.buckets[1][1]
    assert configs.sparse_linear_target("cpu").large_gemv is None


@pytest.mark.parametrize("split_k", [1, 3])
def test_large_tile_under_interpreter(split_k, poison_empty):
    """The h100 large-weight tile itself (64 x 64), run on an irregular shape."""
    large = configs.sparse_linear_target("h100").large_gemv[1]
    x, wt, thr, bias = make_case(1, 200, 150, torch.float16, "per_channel", True, seed=9)
    y = sparse_linear(x, wt, thr, bias, config=large, split_k=split_k)
    assert rel_err(y, reference64(x, wt, thr, bias)) < TOL[torch.float16]


def test_use_sparse_kernel_crossover():
    c = configs.crossover_tokens("h100")
    assert c >= 1
    assert ops.use_sparse_kernel(1, "h100")
    assert ops.use_sparse_kernel(c, "h100") and not ops.use_sparse_kernel(c + 1, "h100")
    assert not ops.use_sparse_kernel(0, "h100")
    assert not ops.use_sparse_kernel(1, "cpu")  # the CPU op is the dense reference
    with pytest.raises(ValueError, match="unknown target"):
        ops.use_sparse_kernel(1, "tpu")


def test_op_schema():
    schema = str(torch.ops.optc.sparse_linear.default._schema)
    assert schema == (
        "optc::sparse_linear(Tensor x, Tensor weight_t, Tensor threshold, Tensor? bias) -> Tensor"
    )


class _Tiny(torch.nn.Module):
    def __init__(self, k, n, per_channel):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.register_buffer("weight_t", prepare_weight(torch.randn(n, k, generator=g)))
        self.register_buffer("threshold", torch.rand(k, generator=g) if per_channel else torch.tensor(0.6))
        self.bias = torch.nn.Parameter(torch.randn(n, generator=g), requires_grad=False)

    def forward(self, x):
        return torch.ops.optc.sparse_linear(torch.relu(x) - 0.1, self.weight_t, self.threshold, self.bias)


@pytest.mark.parametrize("per_channel", [False, True])
def test_export_runs_on_cpu(per_channel):
    mod = _Tiny(24, 10, per_channel).eval()
    x = torch.randn(2, 3, 24)
    seq = torch.export.Dim("seq", min=1, max=64)
    ep = torch.export.export(mod, (x,), dynamic_shapes={"x": {1: seq}})
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.optc.sparse_linear.default in targets
    for xi in (x, torch.randn(2, 7, 24)):
        y = ep.module()(xi)
        ref = reference64(torch.relu(xi) - 0.1, mod.weight_t, mod.threshold, mod.bias)
        assert y.shape == (*xi.shape[:-1], 10)
        assert rel_err(y, ref) < 1e-5


def test_op_cpu_kernel_and_fake():
    x, wt, thr, bias = make_case(3, 16, 8, torch.float16, "0d", True)
    y = torch.ops.optc.sparse_linear(x, wt, thr, bias)
    assert y.dtype == torch.float16 and rel_err(y, reference64(x, wt, thr, bias)) < TOL[torch.float16]
    xm = torch.empty(5, 2, 16, device="meta", dtype=torch.bfloat16)
    ym = torch.ops.optc.sparse_linear(xm, wt.to("meta", torch.bfloat16), thr.to("meta"), None)
    assert ym.shape == (5, 2, 8) and ym.dtype == torch.bfloat16 and ym.device.type == "meta"


@pytest.mark.parametrize("block_m", [1, 16])
def test_tiled_weight_layout_reads_the_same_weights(block_m):
    """The kernel addresses weight columns through (tile stride, row stride): the [K, N]
    layout and the tiled [N/BLOCK_N, K, BLOCK_N] one
    (benchmarks/experiments/layout_probe.py) give the same result."""
    import triton

    from optc.compiler.codegen.kernels.sparse_linear import sparse_linear_kernel

    m, k, n, bn, bk = (1 if block_m == 1 else 3), 48, 64, 16, 16
    x, wt, thr, _ = make_case(m, k, n, torch.float32, "0d", False, seed=4)
    tiled = wt.reshape(k, n // bn, bn).permute(1, 0, 2).contiguous()
    ref = reference64(x, wt, thr, None)
    for w, (s_tile, s_row) in ((wt, (bn, n)), (tiled, (k * bn, bn))):
        y = torch.full((m, n), float("nan"))
        sparse_linear_kernel[(n // bn, 1, triton.cdiv(m, block_m))](
            x, w, thr, y, y, y, m, n, k, k, x.stride(0), x.stride(1), s_tile, s_row, 0, y.stride(0), 0, 0,
            HAS_BIAS=False, DIRECT_OUT=True, FP32_DOT=True, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk,
            EVEN_N=True, num_warps=1, num_stages=1)
        assert_matches(y, ref, torch.float32)
