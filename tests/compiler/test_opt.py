"""OPT (learned positions it derives from the cache's length, which export cannot trace
through transformers' static-cache wrapper): captured with its positions given, it
compiles losslessly to the model's own greedy tokens, and a lossy pass applies with
decode continuing prefill."""

import pytest
import torch

import optc
from optc.compiler import capture


def _tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4, vocab_size=256,
                       max_position_embeddings=128, word_embed_proj_dim=64, attn_implementation="sdpa")
    return OPTForCausalLM(config).eval().requires_grad_(False)


def _compile(model, passes, verify):
    calib = [(torch.randint(0, 256, (1, 32)),) for _ in range(4)]
    return optc.compile(model, (torch.randint(0, 256, (1, 16)),), target="cpu", passes=passes, calibration=calib,
                        max_cache_len=64, verify=verify, log=lambda m: None)


def test_the_default_pipeline_gives_the_models_greedy_tokens():
    model = _tiny_opt()
    art = _compile(model, {}, verify=True)
    assert len(art.manifest["anatomy"]["blocks"]) == 3
    prompt = torch.randint(0, 256, (1, 21), generator=torch.Generator().manual_seed(1))  # two prefill chunks
    with torch.no_grad():
        want = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, min_new_tokens=4,
                              do_sample=False, pad_token_id=0)
    assert torch.equal(art.generate(prompt, 4, compiled=False), want)


@pytest.mark.parametrize("passes", [{"prune_heads.ratio": 0.5}, {"skip_layers.count": 1}])
def test_lossy_passes_apply_and_decode_continues_prefill(passes, decode_after_prefill):
    art = _compile(_tiny_opt(), passes, verify=False)
    entry = next(p for p in art.manifest["passes"] if p["name"] == next(iter(passes)).split(".")[0])
    assert entry["applied"], entry["reason"]
    gms = {n: capture.graph_module(ep) for n, ep in art.programs.items()}
    step, full = decode_after_prefill(gms, torch.randint(0, 256, (1, 12)))
    torch.testing.assert_close(step[:, -1], full[:, -1], rtol=1e-4, atol=1e-4)
