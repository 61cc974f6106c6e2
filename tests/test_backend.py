"""torch.compile(backend="optc") in a fresh interpreter, without `import optc`."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import warnings, torch, sys
    from transformers import LlamaConfig, LlamaForCausalLM
    assert "optc" not in sys.modules
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    m = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    x = torch.randint(0, 256, (1, 16))
    ref = m(x, use_cache=False).logits

    # 1. A lossy pass without calibration data: warning, then plain Inductor (same numbers).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(m, backend="optc", options={"skip_layers.count": 2})(x, use_cache=False).logits
    assert any("calibration" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert torch.allclose(out, ref, atol=1e-4)

    # 2. The same with strict=True raises.
    torch._dynamo.reset()
    try:
        torch.compile(m, backend="optc", options={"skip_layers.count": 2, "strict": True})(x, use_cache=False)
        raise SystemExit("strict did not raise")
    except Exception as exc:
        assert "calibration" in str(exc), exc

    # 3. Layers chosen by index need no data: applied, equal to eager with block 2 bypassed.
    torch._dynamo.reset()
    hook = m.model.layers[2].register_forward_hook(lambda mod, args, out: args[0])
    bypassed = m(x, use_cache=False).logits
    hook.remove()
    opts = {"skip_layers.layers": [2], "skip_layers.granularity": "block", "strict": True}
    out = torch.compile(m, backend="optc", options=opts)(x, use_cache=False).logits
    assert torch.allclose(out, bypassed, atol=1e-4), (out - bypassed).abs().max()

    # 4. With calibration data in the options, count-based selection runs.
    torch._dynamo.reset()
    calib = [(torch.randint(0, 256, (1, 16)),) for _ in range(2)]
    opts = {"skip_layers.count": 1, "strict": True, "calibration": calib}
    out = torch.compile(m, backend="optc", options=opts)(x, use_cache=False).logits
    assert not torch.allclose(out, ref, atol=1e-4)
    print("BACKEND-OK")
    """
)


def test_backend_in_fresh_interpreter():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "BACKEND-OK" in proc.stdout


ENCODER_SCRIPT = textwrap.dedent(
    """
    import torch
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                intermediate_size=128)).eval()
    ids = torch.randint(0, 256, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    with torch.no_grad():
        ref = bert(input_ids=ids, attention_mask=mask).pooler_output
        opts = {"merge_tokens.r": 2, "strict": True}
        out = torch.compile(bert, backend="optc", options=opts)(input_ids=ids, attention_mask=mask).pooler_output
    cos = torch.nn.functional.cosine_similarity(out, ref).min().item()
    assert not torch.equal(out, ref), "merge_tokens did not change the output"
    assert cos > 0.95, cos  # the random tiny model loses a little to merging
    print("ENCODER-OK")
    """
)


def test_token_merging_through_the_backend_keeps_inductors_cache():
    """strict=True: merge_tokens applies to a padded BERT through torch.compile, and the graph
    handed to Inductor is one its FX graph cache can key (it warns and bypasses the cache on a
    graph holding local functions, as `ep.module()`'s hooks and export's guards are)."""
    proc = subprocess.run([sys.executable, "-c", ENCODER_SCRIPT], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ENCODER-OK" in proc.stdout
    assert "Failed to pickle cache key" not in proc.stderr, proc.stderr[-3000:]


def test_unknown_option_is_an_error():
    script = (
        "import torch\n"
        "m = torch.nn.Linear(4, 4)\n"
        "try:\n"
        "    torch.compile(m, backend='optc', options={'skip_layers.nope': 1})(torch.randn(2, 4))\n"
        "except Exception as e:\n"
        "    print('ERR', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "ERR" in proc.stdout and "skip_layers.nope" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_the_backend_lowers_for_its_target_and_checks_the_lowering(monkeypatch):
    """Without a lossy pass the backend still lowers as `optc compile` does for the target:
    on the cpu target a ViT's patch embedding reaches Inductor as a GEMM, not a convolution,
    and the compiled model gives the eager model's logits."""
    import torch

    from optc.backend import optc_backend
    from optc.compiler import torch_private
    from tests.conftest import tiny_vit

    seen = []
    real_compile_fx = torch_private.compile_fx

    def spy(gm, example_inputs, config_patches=None):
        seen.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return real_compile_fx(gm, example_inputs, config_patches)

    monkeypatch.setattr(torch_private, "compile_fx", spy)
    torch._dynamo.reset()
    model = tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, backend=lambda gm, ex: optc_backend(gm, ex, {"target": "cpu", "strict": True}))
    with torch.no_grad():
        out, ref = compiled(images).logits, model(images).logits
    torch._dynamo.reset()
    assert len(seen) == 1 and not any("conv" in t for t in seen[0]), seen
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()


def test_a_target_for_another_device_is_refused():
    import pytest
    import torch

    from optc.backend import optc_backend
    from optc.errors import UsageError

    torch._dynamo.reset()
    compiled = torch.compile(torch.nn.Linear(4, 4), backend=lambda gm, ex: optc_backend(gm, ex, {"target": "h200"}))
    with pytest.raises(Exception) as caught:
        compiled(torch.randn(2, 4))
    torch._dynamo.reset()
    inner = getattr(caught.value, "inner_exception", caught.value)  # Dynamo wraps a backend's error
    assert isinstance(inner, UsageError) and "compiles for cuda" in str(inner), caught.value


def test_inputs_keep_their_strides_and_dynamic_shapes_fall_back():
    """A non-contiguous input (a KV cache's view) is traced and checked with its own strides,
    which Inductor's code asserts; a graph Dynamo made dynamic falls back to Inductor with
    a warning that says why."""
    import warnings

    import torch

    from optc.backend import optc_backend

    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8)

    def f(t):
        return lin(t) * 2

    torch._dynamo.reset()
    compiled = torch.compile(f, backend=lambda gm, ex: optc_backend(gm, ex, {"target": "cpu"}))
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = torch.randn(8, 4).t()
        assert torch.allclose(compiled(x), f(x), atol=1e-5)
        assert not [w for w in caught if "optc" in str(w.message)], [str(w.message) for w in caught]
        y = torch.randn(8, 6).t()  # another shape: Dynamo recompiles with a dynamic dimension
        assert torch.allclose(compiled(y), f(y), atol=1e-5)
    torch._dynamo.reset()
    assert any("dynamic=False" in str(w.message) for w in caught), [str(w.message) for w in caught]


def test_the_check_leaves_the_models_buffers_as_they_were():
    """The lowering check runs the graph on random inputs; a buffer the graph writes in place
    (a static KV cache) is the model's, so after the compile it holds only what the call wrote."""
    import torch

    from optc.backend import optc_backend

    class CacheWriter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("cache", torch.zeros(4, 8))
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x, pos):
            self.cache.index_copy_(0, pos, self.lin(x))
            return self.cache.sum(0)

    torch.manual_seed(0)
    model, twin = CacheWriter(), CacheWriter()
    twin.load_state_dict(model.state_dict())
    x, pos = torch.randn(1, 8), torch.tensor([2])
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=lambda gm, ex: optc_backend(gm, ex, {"target": "cpu", "strict": True}))
    with torch.no_grad():
        out, ref = compiled(x, pos), twin(x, pos)
    torch._dynamo.reset()
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(model.cache, twin.cache, atol=1e-6), model.cache


def test_a_lowering_that_changes_the_function_is_caught(monkeypatch):
    """The check can fail: a compiled function that returns twice the graph's outputs is
    refused with strict=True, and without it the backend warns and falls back to Inductor."""
    import warnings

    import pytest
    import torch

    from optc.backend import optc_backend
    from optc.compiler import torch_private
    from optc.errors import CompileError

    real_compile_fx = torch_private.compile_fx
    broken = {"on": True}

    def doubling(gm, example_inputs, config_patches=None):
        compiled = real_compile_fx(gm, example_inputs, config_patches)
        if not broken["on"]:
            return compiled
        broken["on"] = False  # the fallback's own compile is Inductor's, unbroken
        return lambda *args: [2 * out for out in compiled(*args)]

    monkeypatch.setattr(torch_private, "compile_fx", doubling)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()).eval()
    x = torch.randn(2, 8)
    torch._dynamo.reset()
    strict = torch.compile(model, backend=lambda gm, ex: optc_backend(gm, ex, {"target": "cpu", "strict": True}))
    with torch.no_grad(), pytest.raises(Exception) as caught:
        strict(x)
    inner = getattr(caught.value, "inner_exception", caught.value)
    assert isinstance(inner, CompileError) and "changed the function" in str(inner), caught.value
    broken["on"] = True
    torch._dynamo.reset()
    lenient = torch.compile(model, backend=lambda gm, ex: optc_backend(gm, ex, {"target": "cpu"}))
    with torch.no_grad(), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = lenient(x)
    torch._dynamo.reset()
    assert any("changed the function" in str(w.message) for w in seen), [str(w.message) for w in seen]
    assert torch.allclose(out, model(x), atol=1e-5)
