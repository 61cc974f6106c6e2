"""The compile's estimate of whether its lossy passes pay on the target (the cost model's
prior, no measurement): said for lossy configurations only, a warning where the
compressed program is estimated slower than the captured one."""

import pytest

from optc.compiler import lossy_estimate
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
    assert e["compressed_ms"] > e["dense_ms"] * (1 + lossy_estimate.TIE) and e["pays"] is False
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
    assert not any("warning" in m for m in logged)


def test_a_graph_the_cost_model_cannot_read_leaves_the_compile_alone(vit, monkeypatch):
    session, logged = vit

    def unreadable(*args, **kwargs):
        raise IndexError("no shapes on a node")

    monkeypatch.setattr(lossy_estimate, "program_features", unreadable)
    compiled = session.run(session.resolve({"merge_tokens": {"r": 2}}), estimate=True)
    e = compiled.manifest["estimate"]
    assert e["unavailable"] == "IndexError: no shapes on a node" and "pays" not in e
    assert lossy_estimate.warning(e) is None and compiled.manifest["passes"]
