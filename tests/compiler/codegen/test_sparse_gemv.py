"""The compacting one-token GEMV (kernels/sparse_gemv.py), interpreted on CPU: slices,
irregular sizes, empty and full keep lists, and that it gathers exactly the active rows."""

import pytest
import torch

from optc.compiler.codegen.kernels.configs import GemvConfig, choose_slice, sparse_linear_target
from optc.compiler.codegen.kernels.sparse_linear import sparse_linear

from kernel_checks import TOL, rel_err
from test_sparse_linear import make_case, reference64

# Tiny tiles: 8..16-channel slices and 4-row trips, so small shapes span many slices
# and trips end part-way through a tile.
SMALL = GemvConfig(block_n=16, block_k=4, num_warps=1, min_slice=8, max_slice=16)
SMALL_ONE_TRIP_AT_A_TIME = GemvConfig(block_n=16, block_k=4, num_warps=1, min_slice=8, max_slice=16, prefetch=False)
BOTH_LOOPS = pytest.mark.parametrize("cfg", [SMALL, SMALL_ONE_TRIP_AT_A_TIME], ids=["prefetch", "no_prefetch"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k,n", [(37, 29), (64, 16), (130, 70), (8, 3)])
@pytest.mark.parametrize("thr_kind", ["0d", "per_channel"])
@pytest.mark.parametrize("with_bias", [False, True])
@BOTH_LOOPS
def test_matches_reference(dtype, k, n, thr_kind, with_bias, cfg, poison_empty):
    x, wt, thr, bias = make_case(1, k, n, dtype, thr_kind, with_bias, seed=k + n)
    y = sparse_linear(x, wt, thr, bias, gemv=cfg)
    assert torch.isfinite(y).all()
    assert rel_err(y, reference64(x, wt, thr, bias)) < TOL[dtype]


@BOTH_LOOPS
def test_nothing_kept_gives_bias_and_everything_kept_is_dense(cfg, poison_empty):
    x, wt, _, bias = make_case(1, 70, 33, torch.float16, "0d", True, seed=5)
    y0 = sparse_linear(x, wt, torch.tensor(1e9), bias, gemv=cfg)
    assert torch.equal(y0, bias.reshape(1, -1))
    # A negative threshold keeps every real channel, never the padding of the last slice.
    y1 = sparse_linear(x, wt, torch.tensor(-1.0), bias, gemv=cfg)
    dense = (x.double() @ wt.double() + bias.double()).to(x.dtype)
    assert rel_err(y1, dense) < TOL[torch.float16]


@BOTH_LOOPS
def test_gathers_exactly_the_active_rows(cfg, record_loads):
    x, wt, thr, bias = make_case(1, 90, 40, torch.float16, "per_channel", True, seed=11, sparsity=0.7)
    y = sparse_linear(x, wt, thr, bias, gemv=cfg)
    active = (x.float().abs() > thr).any(dim=0)
    assert 0 < active.sum() < 90
    assert torch.equal(record_loads.rows_read(wt), active)
    assert rel_err(y, reference64(x, wt, thr, bias)) < TOL[torch.float16]


def test_leading_dims_use_the_gemv_for_one_token(poison_empty):
    x, wt, thr, bias = make_case(1, 50, 20, torch.float32, "0d", False, seed=2, lead=(1, 1))
    y = sparse_linear(x, wt, thr, bias, gemv=SMALL)
    assert y.shape == (1, 1, 20)
    assert rel_err(y, reference64(x, wt, thr, bias)) < TOL[torch.float32]


def test_slice_policy():
    h100 = sparse_linear_target("h100")
    cfg = GemvConfig(block_n=128, block_k=64, num_warps=4, min_slice=64, max_slice=1024)
    for n, k in [(8192, 2048), (2048, 8192), (2048, 2048), (512, 2048), (100, 37)]:
        s = choose_slice(h100, cfg, n, k)
        assert s & (s - 1) == 0 and cfg.min_slice <= s <= cfg.max_slice
        # the fp32 partials stay under the workspace cap unless the minimum slice forces more
        slices = -(-k // s)
        assert slices * n * 8 <= h100.workspace_fraction * k * n * 2 or s == cfg.min_slice
