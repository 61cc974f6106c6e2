"""share_kv_heads: one-token attention attends to the shared KV heads directly (no
repeat_kv copies), the function is unchanged, prefill is left alone, and attentions it
cannot rewrite exactly are refused with the reason."""

import torch

from optc.compiler import anatomy as anatomy_mod
from optc.compiler import capture, pipeline
from optc.compiler.codegen.lowering import reset_state
from optc.compiler.passes.share_kv_heads import _why_not

aten = torch.ops.aten
ON: dict = {}  # the pass is on by default
OFF = {"share_kv_heads": {"enabled": False}}


def _run(captured, sets):
    gms = {n: capture.graph_module(ep) for n, ep in captured.programs.items()}
    report = pipeline.run(gms, next(iter(gms)), pipeline.resolve("default", sets), None,
                          log=lambda m: None, check_inputs=captured.example_inputs)
    return gms, next(e for e in report if e["name"] == "share_kv_heads")


def _five_d_expands(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.target == aten.expand.default and len(n.args[1]) == 5)


def _decode(gm, ids, pos, seed=0):
    """One decode step at `pos` over caches filled with the same random keys and values."""
    reset_state(gm)
    g = torch.Generator().manual_seed(seed)
    for name, buf in gm.named_buffers():
        if "cache" in name and buf.is_floating_point():
            buf.copy_(torch.randn(buf.shape, generator=g))
    return gm(input_ids=ids, cache_position=torch.tensor([pos]))


def test_decode_attends_to_shared_heads_and_is_unchanged(llama_captured):
    _, captured = llama_captured
    plain, off = _run(captured, OFF)
    shared, entry = _run(captured, ON)
    assert not off["applied"] and off["reason"] == "disabled"
    assert entry["applied"]
    dec, pre = entry["programs"]["decode"], entry["programs"]["prefill"]
    assert dec["applied"] and dec["attentions_rewritten"] == 4
    assert dec["lossless_check"]["max_rel_err"] <= 1e-4
    assert not pre["applied"] and "prefill: more than one query token" in entry["reason"]
    # repeat_kv's expand of K and V is gone from every block of the decode program.
    assert _five_d_expands(plain["decode"]) == 8 and _five_d_expands(shared["decode"]) == 0
    assert _five_d_expands(shared["prefill"]) == 8
    for sdpa in (n for n in shared["decode"].graph.nodes if n.target == aten.scaled_dot_product_attention.default):
        assert tuple(sdpa.args[0].meta["val"].shape) == (1, 2, 2, 16)  # [B, KV heads, group, D]
    # The anatomy still reads 4 query heads over 2 KV heads after the rewrite.
    att = anatomy_mod.analyze(shared["decode"]).blocks[0].attention
    assert (att.num_heads, att.num_kv_heads, att.kv_sources) == (4, 2, None)
    g = torch.Generator().manual_seed(3)
    for pos in (0, 5, 63):  # first, middle and last cache slot
        ids = torch.randint(0, 256, (1, 1), generator=g)
        torch.testing.assert_close(_decode(shared["decode"], ids, pos), _decode(plain["decode"], ids, pos),
                                   rtol=1e-5, atol=1e-5)
    for name, gm in shared.items():
        capture.reexport(gm, captured.example_inputs[name], captured.dynamic_shapes[name], what=name)


def test_works_with_the_other_passes(llama_captured):
    _, captured = llama_captured
    both = dict(ON, merge_projections={"ops": "all"})
    gms, entry = _run(captured, both)
    assert entry["programs"]["decode"]["attentions_rewritten"] == 4
    plain, _ = _run(captured, dict(OFF, merge_projections={"ops": "all"}))
    ids = torch.tensor([[7]])
    torch.testing.assert_close(_decode(gms["decode"], ids, 2), _decode(plain["decode"], ids, 2), rtol=1e-5, atol=1e-5)


def test_batch_of_two_sequences(make_tiny_llama):
    model = make_tiny_llama(layers=2)
    captured = capture.capture(model, (torch.zeros(2, 8, dtype=torch.long),), max_cache_len=32)
    plain, _ = _run(captured, OFF)
    shared, entry = _run(captured, ON)
    assert entry["programs"]["decode"]["attentions_rewritten"] == 2
    ids = torch.tensor([[5], [9]])
    torch.testing.assert_close(_decode(shared["decode"], ids, 7), _decode(plain["decode"], ids, 7),
                               rtol=1e-5, atol=1e-5)


def _with(node, **kwargs):
    node.kwargs = {**node.kwargs, **kwargs}


def test_refuses_what_it_cannot_rewrite_exactly(llama_captured, bert_captured):
    _, captured = llama_captured
    gm = capture.graph_module(captured.programs["decode"])
    att = anatomy_mod.analyze(gm).blocks[0].attention
    assert att.kv_sources is not None and _why_not(att) is None
    sdpa, saved = att.sdpa, dict(att.sdpa.kwargs)
    _with(sdpa, is_causal=True)  # would mask the grouped rows differently
    assert "is_causal" in _why_not(att)
    sdpa.kwargs = dict(saved)
    _with(sdpa, dropout_p=0.1)
    assert "dropout" in _why_not(att)
    sdpa.kwargs = dict(saved)
    # A mask with one row per head (here [1, 4, 1, L]) would not broadcast over the groups.
    mask = sdpa.args[3]
    real = mask.meta["val"]
    with real.fake_mode:
        mask.meta["val"] = real.new_empty((1, 4, 1, real.shape[-1]))
    assert "mask" in _why_not(att)
    mask.meta["val"] = real
    assert _why_not(att) is None
    # No GQA (as many KV heads as query heads): nothing is copied, nothing to do.
    _, bert = bert_captured
    _, entry = _run(bert, ON)
    assert not entry["applied"] and "no repeat_kv copies" in entry["reason"]
