"""prune_mlp and prune_heads together on every zoo model and on the other decoder layouts
the passes read: each zoo model's head structure (heads, KV heads, biases, tied
embeddings, RoPE) at a tiny width with random weights (the real weights of two of them
are too slow for a unit test; tests/test_quality_smollm2.py and
benchmarks/pruning_quality.py use them), Qwen2 (grouped heads, q/k/v biases), Phi-3
(fused q/k/v and gate/up) and GPT-2 (fused c_attn, biases everywhere). Checked: ratio 0
is exactly lossless, widths are aligned, head counts and caches follow, decode
continues prefill, the pruned program stays close to the dense one."""

import copy

import pytest
import torch
import transformers

from optc.compiler import capture
from optc.compiler.anatomy import analyze
from optc.models import zoo
from pass_helpers import assert_prefill_matches, eager_logits, lm_calib, mask_input, run_pass

ALIGN = 16
HEAD_DIM = 8


def _shrunk_zoo_model(name: str):
    """The zoo model's config with its head counts kept and every other size shrunk."""
    entry = zoo.get(name)
    cfg = copy.deepcopy(entry.config())
    heads = cfg.num_attention_heads
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = heads * HEAD_DIM, 4 * heads * HEAD_DIM, 2
    if hasattr(cfg, "head_dim"):
        cfg.head_dim = HEAD_DIM
    if entry.family == "vit":
        cfg.image_size, cfg.patch_size, cfg.num_labels = 32, 8, 10
    else:
        cfg.vocab_size, cfg.pad_token_id = 256, 0
    cls = {"llama": transformers.LlamaForCausalLM, "bert": transformers.BertModel,
           "vit": transformers.ViTForImageClassification}[entry.family]
    torch.manual_seed(0)
    kwargs = {"add_pooling_layer": False} if entry.family == "bert" else {}
    return entry.family, cls(cfg, **kwargs).eval().requires_grad_(False)


def _other_lm(arch: str):
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                      bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
        return "llama", transformers.GPT2LMHeadModel(cfg).eval().requires_grad_(False)
    config_cls, model_cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                             "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM)}[arch]
    cfg = config_cls(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    return "llama", model_cls(cfg).eval().requires_grad_(False)


ZOO = [e.name for e in zoo.entries()]
MODELS = ZOO + ["qwen2", "phi3", "gpt2"]


def _inputs(family: str, g: torch.Generator):
    if family == "vit":
        return (torch.randn(2, 3, 32, 32, generator=g),)
    if family == "bert":
        return (torch.randint(0, 256, (2, 12), generator=g), torch.ones(2, 12, dtype=torch.long))
    return (torch.randint(0, 256, (1, 8), generator=g),)


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    family, module = _shrunk_zoo_model(request.param) if request.param in ZOO else _other_lm(request.param)
    g = torch.Generator().manual_seed(1)
    example = _inputs(family, g)
    kwargs = {"max_cache_len": 64} if family == "llama" else {}
    captured = capture.capture(module, example, **kwargs)
    calib = lm_calib(4, 32) if family == "llama" else [(_inputs(family, g), {}) for _ in range(4)]
    return request.param, family, captured, calib


def _run(captured, family, calib, mlp, heads):
    task = "causal-lm" if family == "llama" else "forward"
    sets = {"calibration_samples": 4, "align": ALIGN}
    return run_pass(captured, "prune_heads", {**sets, **heads}, calib, task, prune_mlp={**sets, **mlp})


def _out(gm, family, inputs):
    if family == "llama":
        ids = inputs[0]
        return gm(input_ids=ids, cache_position=torch.arange(ids.shape[1]))
    out = gm(*inputs)
    return out[0] if isinstance(out, (tuple, list)) else out


def test_ratio_zero_is_exactly_lossless(model):
    name, family, captured, calib = model
    gms, entry = _run(captured, family, calib, {"ratio": 0.0, "repair": "lstsq"}, {"ratio": 0.0, "repair": "lstsq"})
    assert not entry["applied"]
    primary = "prefill" if family == "llama" else "forward"
    dense = capture.graph_module(captured.programs[primary])
    inputs = _inputs(family, torch.Generator().manual_seed(7))
    assert torch.equal(_out(gms[primary], family, inputs), _out(dense, family, inputs))


def test_pruned_widths_heads_and_numerics(model, decode_after_prefill):
    name, family, captured, calib = model
    primary = "prefill" if family == "llama" else "forward"
    dense_blocks = analyze(capture.graph_module(captured.programs[primary])).blocks
    # Uniform allocation: every layer loses heads, so every layer's widths are checked.
    gms, entry = _run(captured, family, calib, {"ratio": 0.25, "repair": "lstsq"},
                      {"ratio": 0.33, "repair": "lstsq", "allocation": "uniform"})
    assert entry["applied"], entry["reason"]
    for gm in gms.values():
        blocks = analyze(gm).blocks
        assert len(blocks) == len(dense_blocks)
        for b, d in zip(blocks, dense_blocks):
            att, mlp = b.attention, b.mlp
            assert mlp.up.out_features % ALIGN == 0 and mlp.up.out_features < d.mlp.up.out_features
            assert mlp.down.in_features == mlp.up.out_features == gm.get_parameter(mlp.down.weight).shape[1]
            assert att.num_heads * att.head_dim % ALIGN == 0 and att.num_heads < d.attention.num_heads
            # Whole KV groups go: the grouping stays what it was.
            assert att.num_heads // att.num_kv_heads == d.attention.num_heads // d.attention.num_kv_heads
            assert gm.get_parameter(att.o.weight).shape[1] == att.num_heads * att.head_dim
        before, after = entry["programs"][primary]["before"]["params"], entry["programs"][primary]["after"]["params"]
        assert after < before
    inputs = _inputs(family, torch.Generator().manual_seed(7))
    dense = capture.graph_module(captured.programs[primary])
    out, ref = _out(gms[primary], family, inputs), _out(dense, family, inputs)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    if family == "llama":
        ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
        step, full = decode_after_prefill(gms, ids)
        assert torch.allclose(step[0, -1], full[0, -1], atol=1e-4)
        kv = analyze(gms["decode"]).blocks[0].attention.num_kv_heads
        caches = {t.shape[1] for n, t in gms["decode"].named_buffers() if "key_cache" in n}
        assert caches == {kv}


def test_the_default_loss_allocation_prunes_every_layout(model, decode_after_prefill):
    """prune_heads' default allocation (measured calibration loss per layer and count)
    on each layout: the heads it reports removed are gone, widths stay aligned, and a
    decoder's decode continues its prefill."""
    name, family, captured, calib = model
    primary = "prefill" if family == "llama" else "forward"
    dense = sum(b.attention.num_heads for b in analyze(capture.graph_module(captured.programs[primary])).blocks)
    gms, entry = _run(captured, family, calib, {"ratio": 0.0}, {"ratio": 0.5, "repair": "bias"})
    assert entry["applied"], entry["reason"]
    alloc = entry["plan"]["allocation"]
    assert alloc["used"] == "loss" and alloc["heads_removed"] > 0
    for gm in gms.values():
        atts = [b.attention for b in analyze(gm).blocks]
        assert sum(a.num_heads for a in atts) == dense - alloc["heads_removed"]
        assert all(a.num_heads * a.head_dim % ALIGN == 0 for a in atts)
    if family == "llama":
        ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
        step, full = decode_after_prefill(gms, ids)
        assert torch.allclose(step[0, -1], full[0, -1], atol=1e-4)


def test_gpt2_heads_match_eager_with_heads_zeroed():
    """GPT-2 splits its fused c_attn with aten.split: the split follows the narrower q, k
    and v, and the pruned program equals the eager model with those heads zeroed."""
    _, module = _other_lm("gpt2")
    captured = capture.capture(module, (torch.zeros(1, 8, dtype=torch.long),), max_cache_len=64)
    gms, entry = run_pass(captured, "prune_heads", {"ratio": 0.5, "align": 1, "repair": "none"}, lm_calib())
    assert entry["applied"], entry["reason"]
    hooks = []
    for i, block in enumerate(module.transformer.h):
        mask = torch.zeros(64)
        for h in entry["plan"]["blocks"][str(i)]["kept_heads"]:
            mask[h * 16:(h + 1) * 16] = 1
        hooks.append(mask_input(block.attn.c_proj, mask))
    ids = torch.randint(0, 256, (1, 13))
    assert_prefill_matches(gms, eager_logits(module, ids, hooks), ids)
