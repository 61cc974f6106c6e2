"""--eval on an LM measures held-out quality through the decode program too, beside the
prefill graph's figure on the same tokens."""

import pytest
import torch

import optc
from optc.compiler.codegen import lowering
from optc.models import zoo

SPARSE = {"sparsify_activations.sparsity": 0.5}


def _compile(**kwargs):
    entry = zoo.get("tiny-llama")
    held_out = entry.evaluation_batches(4, 128, batch=1)  # the prefill figure on 4 windows, not 64: seconds
    return optc.compile(entry.load(), entry.example_inputs(seq_len=8), target="cpu", entry=entry, passes=SPARSE,
                        evaluation=held_out, evaluate=True, log=lambda m: None, **kwargs)


def _check(d: dict, programs: str) -> None:
    assert d["programs"] == programs and d["device"] == "cpu"
    assert (d["windows"], d["window_tokens"], d["prefill_tokens"], d["tokens"]) == (2, 64, 32, 64)
    assert d["metric"] == "perplexity" and d["before"] > 1
    # The decode loop computes what the prefill graph does (to float rounding).
    assert abs(d["vs_prefill_graph"]) < 1e-3, d
    assert d["after"] == pytest.approx(d["prefill_graph_after"], rel=1e-3)
    assert d["loss"] == pytest.approx(d["after"] / d["before"] - 1)


def test_uncompiled_decode_program_without_lowering():
    art = _compile(verify=False)
    q = art.manifest["quality"]
    assert q["sparsify_activations"]["sparsity"] == pytest.approx(0.5, abs=0.15)
    _check(q["decode"], "uncompiled")
    assert not art._decoders[("cpu", False)].compiled


def test_lowered_decode_program_when_the_compile_lowered(monkeypatch):
    lowered = []

    def lower(gm, target, **options):  # counted; dynamo without Inductor keeps the test short
        lowered.append(gm)
        return torch.compile(gm, backend="eager", fullgraph=True, dynamic=False)

    monkeypatch.setattr(lowering, "lower", lower)
    art = _compile(verify=True)
    # Two for the verification, two for the decoder's prefill and decode programs.
    assert len(lowered) == 4
    _check(art.manifest["quality"]["decode"], "lowered")
    assert art._decoders[("cpu", True)].compiled


def test_the_record_says_when_the_decode_loop_ran_packages():
    from types import SimpleNamespace

    from optc.compiler.codegen.aoti import PackagedProgram
    from optc.runtime.decode_quality import _programs

    gm = torch.fx.symbolic_trace(torch.nn.Identity())
    assert _programs(SimpleNamespace(decode_fn=PackagedProgram(lambda *a: None, gm, []))) == "packages"
    assert _programs(SimpleNamespace(decode_fn=gm)) == "lowered"


def test_a_decode_loop_that_computes_something_else_fails_the_compile(monkeypatch):
    """The decode figure is a gate: logits through the decode loop that differ from the
    prefill graph's beyond the tolerance fail the compile, naming both figures."""
    from optc.errors import CompileError
    from optc.runtime.decode import StaticCacheDecoder

    real = StaticCacheDecoder.forced_logits

    def confidently_wrong(self, ids, prompt_len):  # a decode loop that always predicts token 0
        out = real(self, ids, prompt_len)
        return torch.full_like(out, -30.0).index_fill_(-1, torch.tensor([0]), 30.0)

    monkeypatch.setattr(StaticCacheDecoder, "forced_logits", confidently_wrong)
    with pytest.raises(CompileError, match=r"decode program's held-out perplexity .* off the prefill graph's"):
        _compile(verify=False)

