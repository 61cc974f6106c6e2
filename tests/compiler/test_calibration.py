"""CalibrationContext.losses_at: the loss of a program with one node's output replaced,
run from that node on, equals the loss of the program rewritten that way."""

import pytest
import torch
import torch.nn.functional as F

from optc.compiler import capture
from optc.compiler.anatomy import analyze
from optc.compiler.calibration import CalibrationContext
from optc.compiler.rewrite import attr_value, rebuild
from pass_helpers import lm_calib


def _replaced(node_name: str, fn):
    """A transform: the program with `node_name`'s output computed by `fn` from the
    node's first argument, as a call in the graph."""

    def transform(gm):
        copy, mapping = rebuild(gm)
        old = next(n for n in copy.graph.nodes if n.name == node_name)
        with copy.graph.inserting_after(old):
            new = copy.graph.call_function(fn, (old.args[0],))
        old.replace_all_uses_with(new)
        copy.graph.erase_node(old)
        copy.recompile()
        return copy

    return transform


def _o_linear(gm, block: int):
    o = analyze(gm).blocks[block].attention.o
    w = attr_value(gm, o.weight)
    b = attr_value(gm, o.bias) if o.bias else None
    return o.node, lambda scale: (lambda x: F.linear(x, w * scale, b))


def _state(gm):
    return {n: t.clone() for n, t in gm.named_buffers() if "cache" in n or "cumulative" in n}


@pytest.mark.parametrize("block", [0, 1])
def test_losses_at_a_decoder_layer_equal_the_rewritten_programs(llama_captured, block):
    _, captured = llama_captured
    gm = capture.graph_module(captured.programs["prefill"])
    ctx = CalibrationContext("causal-lm", gm, lm_calib(n=3, t=20))
    node, scaled = _o_linear(gm, block)
    fns = [scaled(1.0), scaled(0.0), scaled(-2.0), lambda x: torch.zeros(*x.shape[:-1], node.meta["val"].shape[-1])]
    before = _state(gm)
    got = ctx.losses_at([(node, fns)])[0]
    # The program's own state (the KV cache and its counters) is left as it was.
    assert all(torch.equal(t, before[n]) for n, t in _state(gm).items())
    want = [ctx.calibration_loss(_replaced(node.name, f)) for f in fns]
    assert got == pytest.approx(want, abs=1e-5)
    assert got[0] == pytest.approx(ctx.calibration_loss(lambda g: g), abs=1e-5)  # the dense output
    assert len(set(round(v, 4) for v in got)) == 3  # scale 0 and zeros agree; the rest differ


def test_losses_at_an_encoder_layer_equal_the_rewritten_programs(bert_captured):
    _, captured = bert_captured
    gm = capture.graph_module(captured.programs["forward"])
    g = torch.Generator().manual_seed(3)
    calib = [((torch.randint(0, 256, (2, 12), generator=g), torch.ones(2, 12, dtype=torch.long)), {}) for _ in range(2)]
    ctx = CalibrationContext("forward", gm, calib)
    node, scaled = _o_linear(gm, 1)
    fns = [scaled(1.0), scaled(0.3)]
    got = ctx.losses_at([(node, fns)])[0]
    assert got[0] == pytest.approx(0.0, abs=1e-6) and got[1] > 1e-4
    assert got == pytest.approx([ctx.calibration_loss(_replaced(node.name, f)) for f in fns], abs=1e-6)


def test_losses_at_several_layers_in_one_pass_equal_each_layer_alone(llama_captured):
    _, captured = llama_captured
    gm = capture.graph_module(captured.programs["prefill"])
    ctx = CalibrationContext("causal-lm", gm, lm_calib(n=2, t=16))
    cuts = []
    for block in (2, 0, 1):  # not in graph order: the answer keeps the order asked for
        node, scaled = _o_linear(gm, block)
        cuts.append((node, [scaled(0.5), scaled(-1.0)]))
    together = ctx.losses_at(cuts)
    alone = [ctx.losses_at([cut])[0] for cut in cuts]
    assert [v for per in together for v in per] == pytest.approx([v for per in alone for v in per], abs=1e-6)
    assert len({round(v, 4) for per in together for v in per}) == 6

