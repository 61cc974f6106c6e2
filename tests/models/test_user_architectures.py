"""sparsify_activations on decoder architectures other than Llama, as a user brings them
(tiny random Hugging Face models with a tokenizer): each is recognised, calibrated to
the target and evaluated on held-out text; Phi-3's fused q/k/v projection is read as
one and its fused gate/up projection is split for the methods that need gate and up;
Gemma-2 (no SDPA) is refused with a reason."""

import pytest
import torch
import transformers
from tokenizers import ByteLevelBPETokenizer

import optc
from optc.compiler import capture
from optc.compiler.anatomy import analyze
from optc.compiler.passes.sparsify_calibration import _v_rows
from optc.models import data, user


@pytest.fixture(scope="module")
def tok():
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([data.text_split("calibration")[:20000]], vocab_size=300, min_frequency=2,
                            special_tokens=["<|eos|>"])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|eos|>")


SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=512)
ARCHS = {
    # q/k/v biases
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(num_key_value_heads=2)),
    # GeGLU (gelu-tanh gate), scaled embeddings, one KV head
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, dict(num_key_value_heads=1, head_dim=16)),
    # q/k norms, norms after attention and MLP
    "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM, dict(num_key_value_heads=2)),
    # one fused q/k/v projection and one fused gate/up projection
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, dict(num_key_value_heads=2, pad_token_id=0)),
    # attention logit soft-capping: eager attention, no SDPA node
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, dict(num_key_value_heads=2, head_dim=16)),
}


def _model(arch, tok):
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(0)
    return model_cls(config_cls(vocab_size=len(tok), **SIZES, **extra)).eval().requires_grad_(False)


def _compile(arch, tok, method=None, evaluate=True, passes=None):
    entry = user.TextData(name=arch, tokenizer=tok, vocab_size=len(tok))
    ids = entry.calibration_batches(1, 16)[0]
    passes = passes or {"sparsify_activations.method": method, "sparsify_activations.sparsity": 0.5}
    return optc.compile(_model(arch, tok), ids, target="cpu", entry=entry, verify=False, evaluate=evaluate,
                        passes=passes, log=lambda msg: None)


@pytest.mark.parametrize("arch,method", [("qwen2", "teal"), ("gemma", "cats"), ("olmo2", "chess"), ("phi3", "teal")])
def test_sparsify_on_other_decoders(tok, arch, method):
    art = _compile(arch, tok, method)
    report = {p["name"]: p for p in art.manifest["passes"]}
    assert report["sparsify_activations"]["applied"], report["sparsify_activations"]
    quality = art.manifest["quality"]
    # Calibrated to the target (share of the blocks' weights) on one half of the text,
    # measured on the other.
    assert 0.4 < quality["sparsify_activations"]["weighted_sparsity"] < 0.6
    assert quality["metric"] == "perplexity" and quality["after"] > 0


def test_attention_without_sdpa_is_refused_with_the_reason(tok):
    art = _compile("gemma2", tok, "teal", evaluate=False)
    report = {p["name"]: p for p in art.manifest["passes"]}
    assert not report["sparsify_activations"]["applied"]
    assert "scaled_dot_product_attention" in report["sparsify_activations"]["reason"]


def test_fused_qkv_is_one_projection(tok):
    captured = capture.capture(_model("phi3", tok), (torch.zeros(1, 16, dtype=torch.long),))
    att = analyze(capture.graph_module(captured.programs["decode"])).blocks[0].attention
    assert att.fused_qkv and att.q is att.v and att.q.path.endswith("qkv_proj")
    assert (att.num_heads, att.num_kv_heads, att.head_dim) == (4, 2, 16)
    assert att.linears == [att.q, att.o]
    # The value rows of the fused weight [q 64 | k 32 | v 32], traced from SDPA's value input.
    assert _v_rows(att) == slice(96, 128)


@pytest.mark.parametrize("method", ["cats", "chess"])
def test_fused_gate_up_is_split_for_the_gate_methods(tok, method):
    """Phi-3 computes gate and up in one projection; sparsify_activations first splits it
    (lossless, checked end to end), then CATS / CHESS threshold act(gate) as on Llama."""
    art = _compile("phi3", tok, method)
    rep = {p["name"]: p for p in art.manifest["passes"]}["sparsify_activations"]
    assert rep["applied"], rep["reason"]
    for prog in ("prefill", "decode"):
        prepared = rep["programs"][prog]["prepared"]
        assert prepared["fused_gate_up_split"] == 2 and prepared["lossless_check"]["max_rel_err"] <= 1e-6
    assert 0.4 < art.manifest["quality"]["sparsify_activations"]["weighted_sparsity"] < 0.6
    assert art.manifest["params"]["before"] == art.manifest["params"]["after"]  # halves replace the whole


def test_split_halves_feed_the_fused_cats_kernel(tok, tmp_path):
    art = _compile("phi3", tok, passes={"sparsify_activations.method": "cats", "sparsify_activations.sparsity": 0.5,
                                        "sparsify_activations.kernels": "sparse"}, evaluate=False)
    rep = {p["name"]: p for p in art.manifest["passes"]}["sparsify_activations"]
    assert rep["programs"]["decode"]["rewritten"] == {"cats_gate_up": 2}
    decode = art.programs["decode"].graph_module.graph
    assert sum(n.target == torch.ops.optc.cats_gate_up.default for n in decode.nodes) == 2
    # The halves are views of the fused weight: both programs read one copy.
    halves = [n for n in art.programs["decode"].state_dict if n.endswith(("__gate", "__up"))]
    assert len(halves) == 4 and all(
        art.programs["prefill"].state_dict[n].data_ptr() == art.programs["decode"].state_dict[n].data_ptr()
        for n in halves)
    # The artifact with the split weights saves, loads and decodes.
    art.save(tmp_path / "phi3.optc")
    prompt = user.TextData(name="phi3", tokenizer=tok, vocab_size=len(tok)).calibration_batches(1, 8)[0][0]
    out = optc.load(tmp_path / "phi3.optc").generate(prompt, 4)
    assert out.shape == (1, 12) and torch.equal(out[:, :8], prompt)


def test_fused_model_skips_keep_the_fused_projection(tok):
    # Removing an attention removes its fused projection's weights too (dead code, dropout included).
    art = _compile("phi3", tok, passes={"skip_layers.layers": [1], "skip_layers.granularity": "attention"},
                   evaluate=False)
    attention = 64 * (64 + 2 * 32) + 64 * 64 + 64  # qkv_proj, o_proj and the norm before them
    assert art.manifest["params"]["before"] - art.manifest["params"]["after"] == attention


def test_only_a_gate_up_pattern_is_split():
    """A linear chunked along another dim, or whose halves are not act(half 0) * half 1,
    is left as it is."""
    import torch.fx as fx

    from optc.compiler.fused_mlp import split_fused_gate_up

    class NotGateUp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 16, bias=False)

        def forward(self, x):
            a, b = self.proj(x).chunk(2, dim=0)   # along tokens, not features
            c, d = self.proj(x).chunk(2, dim=-1)  # features, but act(half 1) * half 0
            return torch.nn.functional.silu(a) * b, torch.nn.functional.silu(d) * c

    ep = torch.export.export(NotGateUp(), (torch.randn(4, 8),))
    gm = ep.module()
    assert isinstance(gm, fx.GraphModule) and split_fused_gate_up(gm) == {}
