import json
import time

import pytest
import torch

from optc.errors import UsageError
from optc.models import data, quality, zoo

ALL = ["smollm2-135m", "minilm-l6", "llama-1b", "llama-8b", "vit-b16", "bert-base",
       "tiny-llama", "tiny-bert", "tiny-vit"]
TINY = ["tiny-llama", "tiny-bert", "tiny-vit"]


def test_every_name_resolves():
    assert [e.name for e in zoo.entries()] == ALL
    for name in ALL:
        e = zoo.get(name)
        assert e.name == name
        assert e.task == zoo.TASK_OF_FAMILY[e.family]
        assert e.metric == zoo.METRIC_OF_FAMILY[e.family]
        assert e.description
        json.dumps(e.to_dict())  # what `optc models --json` prints


def test_unknown_name_is_a_usage_error_pointing_at_optc_models():
    with pytest.raises(UsageError, match=r"unknown model 'foo'.*optc models") as info:
        zoo.get("foo")
    assert info.value.exit_code == 2


def test_dtypes_and_weights_flags():
    real = {e.name for e in zoo.entries() if e.real_weights}
    assert real == {"smollm2-135m", "minilm-l6"}
    for name in ("llama-1b", "llama-8b", "vit-b16", "bert-base"):
        assert zoo.get(name).default_dtype == torch.bfloat16
    for name in TINY + ["smollm2-135m", "minilm-l6"]:
        assert zoo.get(name).default_dtype == torch.float32


def _meta_params(entry) -> int:
    """Parameter count from the config alone: the module is built on the meta device."""
    import transformers

    cls = {"llama-1b": transformers.LlamaForCausalLM, "llama-8b": transformers.LlamaForCausalLM,
           "vit-b16": transformers.ViTForImageClassification,
           "bert-base": transformers.BertModel}[entry.name]
    with torch.device("meta"):
        model = cls(entry.config())
    return sum(p.numel() for p in model.parameters())


def test_llama_1b_has_llama_3_2_1b_shape():
    cfg = zoo.get("llama-1b").config()
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size) == (2048, 16, 32, 8, 8192, 128256)
    assert cfg.tie_word_embeddings and cfg.max_position_embeddings == 131072
    rope = cfg.rope_parameters
    assert rope["rope_type"] == "llama3" and rope["rope_theta"] == 500000.0
    assert (rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
            rope["original_max_position_embeddings"]) == (32.0, 1.0, 4.0, 8192)
    assert cfg._attn_implementation == "sdpa"
    assert _meta_params(zoo.get("llama-1b")) == pytest.approx(1.236e9, rel=0.01)


def test_llama_8b_has_llama_3_1_8b_shape():
    cfg = zoo.get("llama-8b").config()
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.intermediate_size, cfg.vocab_size) == (4096, 32, 32, 8, 128, 14336, 128256)
    assert not cfg.tie_word_embeddings and cfg.rope_parameters["factor"] == 8.0
    assert _meta_params(zoo.get("llama-8b")) == pytest.approx(8.03e9, rel=0.01)


def test_vit_b16_and_bert_base_shapes():
    vit = zoo.get("vit-b16").config()
    assert (vit.image_size, vit.patch_size, vit.hidden_size, vit.num_hidden_layers,
            vit.num_attention_heads, vit.intermediate_size, vit.num_labels) == (224, 16, 768, 12, 12, 3072, 1000)
    assert _meta_params(zoo.get("vit-b16")) == pytest.approx(86.6e6, rel=0.01)
    bert = zoo.get("bert-base").config()
    assert (bert.hidden_size, bert.num_hidden_layers, bert.vocab_size) == (768, 12, 30522)
    assert _meta_params(zoo.get("bert-base")) == pytest.approx(109.5e6, rel=0.01)
    assert "timm" in zoo.get("vit-b16").description


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_load_fast_and_run(name):
    e = zoo.get(name)
    e.load()  # the first call may pay for importing transformers
    start = time.perf_counter()
    model = e.load()
    assert time.perf_counter() - start < 1.0
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.config._attn_implementation == "sdpa"
    args = e.example_inputs(batch=2)
    out = quality.output_tensor(model(*args), "last_hidden_state" if e.family == "bert" else "logits")
    if e.family == "llama":
        assert len(args) == 1 and args[0].shape == (2, e.default_seq_len)
        assert out.shape == (2, e.default_seq_len, 256)
    elif e.family == "bert":
        assert len(args) == 2 and torch.equal(args[1], torch.ones_like(args[0]))
        assert out.shape == (2, e.default_seq_len, 64)
    else:
        assert args[0].shape == (2, 3, 32, 32)
        assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_are_deterministic_and_fresh(name):
    e = zoo.get(name)
    a, b = e.load(), e.load()
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    first = next(a.parameters())
    with torch.no_grad():
        first.add_(1.0)  # a fresh module each time: b must not change
    assert not torch.equal(first, next(b.parameters()))


def test_tiny_load_in_bf16_keeps_rotary_in_float32():
    model = zoo.get("tiny-llama").load(dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    out = model(*zoo.get("tiny-llama").example_inputs()).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_example_inputs_respect_batch_and_seq_len_and_come_from_calibration_text():
    e = zoo.get("tiny-llama")
    (ids,) = e.example_inputs(batch=3, seq_len=40)
    assert ids.shape == (3, 40) and ids.dtype == torch.long
    assert bytes(ids[0].tolist()) in data.text_split("calibration").encode()
    assert torch.equal(ids, e.example_inputs(batch=3, seq_len=40)[0])
    (long_ids,) = e.example_inputs(batch=2, seq_len=200_000)  # longer than the split: wraps
    assert long_ids.shape == (2, 200_000)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_calibration_and_evaluation_batches_do_not_overlap(name):
    e = zoo.get(name)
    cal = e.calibration_batches(6, 48, batch=2)
    ev = e.evaluation_batches(6, 48, batch=2)
    assert len(cal) == 6 and all(len(b) == len(e.example_inputs()) for b in cal)
    assert cal[0][0].shape == (2, 48)
    # The docs repeat phrases, so a short window may occur in both halves as text; what
    # must hold is that each window is cut from its own half.
    cal_text, ev_text = data.text_split("calibration").encode(), data.text_split("evaluation").encode()
    cal_rows = {bytes(row.tolist()) for b in cal for row in b[0]}
    ev_rows = {bytes(row.tolist()) for b in ev for row in b[0]}
    assert len(cal_rows) == 12 and len(ev_rows) == 12
    assert all(w in cal_text for w in cal_rows) and all(w in ev_text for w in ev_rows)
    assert not cal_rows & ev_rows
    again = e.evaluation_batches(6, 48, batch=2)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(ev, again))


def test_vision_batches_are_split_specific():
    e = zoo.get("tiny-vit")
    cal, ev = e.calibration_batches(2, None, batch=3), e.evaluation_batches(2, None, batch=3)
    assert cal[0][0].shape == (3, 3, 32, 32)
    assert not torch.allclose(cal[0][0], ev[0][0])
    assert e.tokenizer() is None


def test_byte_tokenizer_of_tiny_models():
    tok = zoo.get("tiny-bert").tokenizer()
    assert tok.decode(tok.encode("hello, zoo")) == "hello, zoo"


@pytest.mark.slow
def test_smollm2_loads_and_has_sane_held_out_perplexity():
    e = zoo.get("smollm2-135m")
    start = time.perf_counter()
    model = e.load()
    first = time.perf_counter() - start
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.hidden_size, cfg.vocab_size) == (30, 9, 3, 576, 49152)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    tok = e.tokenizer()
    text = "The quick brown fox jumps over 12 lazy dogs."
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("123") == [tok.encode(d)[0] for d in "123"]  # digits one by one
    result = quality.evaluate(e, model, n=2, seq_len=128, batch=4)
    print(f"\nsmollm2-135m held-out perplexity over 8x128 tokens: {result['value']:.2f} "
          f"(first load {first:.1f}s)")
    assert result["n_tokens"] == 8 * 127
    assert 5 < result["value"] < 40
    start = time.perf_counter()
    fresh = e.load()
    assert time.perf_counter() - start < first  # the dequantised state is cached per process
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(4.0)
    assert not torch.equal(fresh.model.layers[0].mlp.down_proj.weight,
                           model.model.layers[0].mlp.down_proj.weight)  # fresh weights each load


@pytest.mark.slow
def test_minilm_paraphrases_are_closer_than_unrelated_sentences():
    e = zoo.get("minilm-l6")
    model = e.load()
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    texts = ["A man is playing a guitar.", "Someone plays the guitar.",
             "The stock market fell sharply today.", "How do I bake sourdough bread?"]
    ids, mask = e.text_inputs(texts)
    assert ids[0, 0].item() == e.tokenizer().prefix_ids[0]  # [CLS]
    emb = torch.nn.functional.normalize(quality.embeddings(model, [(ids, mask)]), dim=-1)
    sim = emb @ emb.T
    print(f"\nminilm-l6 cosine: paraphrase {sim[0, 1]:.3f}, unrelated {sim[0, 2]:.3f} {sim[0, 3]:.3f}")
    assert sim[0, 1] > 0.6
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[0, 3] + 0.3
    # held-out batches carry [CLS] ... [SEP] and a full mask
    (b_ids, b_mask), = e.evaluation_batches(1, 32)
    assert b_ids.shape == (1, 32) and b_mask.sum() == 32
    assert b_ids[0, 0].item() == e.tokenizer().prefix_ids[0]
    assert b_ids[0, -1].item() == e.tokenizer().suffix_ids[0]
