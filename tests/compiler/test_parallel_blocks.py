"""Parallel residual blocks (attention and MLP side by side on the block's input, as in
GPT-NeoX and Phi-2): the anatomy reads them, skip_layers removes them whole (their
halves are no points of the stream), the channel passes apply, and prune_heads refuses
GPT-NeoX's interleaved fused q/k/v with a reason."""

import pytest
import torch

import optc
from optc.compiler import anatomy, capture
from optc.errors import UsageError


def _tiny(family: str):
    import transformers

    torch.manual_seed(0)
    if family == "gpt-neox":
        cfg = transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=4, vocab_size=256, attn_implementation="sdpa")
        return transformers.GPTNeoXForCausalLM(cfg).eval().requires_grad_(False)
    cfg = transformers.PhiConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                 vocab_size=256, bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    return transformers.PhiForCausalLM(cfg).eval().requires_grad_(False)


def _compile(model, passes, verify=False):
    calib = [(torch.randint(0, 256, (1, 32)),) for _ in range(4)]
    return optc.compile(model, (torch.randint(0, 256, (1, 16)),), target="cpu", passes=passes, calibration=calib,
                        max_cache_len=64, verify=verify, log=lambda m: None)


def _entry(art, name):
    return next(p for p in art.manifest["passes"] if p["name"] == name)


@pytest.mark.parametrize("family", ["gpt-neox", "phi"])
def test_the_anatomy_reads_parallel_blocks(family):
    captured = capture.capture(_tiny(family), (torch.randint(0, 256, (1, 16)),), max_cache_len=64)
    for name in ("prefill", "decode"):
        a = anatomy.analyze(capture.graph_module(captured.programs[name]))
        assert a.reason is None and len(a.blocks) == 3
        for b in a.blocks:
            assert b.parallel and b.mid is b.output and b.attention is not None and b.mlp is not None
        assert a.blocks[1].input is a.blocks[0].output
        assert a.summary()["blocks"][0]["parallel"] is True


@pytest.mark.parametrize("family", ["gpt-neox", "phi"])
def test_skip_layers_removes_a_parallel_block_whole(family, decode_after_prefill):
    art = _compile(_tiny(family), {"skip_layers.count": 1})  # the default granularity, sublayer
    entry = _entry(art, "skip_layers")
    assert entry["applied"] and len(entry["plan"]["units"]) == 1 and entry["plan"]["units"][0][1] == "block"
    gms = {n: capture.graph_module(ep) for n, ep in art.programs.items()}
    step, full = decode_after_prefill(gms, torch.randint(0, 256, (1, 12)))
    torch.testing.assert_close(step[:, -1], full[:, -1], rtol=1e-4, atol=1e-4)


def test_a_half_of_a_parallel_block_is_refused():
    with pytest.raises(UsageError, match="side by side"):
        _compile(_tiny("phi"), {"skip_layers.layers": [1], "skip_layers.granularity": "attention"})


@pytest.mark.parametrize("family,passes", [
    ("gpt-neox", {"prune_mlp.ratio": 0.5}), ("phi", {"prune_heads.ratio": 0.5}),
    ("phi", {"sparsify_activations.sparsity": 0.5}),
])
def test_channel_passes_apply_and_decode_continues_prefill(family, passes, decode_after_prefill):
    art = _compile(_tiny(family), passes)
    entry = _entry(art, next(iter(passes)).split(".")[0])
    assert entry["applied"], entry["reason"]
    gms = {n: capture.graph_module(ep) for n, ep in art.programs.items()}
    step, full = decode_after_prefill(gms, torch.randint(0, 256, (1, 12)))
    torch.testing.assert_close(step[:, -1], full[:, -1], rtol=1e-4, atol=1e-4)


def test_prune_heads_leaves_gpt_neox_whole_and_says_why():
    entry = _entry(_compile(_tiny("gpt-neox"), {"prune_heads.ratio": 0.5}), "prune_heads")
    assert not entry["applied"] and "fused q/k/v" in entry["reason"]
