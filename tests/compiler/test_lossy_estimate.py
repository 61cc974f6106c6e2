"""The compile's estimate of whether its lossy passes pay on the target (the cost model's
prior, no measurement): said for lossy configurations only, a warning where the
compressed program is estimated slower than the captured one."""

import pytest

from optc.compiler import lossy_estimate, targets
from optc.compiler.search import cost_model
from optc.compiler.session import CompileSession
from optc.models import zoo


def _session(name, target):
    entry = zoo.get(name)
    logged = []
    return CompileSession(entry.load(), entry.example_inputs(), target=target, entry=entry, log=logged.append), logged


@pytest.fixture(scope="module")
def vit():
    return _session("tiny-vit", "h100")


def test_merging_at_batch_1_is_estimated_slower_and_the_compile_says_so(vit):
    session, logged = vit
    compiled = session.run(session.resolve({"merge_tokens": {"r": 2}}), estimate=True)
    e = compiled.manifest["estimate"]
    # tiny-vit at batch 1: a handful of tokens, every merge adds launches the GPU waits on
    assert e["program"] == "forward" and e["passes"] == ["merge_tokens"] and e["source"].endswith("h100")
    assert e["compressed_ms"] > e["dense_ms"] * (1 + lossy_estimate.TIE) and e["pays"] is False and e["slower"]
    assert e["share_of_ideal"] < 0  # fewer FLOPs, more time
    assert any("warning" in m and "merge_tokens slower than without them" in m for m in logged)


def test_a_dense_configuration_has_no_estimate(vit):
    session, logged = vit
    before = len(logged)
    assert session.run(session.resolve({}), estimate=True).manifest["estimate"] is None
    assert session.run(session.resolve({"merge_tokens": {"r": 2}})).manifest["estimate"] is None  # not asked
    assert not any("warning" in m for m in logged[before:])


def test_removing_whole_blocks_of_a_decoder_pays_on_its_decode_program():
    session, logged = _session("tiny-llama", "h200")
    e = session.run(session.resolve({"skip_layers": {"layers": [1, 2], "granularity": "block"}}),
                    estimate=True).manifest["estimate"]
    assert e["program"] == "decode" and e["pays"] is True and e["compressed_ms"] < e["dense_ms"]
    assert e["share_of_ideal"] >= cost_model.PAYS_SHARE and not e["slower"]
    assert not any("warning" in m for m in logged)


def test_faster_but_short_of_its_ideal_does_not_pay(monkeypatch):
    """A decode program whose sparse kernels read 40% fewer bytes than dense reads, priced by
    the h200's prior (sparse bytes at half the dense rate, as measured): estimated faster than
    dense, so no warning, but with under 85% of the saving its bytes allow, so it does not pay,
    as `optc bench` would say of the measured row. The cpu prior (no such cost) says it pays."""
    dense = {"bytes": 10**9, "flops": 10**6, "launches": 10, "kernels": [[10**9, 10**6, 1]]}
    sparse = {"bytes": 6 * 10**8, "flops": 10**6, "launches": 10, "kernels": [[6 * 10**8, 10**6, 1]],
              "sparse_kernels": [[2 * 10**8, 10**6, 1]]}
    monkeypatch.setattr(lossy_estimate, "program_features", lambda program, *a, **k: program)
    report = [{"name": "sparsify_activations", "lossy": True, "applied": True}]
    gpu = lossy_estimate.against_dense(dense, sparse, report, targets.get("h200"), "decode")
    assert gpu["compressed_ms"] < gpu["dense_ms"] and not gpu["slower"]
    assert gpu["share_of_ideal"] < cost_model.PAYS_SHARE and gpu["pays"] is False
    assert lossy_estimate.warning(gpu) is None
    said = lossy_estimate.verdict(gpu)
    assert said.startswith("does not pay: ") and said.endswith("under the 85% that pays")
    cpu = lossy_estimate.against_dense(dense, sparse, report, targets.get("cpu"), "decode")
    assert cpu["pays"] is True and cpu["share_of_ideal"] >= cost_model.PAYS_SHARE
    assert lossy_estimate.verdict(cpu) == "pays"


def test_a_graph_the_cost_model_cannot_read_leaves_the_compile_alone(vit, monkeypatch):
    session, logged = vit

    def unreadable(*args, **kwargs):
        raise IndexError("no shapes on a node")

    monkeypatch.setattr(lossy_estimate, "program_features", unreadable)
    compiled = session.run(session.resolve({"merge_tokens": {"r": 2}}), estimate=True)
    e = compiled.manifest["estimate"]
    assert e["unavailable"] == "IndexError: no shapes on a node" and "pays" not in e
    assert lossy_estimate.warning(e) is None and compiled.manifest["passes"]
