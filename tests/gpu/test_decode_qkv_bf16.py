"""optc::decode_qkv's kernel on the GPU in bf16, against HF Llama's RMSNorm, projections
and rotary in fp64 on the same bf16 inputs: Llama-1B's and Llama-3.1-8B's shapes with
the target's tile, and the op compiled by Inductor with the cache write after it, as
the decode_qkv rewrite leaves it in a decode step."""

import pytest
import torch

from bf16_checks import _needs_cuda, assert_bf16_close, launched  # noqa: F401 (fixtures)

from optc.compiler.codegen import qkv_ops  # noqa: F401  (registers optc::decode_qkv)
from optc.compiler.codegen.kernels.configs import target_for_device
from optc.compiler.codegen.kernels.decode_qkv import decode_qkv, default_qkv_tile

pytestmark = pytest.mark.gpu
KERNELS = ("decode_qkv_kernel",)  # read by test_kernels_covered.py
EPS = 1e-5


def _case(K, Hq, Hkv, D, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to("cuda", torch.bfloat16)

    freqs = 17.0 / 10000 ** (torch.arange(0, D, 2).double() / D)
    emb = torch.cat([freqs, freqs])
    cos, sin = (t.to("cuda", torch.bfloat16).view(1, 1, 1, D) for t in (emb.cos(), emb.sin()))
    return (rnd(1, 1, K), rnd(K), rnd(Hq * D, K, scale=K ** -0.5), rnd(Hkv * D, K, scale=K ** -0.5),
            rnd(Hkv * D, K, scale=K ** -0.5), cos, sin)


def _reference(x, g, wq, wk, wv, cos, sin, D):
    x, g, wq, wk, wv, cos, sin = (t.double() for t in (x, g, wq, wk, wv, cos, sin))
    h = g * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)

    def heads(w, rotate):
        t = (h @ w.T).view(1, 1, -1, D).transpose(1, 2)
        if rotate:
            t = t * cos + torch.cat([-t[..., D // 2:], t[..., :D // 2]], dim=-1) * sin
        return t.reshape(-1)

    return torch.cat([heads(wq, True), heads(wk, True), heads(wv, False)])


@pytest.mark.parametrize("K,Hq,Hkv,D", [(2048, 32, 8, 64), (4096, 32, 8, 128), (960, 15, 5, 64)])
def test_kernel_with_the_targets_tile_computes_norm_projections_and_rotary(K, Hq, Hkv, D, launched):
    x, g, wq, wk, wv, cos, sin = _case(K, Hq, Hkv, D)
    out = decode_qkv(x, g, EPS, wq, wk, wv, cos, sin, D, default_qkv_tile(target_for_device(x.device), D // 2, K))
    assert launched == {"decode_qkv_kernel"}
    assert_bf16_close(out, _reference(x, g, wq, wk, wv, cos, sin, D))


def test_compiled_op_with_the_cache_write_after_it():
    K, Hq, Hkv, D = 2048, 32, 8, 64
    x, g, wq, wk, wv, cos, sin = _case(K, Hq, Hkv, D, seed=1)
    cache = torch.zeros(1, Hkv, 16, D, device="cuda", dtype=torch.bfloat16)
    position = torch.tensor([5], device="cuda")

    def step(x, cache):
        out = torch.ops.optc.decode_qkv(x, g, EPS, wq, wk, wv, cos, sin, D)
        k = out[Hq * D:(Hq + Hkv) * D].view(1, 1, Hkv, D).transpose(1, 2)
        return out[:Hq * D] * 2, cache.index_copy_(2, position, k)

    torch._dynamo.reset()
    q, written = torch.compile(step, fullgraph=True)(x, cache)
    ref = _reference(x, g, wq, wk, wv, cos, sin, D)
    assert_bf16_close(q, 2 * ref[:Hq * D])
    assert_bf16_close(written[0, :, 5].reshape(-1), ref[Hq * D:(Hq + Hkv) * D])
    assert torch.equal(written[:, :, :5], torch.zeros_like(written[:, :, :5]))


def test_compiled_cached_op_writes_both_caches_in_place():
    """optc::decode_qkv_cached under Inductor, as decode_qkv_cache leaves it in a decode
    step: the caches are written where they are (no copy of them is returned instead)."""
    K, Hq, Hkv, D = 2048, 32, 8, 64
    x, g, wq, wk, wv, cos, sin = _case(K, Hq, Hkv, D, seed=2)
    k_cache, v_cache = (torch.zeros(1, Hkv, 16, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    position = torch.tensor([5], device="cuda")

    def step(x):
        out = torch.ops.optc.decode_qkv_cached(x, g, EPS, wq, wk, wv, cos, sin, D, k_cache, v_cache, position)
        return out[:Hq * D] * 2

    torch._dynamo.reset()
    q = torch.compile(step, fullgraph=True)(x)
    ref = _reference(x, g, wq, wk, wv, cos, sin, D)
    assert_bf16_close(q, 2 * ref[:Hq * D])
    assert_bf16_close(k_cache[0, :, 5].reshape(-1), ref[Hq * D:(Hq + Hkv) * D])
    assert_bf16_close(v_cache[0, :, 5].reshape(-1), ref[(Hq + Hkv) * D:])
    others = torch.cat([k_cache[:, :, :5], k_cache[:, :, 6:], v_cache[:, :, :5], v_cache[:, :, 6:]], dim=2)
    assert torch.equal(others, torch.zeros_like(others))
