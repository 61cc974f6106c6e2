"""optc::sparse_linear's kernels on the GPU in bf16: the masked tile kernel
(sparse_linear_kernel: the one-token GEMV tile, the large-weight GEMV tile, the tl.dot
tile, split K) and the compacting one-token GEMV (sparse_gemv_kernel, selectable with
gemv=), against an fp64 reference of the same bf16 inputs."""

import math

import pytest
import torch

from bf16_checks import _needs_cuda, assert_bf16_close, launched  # noqa: F401 (fixtures)

from optc.compiler.codegen import ops
from optc.compiler.codegen.kernels.configs import GemvConfig
from optc.compiler.codegen.kernels.sparse_linear import prepare_weight, sparse_linear

pytestmark = pytest.mark.gpu
KERNELS = ("sparse_linear_kernel", "sparse_gemv_kernel")  # read by test_kernels_covered.py


def make_case(m, k, n, thr_kind="0d", with_bias=True, seed=0, sparsity=0.5, lead=None):
    """bf16 x, weight_t [K, N], bias on CUDA; a threshold at the sparsity-quantile of |x|
    (one value, or spread per channel)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*(lead or (m,)), k, generator=g)
    w = torch.randn(n, k, generator=g) / math.sqrt(k)
    bias = torch.randn(n, generator=g) if with_bias else None
    q = torch.quantile(x.abs().flatten()[:2**20], sparsity).item()
    thr = torch.tensor(q) if thr_kind == "0d" else torch.rand(k, generator=g) * 2 * q
    cuda = dict(device="cuda", dtype=torch.bfloat16)
    return (x.to(**cuda), prepare_weight(w.to(**cuda)), thr.cuda(),
            None if bias is None else bias.to(**cuda))


def reference64(x, weight_t, thr, bias):
    # The keep mask is decided on the bf16 values in fp32, as the kernel decides it.
    return ops.sparse_linear_reference(x.double(), weight_t.double(), thr, None if bias is None else bias.double())


@pytest.mark.parametrize("m, k, n", [
    (1, 2048, 512),     # one token: the masked GEMV tile (BLOCK_M = 1), split K
    (1, 4096, 8192),    # one token, >= 32M weights: the large-weight GEMV tile
    (5, 1000, 1000),    # a few tokens padded to a 16-row tl.dot tile; K and N off the tile sizes
    (16, 2048, 2048),   # one full tl.dot tile of tokens
    (100, 512, 384),    # tokens spanning several tiles along the grid's third axis
])
@pytest.mark.parametrize("thr_kind", ["0d", "per_channel"])
def test_matches_reference(m, k, n, thr_kind, launched):
    x, wt, thr, bias = make_case(m, k, n, thr_kind, with_bias=thr_kind == "0d", seed=m + k)
    y = sparse_linear(x, wt, thr, bias)
    assert launched == {"sparse_linear_kernel"}
    assert_bf16_close(y, reference64(x, wt, thr, bias))


@pytest.mark.parametrize("split_k", [1, 3, 8])
def test_forced_split_k(split_k, launched):
    x, wt, thr, bias = make_case(4, 1536, 640, seed=split_k)
    y = sparse_linear(x, wt, thr, bias, split_k=split_k)
    assert launched == {"sparse_linear_kernel"}
    assert_bf16_close(y, reference64(x, wt, thr, bias))


def test_leading_dims_and_bf16_threshold(launched):
    x, wt, thr, bias = make_case(1, 768, 256, seed=3, lead=(2, 7))
    y = sparse_linear(x, wt, thr.to(torch.bfloat16), bias)
    assert y.shape == (2, 7, 256)
    assert_bf16_close(y, reference64(x, wt, thr.to(torch.bfloat16), bias))


def test_nothing_kept_gives_the_bias_and_everything_kept_is_dense(launched):
    x, wt, _, bias = make_case(1, 2048, 512, seed=7)
    y0 = sparse_linear(x, wt, torch.tensor(1e9, device="cuda"), bias)
    assert torch.equal(y0, bias.reshape(1, -1))
    y1 = sparse_linear(x, wt, torch.tensor(-1.0, device="cuda"), bias)
    assert_bf16_close(y1, x.double() @ wt.double() + bias.double())


# Hopper-sized compacting GEMV configs: 128 outputs per program, 32 rows per trip.
GEMV = [GemvConfig(block_n=128, block_k=32, num_warps=4, min_slice=128, max_slice=1024, prefetch=p)
        for p in (True, False)]


@pytest.mark.parametrize("gemv", GEMV, ids=["prefetch", "no_prefetch"])
@pytest.mark.parametrize("k, n", [(2048, 8192), (8192, 2048), (1000, 300)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_compacting_gemv_matches_reference(gemv, k, n, sparsity, launched):
    x, wt, thr, bias = make_case(1, k, n, "per_channel", seed=k, sparsity=sparsity)
    y = sparse_linear(x, wt, thr, bias, gemv=gemv)
    assert launched == {"sparse_gemv_kernel"}
    assert_bf16_close(y, reference64(x, wt, thr, bias))


@pytest.mark.parametrize("gemv", GEMV, ids=["prefetch", "no_prefetch"])
def test_compacting_gemv_edges(gemv, launched):
    x, wt, _, bias = make_case(1, 1000, 300, seed=9)
    y0 = sparse_linear(x, wt, torch.tensor(1e9, device="cuda"), bias, gemv=gemv)
    assert torch.equal(y0, bias.reshape(1, -1))
    # A negative threshold keeps every real channel, never the padding of the last slice.
    y1 = sparse_linear(x, wt, torch.tensor(-1.0, device="cuda"), bias, gemv=gemv)
    assert_bf16_close(y1, x.double() @ wt.double() + bias.double())
    assert launched == {"sparse_gemv_kernel"}
