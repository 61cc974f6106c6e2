"""merge_gemms: a forward program's q/k/v run as one linear in the graph the target
lowers, while the program itself (and the modules it shares with that copy) keeps them
apart; decoder programs never merge; the lowered program gives what the program gives."""

import dataclasses

import pytest
import torch

from optc.compiler import capture, targets
from optc.compiler.codegen import lowering
from optc.compiler.codegen.merge_gemms import use_merged_gemms
from optc.errors import UsageError

aten = torch.ops.aten
MERGING = dataclasses.replace(targets.get("cpu"), merge_gemms=True)


def _linears(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == aten.linear.default)


def _state(gm) -> dict:
    return {name: t for name, t in [*gm.named_parameters(), *gm.named_buffers()]}


@pytest.mark.parametrize("fixture", ["bert_captured", "vit_captured"])
def test_q_k_v_become_one_linear_in_a_copy(fixture, request):
    _, captured = request.getfixturevalue(fixture)
    gm = capture.graph_module(captured.programs["forward"])
    before_nodes, before_state = len(gm.graph.nodes), _state(gm)
    merged, groups = use_merged_gemms(gm, lowering.TOLERANCE)
    # 3 layers, one q/k/v group each: 3 linears -> 1 per layer.
    assert groups == 3 and _linears(merged) == _linears(gm) - 6
    # The program keeps its graph and its state, tensor for tensor; the copy reads the
    # program's other weights (the same tensors) and its own concatenations.
    assert len(gm.graph.nodes) == before_nodes and _state(gm).keys() == before_state.keys()
    assert all(_state(gm)[k] is t for k, t in before_state.items())
    own = {k: t for k, t in _state(merged).items() if k.startswith("merged_gemm_")}
    assert len(own) == 6  # a weight and a bias per group
    assert all(t is before_state[k] for k, t in _state(merged).items() if k not in own)
    args = captured.example_inputs["forward"]
    torch.testing.assert_close(merged(*args[0], **args[1]), gm(*args[0], **args[1]), rtol=1e-5, atol=1e-5)


def test_only_forward_programs_of_targets_that_ask(bert_captured, llama_captured):
    _, bert = bert_captured
    forward = capture.graph_module(bert.programs["forward"])
    assert lowering.target_graph(forward, targets.get("cpu"), forward=True) is forward
    assert lowering.target_graph(forward, MERGING, forward=False) is forward
    assert _linears(lowering.target_graph(forward, MERGING, forward=True)) == _linears(forward) - 6
    # A decoder's programs share their weights: merging there would hold them twice.
    _, llama = llama_captured
    prefill = capture.graph_module(llama.programs["prefill"])
    assert lowering.target_graph(prefill, MERGING, forward=False) is prefill


def test_a_program_without_siblings_is_left_alone():
    gm = torch.export.export(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)),
                             (torch.randn(2, 4),)).module()
    assert use_merged_gemms(gm, lowering.TOLERANCE) == (gm, 0)


def test_lowered_and_verified_and_recorded(bert_captured):
    """Inductor (CPU) lowers the merged copy; the check against the program passes and the
    lowering record names the rewrite, so a load with other settings knows it differs."""
    _, captured = bert_captured
    ep = captured.programs["forward"]
    result = lowering.lower_and_verify(ep, captured.example_inputs["forward"], MERGING, "forward")
    assert result["ok"], result
    assert lowering.lowering_record(MERGING)["merge_gemms"] is True
    assert lowering.lowering_record(targets.get("cpu"))["merge_gemms"] is False
    # A decoder's programs never merge: their record says so on a target that merges, so
    # an LM's kernel cache recorded before merge_gemms existed still matches.
    assert lowering.lowering_record(MERGING, decoder=True)["merge_gemms"] is False


def test_a_variant_may_switch_it():
    assert targets.with_overrides(targets.get("cpu"), ["merge_gemms=true"]).merge_gemms
    assert "merge_gemms=true" in targets.lowering_words(MERGING)
    with pytest.raises(UsageError, match="merge_gemms"):
        targets.with_overrides(targets.get("cpu"), ["merge_gemm=true"])
