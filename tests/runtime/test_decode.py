import copy

import pytest
import torch

from optc.errors import CompileError, UsageError
from optc.compiler.capture import export_lm_programs
from optc.runtime.cache import _check_shared, cache_buffer_names, mutated_attr_names, tie_buffers
from optc.runtime.decode import StaticCacheDecoder
from optc.runtime.prefill import prefill_starts

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

B, T, L, N = 1, 6, 32, 8


def tiny_llama(device="cpu", seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval().to(device)


def greedy_full_recompute(model, prompt, n):
    """Reference: argmax loop over the eager model, no cache, full recompute each step."""
    seq = prompt
    with torch.no_grad():
        for _ in range(n):
            logits = model(seq, use_cache=False).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


@pytest.fixture(scope="module")
def lm():
    model = tiny_llama()
    prefill, decode = export_lm_programs(model, batch_size=B, prompt_len=T, max_cache_len=L)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 256, (B, T), generator=g)
    return model, prefill, decode, prompt


@pytest.fixture(scope="module")
def ref(lm):
    model, _, _, prompt = lm
    return greedy_full_recompute(model, prompt, N)


def _storages(module, names):
    out = {}
    for n in names:
        obj = module
        for part in n.split("."):
            obj = getattr(obj, part)
        out[n] = obj.untyped_storage().data_ptr()
    return out


def test_cache_names_cover_buffers_and_lifted_constants(lm):
    _, prefill, decode, _ = lm
    names = cache_buffer_names(decode)
    for i in range(2):
        for stem in ("key_cache", "value_cache", "cumulative_length"):
            assert f"{stem}_{i}" in names
    mutated = mutated_attr_names(decode)
    # The exported graph writes the cache in place; every tensor it writes is cache state.
    assert len(mutated) >= 4
    assert set(mutated) <= set(names)
    assert "model.model.rotary_emb.inv_freq" not in names


def test_tie_buffers_really_shares_storage(lm):
    _, prefill, decode, _ = lm
    a, b = copy.deepcopy(prefill), copy.deepcopy(decode)
    names = sorted(set(cache_buffer_names(a)) & set(cache_buffer_names(b)))
    before_a, before_b = _storages(a, names), _storages(b, names)
    assert all(before_a[n] != before_b[n] for n in names)  # deep copies: separate caches
    with pytest.raises(CompileError):
        _check_shared(a, b)
    rebound = tie_buffers(b, a, names)
    assert set(names) <= set(rebound)
    after_a, after_b = _storages(a, names), _storages(b, names)
    assert after_a == after_b == before_b
    _check_shared(a, b)  # no longer raises
    # A write by running one program is visible to the other.
    for t in (b.key_cache_0, b.cumulative_length_0):
        t.zero_()
    with torch.no_grad():
        a(input_ids=torch.ones(B, T, dtype=torch.long), cache_position=torch.arange(T))
    assert b.key_cache_0[:, :, :T].abs().sum() > 0
    assert int(b.cumulative_length_0) == T


def test_tie_buffers_rejects_mismatch(lm):
    _, prefill, decode, _ = lm
    a = copy.deepcopy(prefill)
    a.key_cache_0 = torch.zeros(1, 2, 3, 4)
    with pytest.raises(UsageError):
        tie_buffers(decode, a, ["key_cache_0"])
    with pytest.raises(UsageError):
        tie_buffers(decode, a, ["no_such_buffer"])


def test_generate_matches_hf_greedy(lm, ref):
    model, prefill, decode, prompt = lm
    dec = StaticCacheDecoder(prefill, decode)
    out = dec.generate(prompt, N)
    assert out.shape == (B, T + N) and out.dtype == torch.long
    assert torch.equal(out[:, :T], prompt)
    assert torch.equal(out, ref)
    with torch.no_grad():
        hf = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=N,
            min_new_tokens=N,
            do_sample=False,
            cache_implementation="dynamic",
            pad_token_id=0,
        )
    assert torch.equal(out, hf)
    assert dec.eager_steps == N - 1 and dec.graph_replays == 0


def test_untied_copies_get_tied_and_stay_correct(lm, ref):
    model, prefill, decode, prompt = lm
    p, d = copy.deepcopy(prefill), copy.deepcopy(decode)
    # Without tying, decode reads an empty cache after prefill: the tokens go wrong.
    with torch.no_grad():
        for t in cache_tensors_of(p) + cache_tensors_of(d):
            t.zero_()
        tok = p(input_ids=prompt, cache_position=torch.arange(T))[:, -1].argmax(-1, keepdim=True)
        naive = [tok]
        for j in range(N - 1):
            tok = d(input_ids=tok, cache_position=torch.tensor([T + j]))[:, -1].argmax(-1, keepdim=True)
            naive.append(tok)
    assert not torch.equal(torch.cat([prompt] + naive, 1), ref)
    dec = StaticCacheDecoder(p, d)
    assert dec.tied  # something was rebound
    assert torch.equal(dec.generate(prompt, N), ref)


def cache_tensors_of(module):
    return [t for n, t in module.named_buffers() if "cache" in n or "cumulative" in n]


def test_reset_zeroes_cache_and_second_generate_is_identical(lm):
    _, prefill, decode, prompt = lm
    dec = StaticCacheDecoder(prefill, decode)
    first = dec.generate(prompt, N)
    assert any(t.abs().sum() > 0 for t in dec.cache_tensors)
    assert int(decode.cumulative_length_0) > 0
    dec.reset()
    assert all(t.abs().sum() == 0 for t in dec.cache_tensors)
    assert int(decode.cumulative_length_0) == 0 and int(prefill.cumulative_length_1) == 0
    second = dec.generate(prompt, N)
    assert torch.equal(first, second)


def test_over_long_and_malformed_requests_raise_usage_error(lm):
    _, prefill, decode, prompt = lm
    dec = StaticCacheDecoder(prefill, decode)
    assert dec.max_cache_len == L and dec.batch_size == B
    with pytest.raises(UsageError, match="max_cache_len"):
        dec.generate(prompt, L - T + 1)
    dec.generate(prompt, L - T)  # exactly fits
    with pytest.raises(UsageError, match="max_cache_len"):
        dec.time_decode(prompt, L)
    with pytest.raises(UsageError):
        dec.generate(prompt, 0)
    with pytest.raises(UsageError, match="batch"):
        dec.generate(prompt.repeat(2, 1), 2)
    # The prefill program has a dynamic length (as capture exports it): a shorter
    # prompt is accepted and continues it.
    assert dec.generate(prompt[:, :3], 2).shape == (prompt.shape[0], 5)
    with pytest.raises(UsageError):
        dec.generate(prompt.float(), 2)


def test_prefill_starts_cover_the_prompt_with_fixed_length_calls():
    assert prefill_starts(6, 6) == [0]
    assert prefill_starts(3, 6) == [0]  # one padded call
    assert prefill_starts(12, 6) == [0, 6]
    assert prefill_starts(13, 6) == [0, 6, 7]  # the last call ends at the prompt's end
    for T in range(1, 40):
        starts = prefill_starts(T, 6)
        covered = set().union(*(range(s, s + 6) for s in starts))
        assert set(range(T)) <= covered and max(starts) + 6 == max(T, 6)


@pytest.mark.parametrize("T_prompt", [1, 4, T, 13, 18])
def test_any_prompt_length_through_a_fixed_length_prefill(lm, T_prompt):
    """Chunked (and, below T, padded) prefill at the exported length gives the tokens a
    full recompute gives, and the cache counters end at the prompt's length."""
    model, prefill, decode, _ = lm
    dec = StaticCacheDecoder(prefill, decode, prefill_len=T)
    prompt = torch.randint(0, 256, (B, T_prompt), generator=torch.Generator().manual_seed(T_prompt))
    assert torch.equal(dec.generate(prompt, N), greedy_full_recompute(model, prompt, N))
    assert int(decode.cumulative_length_0) == T_prompt + N - 1
    ids = torch.cat([prompt, prompt[:, :4]], 1)
    with torch.no_grad():
        want = model(ids, use_cache=False).logits[:, T_prompt - 1:]
    got = dec.forced_logits(ids, T_prompt)
    assert torch.allclose(got, want, atol=1e-4)


def test_prefill_none_feeds_prompt_through_decode(lm, ref):
    model, _, decode, prompt = lm
    dec = StaticCacheDecoder(None, decode)
    assert torch.equal(dec.generate(prompt, N), ref)


def test_forced_logits_match_full_forward(lm):
    model, prefill, decode, prompt = lm
    dec = StaticCacheDecoder(prefill, decode)
    ids = dec.generate(prompt, N)
    got = dec.forced_logits(ids, T)
    with torch.no_grad():
        want = model(ids, use_cache=False).logits[:, T - 1 :]
    assert got.shape == want.shape == (B, N + 1, 256)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_compile_hook_is_applied_and_stays_correct(lm, ref):
    from torch._dynamo.utils import counters

    model, prefill, decode, prompt = lm
    calls = []
    StaticCacheDecoder(prefill, decode, compile=lambda m: calls.append(m) or m)
    assert sorted(map(id, calls)) == sorted([id(prefill), id(decode)])

    # The decode program through Dynamo + AOT autograd (functionalised cache writes on
    # lifted constants): tokens must not change. Prefill stays eager to keep this fast.
    torch._dynamo.reset()
    calls.clear()

    def compile_fn(m):
        calls.append(m)
        return torch.compile(m, backend="aot_eager", fullgraph=True)

    graphs_before = counters["stats"]["unique_graphs"]
    dec = StaticCacheDecoder(prefill, decode, compile=compile_fn, compile_prefill=False)
    assert calls == [decode] and dec.prefill_fn is prefill
    out = dec.generate(prompt, N)
    assert counters["stats"]["unique_graphs"] - graphs_before >= 1  # decode was traced
    assert torch.equal(out, ref)
    torch._dynamo.reset()


def test_time_decode_positive(lm):
    _, prefill, decode, prompt = lm
    dec = StaticCacheDecoder(prefill, decode)
    t = dec.measure_decode(prompt, 3, repeats=2)
    assert t.n == 2 and t.median_ms > 0 and t.info["steps"] == 3
    assert dec.time_decode(prompt, 2, repeats=1) > 0
    assert dec.eager_steps == 3 * (2 + 1) + 2 * (1 + 1)


# --------------------------------------------------------------------------- GPU


@pytest.fixture(scope="module")
def lm_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = tiny_llama("cuda")
    prefill, decode = export_lm_programs(model, batch_size=B, prompt_len=T, max_cache_len=L)
    prompt = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(1)).cuda()
    return model, prefill, decode, prompt


@pytest.mark.gpu
@cuda
def test_cuda_graph_generate_matches_eager(lm_cuda):
    model, prefill, decode, prompt = lm_cuda
    dec = StaticCacheDecoder(prefill, decode)
    assert dec.use_cuda_graph
    out = dec.generate(prompt, N)
    assert dec.graph_replays == N - 1 and dec.eager_steps == 0
    assert torch.equal(out, greedy_full_recompute(model, prompt, N))
    # The replayed graph and the same step run eagerly agree token for token.
    eager = StaticCacheDecoder(prefill, decode, cuda_graph=False)
    assert torch.equal(eager.generate(prompt, N), out)
    assert torch.equal(dec.generate(prompt, N), out)  # replays again from a reset cache


@pytest.mark.gpu
@cuda
def test_cuda_graph_decoder_with_inductor(lm_cuda):
    model, prefill, decode, prompt = lm_cuda
    torch._dynamo.reset()
    dec = StaticCacheDecoder(
        prefill,
        decode,
        compile=lambda m: torch.compile(m, mode="max-autotune-no-cudagraphs", fullgraph=True),
        compile_prefill=False,
    )
    out = dec.generate(prompt, N)
    assert dec.graph_replays == N - 1
    assert torch.equal(out, greedy_full_recompute(model, prompt, N))
    t = dec.measure_decode(prompt, 16, repeats=3)
    assert 0 < t.median_ms < 50
    torch._dynamo.reset()


@pytest.mark.gpu
@cuda
def test_cuda_graph_time_scales_with_tokens(lm_cuda):
    _, prefill, decode, prompt = lm_cuda
    dec = StaticCacheDecoder(prefill, decode)
    per_tok = dec.time_decode(prompt, 20, repeats=3)
    assert per_tok > 0.005  # a 2-layer step is several kernels, never free
    assert dec.graph_replays >= 20 * 4


def test_module_to_leaves_the_cache_behind_and_is_refused(lm):
    # GraphModule.to() moves buffers but not the lifted constants the graph really
    # writes: the decoder must refuse rather than run on a split cache.
    _, prefill, decode, _ = lm
    moved = copy.deepcopy(decode).to("meta")
    with pytest.raises(UsageError, match="several devices"):
        StaticCacheDecoder(None, moved)
