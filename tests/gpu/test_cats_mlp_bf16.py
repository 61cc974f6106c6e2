"""optc::cats_gate_up's fused kernel (cats_gate_up_kernel) on the GPU in bf16: the
one-token GEMV tile and the tl.dot tile, per-layer and per-channel thresholds, against
an fp64 reference of the same bf16 inputs; and the CATS MLP composed with
sparse_linear for the down projection."""

import math

import pytest
import torch

from bf16_checks import _needs_cuda, assert_bf16_close, launched  # noqa: F401 (fixtures)

from optc.compiler.codegen import ops
from optc.compiler.codegen.kernels.cats_mlp import cats_gate_up
from optc.compiler.codegen.kernels.sparse_linear import prepare_weight, sparse_linear
from cats_thresholds import separated_threshold, silu_gate  # noqa: E402

pytestmark = pytest.mark.gpu
KERNELS = ("cats_gate_up_kernel",)  # read by test_kernels_covered.py


def make_case(m, h, i, seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*(lead or (m,)), h, generator=g)
    w_gate = torch.randn(i, h, generator=g) / math.sqrt(h)
    w_up = torch.randn(i, h, generator=g) / math.sqrt(h)
    return (t.to("cuda", torch.bfloat16) for t in (x, w_gate, w_up))


def reference64(x, w_gate, w_up, t):
    return ops.cats_gate_up_reference(x.double(), w_gate.double(), w_up.double(), t)


@pytest.mark.parametrize("m, h, i", [
    (1, 2048, 8192),   # one token: the GEMV tile (BLOCK_M = 1), Llama-1B's MLP
    (1, 576, 1536),    # one token, SmolLM2's MLP
    (7, 1000, 1000),   # a few tokens padded to a 16-row tl.dot tile; sizes off the tiles
    (40, 512, 1376),   # tokens over three tl.dot tiles
])
@pytest.mark.parametrize("per_channel", [False, True])
def test_matches_reference(m, h, i, per_channel, launched):
    x, wg, wu = make_case(m, h, i, seed=m + h)
    t = separated_threshold(x, wg, 0.5, per_channel, seed=m)
    out = cats_gate_up(x, wg, wu, t)
    assert launched == {"cats_gate_up_kernel"}
    ref = reference64(x, wg, wu, t)
    assert_bf16_close(out, ref)
    # The zeros are CATS's per-token mask, exactly (not the union over tokens).
    assert torch.equal(out == 0, ref == 0)
    assert 0.2 < (ref == 0).double().mean() < 0.8


@pytest.mark.parametrize("m", [1, 16])
def test_all_inactive_and_all_active(m, launched):
    x, wg, wu = make_case(m, 768, 2048, seed=5)
    h = cats_gate_up(x, wg, torch.full_like(wu, float("nan")), torch.tensor(float("inf"), device="cuda"))
    assert torch.equal(h, torch.zeros_like(h))  # and no W_up row was read (NaN would show)
    h = cats_gate_up(x, wg, wu, torch.tensor(-1.0, device="cuda"))
    assert_bf16_close(h, silu_gate(x, wg) * (x.double() @ wu.double().t()))


def test_leading_dims():
    x, wg, wu = make_case(0, 256, 512, lead=(3, 5))
    t = separated_threshold(x, wg, 0.3, False)
    h = cats_gate_up(x, wg, wu, t)
    assert h.shape == (3, 5, 512)
    assert_bf16_close(h, reference64(x, wg, wu, t))


@pytest.mark.parametrize("m", [1, 16])
def test_sparse_mlp_composition(m, launched):
    """CATS MLP = down(cats_gate_up(x)), the down projection as sparse_linear at
    threshold 0, which skips the rows of W_down^T whose channel of h is zero."""
    x, wg, wu = make_case(m, 576, 1536, seed=9)
    w_down = (torch.randn(576, 1536) / math.sqrt(1536)).to("cuda", torch.bfloat16)
    t = separated_threshold(x, wg, 0.7, False)
    h = cats_gate_up(x, wg, wu, t)
    y = sparse_linear(h, prepare_weight(w_down), torch.tensor(0.0, device="cuda"))
    assert launched == {"cats_gate_up_kernel", "sparse_linear_kernel"}
    # h is rounded to bf16 between the two kernels, as in the model: compare with that h.
    assert_bf16_close(y, h.double() @ w_down.double().t())
    assert_bf16_close(h, reference64(x, wg, wu, t))
