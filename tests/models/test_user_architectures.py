"""sparsify_activations on decoder architectures other than Llama, as a user brings them
(tiny random Hugging Face models with a tokenizer): each is recognised, calibrated to
the target and evaluated on held-out text; Gemma-2 (no SDPA) is refused with a reason."""

import pytest
import torch
import transformers
from tokenizers import ByteLevelBPETokenizer

import optc
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
    # attention logit soft-capping: eager attention, no SDPA node
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, dict(num_key_value_heads=2, head_dim=16)),
}


def _compile(arch, tok, method, evaluate=True):
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(0)
    model = model_cls(config_cls(vocab_size=len(tok), **SIZES, **extra)).eval().requires_grad_(False)
    entry = user.TextData(name=arch, tokenizer=tok, vocab_size=len(tok))
    ids = entry.calibration_batches(1, 16)[0]
    return optc.compile(model, ids, target="cpu", entry=entry, verify=False, evaluate=evaluate,
                        passes={"sparsify_activations.method": method, "sparsify_activations.sparsity": 0.5},
                        log=lambda msg: None)


@pytest.mark.parametrize("arch,method", [("qwen2", "teal"), ("gemma", "cats"), ("olmo2", "chess")])
def test_sparsify_on_other_decoders(tok, arch, method):
    art = _compile(arch, tok, method)
    report = {p["name"]: p for p in art.manifest["passes"]}
    assert report["sparsify_activations"]["applied"], report["sparsify_activations"]
    quality = art.manifest["quality"]
    # Calibrated to the target on one half of the text, measured on the other.
    assert 0.35 < quality["sparsify_activations"]["sparsity"] < 0.65
    assert quality["metric"] == "perplexity" and quality["after"] > 0


def test_attention_without_sdpa_is_refused_with_the_reason(tok):
    art = _compile("gemma2", tok, "teal", evaluate=False)
    report = {p["name"]: p for p in art.manifest["passes"]}
    assert not report["sparsify_activations"]["applied"]
    assert "scaled_dot_product_attention" in report["sparsify_activations"]["reason"]
