"""GPT-2-style models: Conv1D projections (addmm over an [in, out] weight) become linears
at capture, the anatomy reads the fused c_attn and the plain MLP, and the passes apply."""

import pytest
import torch

import optc
from optc.compiler import anatomy, capture


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=256, n_embd=64, n_layer=3, n_head=4, n_positions=128, bos_token_id=0,
                     eos_token_id=0, attn_implementation="sdpa")
    return GPT2LMHeadModel(cfg).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def gpt2():
    model = tiny_gpt2()
    return model, capture.capture(model, (torch.randint(0, 256, (1, 16)),), max_cache_len=64)


def test_captured_as_a_decoder_with_linears(gpt2):
    model, captured = gpt2
    assert captured.task == "causal-lm" and set(captured.programs) == {"prefill", "decode"}
    for ep in captured.programs.values():
        assert not ep.graph.find_nodes(op="call_function", target=torch.ops.aten.addmm.default)
    gm = capture.graph_module(captured.programs["prefill"])
    ids = torch.randint(0, 256, (1, 20))
    out = gm(input_ids=ids, cache_position=torch.arange(20))
    torch.testing.assert_close(out, model(ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)


def test_anatomy_reads_fused_c_attn_and_plain_mlp(gpt2):
    _, captured = gpt2
    for name in ("prefill", "decode"):
        a = anatomy.analyze(capture.graph_module(captured.programs[name]))
        assert a.reason is None and len(a.blocks) == 3
        att, mlp = a.blocks[1].attention, a.blocks[1].mlp
        assert att.fused_qkv and att.q.path.endswith("attn.c_attn") and att.o.path.endswith("attn.c_proj")
        assert (att.num_heads, att.num_kv_heads, att.head_dim) == (4, 4, 16) and len(att.cache_writes) == 2
        assert not mlp.gated and mlp.up.path.endswith("mlp.c_fc") and mlp.down.path.endswith("mlp.c_proj")
        assert (mlp.up.out_features, mlp.down.in_features) == (256, 256)
        assert a.head.path.endswith("lm_head")


@pytest.mark.parametrize("passes", [{"prune_mlp.ratio": 0.5}, {"skip_layers.count": 1, "skip_layers.granularity": "block"},
                                    {"sparsify_activations.sparsity": 0.5}])
def test_lossy_passes_apply_and_decode_continues_prefill(passes, decode_after_prefill):
    model = tiny_gpt2()
    calib = [(torch.randint(0, 256, (1, 32)),) for _ in range(4)]
    art = optc.compile(model, (torch.randint(0, 256, (1, 16)),), target="cpu", passes=passes, calibration=calib,
                       max_cache_len=64, verify=True, log=lambda m: None)
    name = next(iter(passes)).split(".")[0]
    entry = next(p for p in art.manifest["passes"] if p["name"] == name)
    assert entry["applied"], entry["reason"]
    gms = {n: capture.graph_module(ep) for n, ep in art.programs.items()}
    step, full = decode_after_prefill(gms, torch.randint(0, 256, (1, 12)))
    torch.testing.assert_close(step[:, -1], full[:, -1], rtol=1e-4, atol=1e-4)
