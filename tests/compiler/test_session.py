"""The compile session: one capture for many configurations, plans reused, what decides
the programs in the config hash, calibration batches as many as a pass asks for."""

import pytest
import torch

from optc.compiler.calibration import CalibrationContext
from optc.compiler.session import CompileSession, encoder_batches
from optc.models import zoo


@pytest.fixture(scope="module")
def session():
    entry = zoo.get("tiny-llama")
    model = entry.load()
    return CompileSession(model, entry.example_inputs(), target="cpu", entry=entry, log=lambda m: None)


def test_runs_share_one_capture_and_reuse_plans(session):
    config = session.resolve({"skip_layers": {"count": 1, "granularity": "block"}})
    first = session.run(config)
    hits = session.cache.hits
    second = session.run(config)
    assert session.cache.hits == hits + 1  # planned once, on the first run
    assert first.manifest["passes"][0]["plan"]["units"] == second.manifest["passes"][0]["plan"]["units"]
    assert first.manifest["params"]["after"] < first.manifest["params"]["before"]
    dense = session.run(session.resolve({}))
    assert dense.manifest["params"]["after"] == dense.manifest["params"]["before"]  # copies, not the same graph


def test_config_hash_covers_target_cache_length_and_calibration(session):
    entry = zoo.get("tiny-llama")
    model = entry.load()
    here = session.resolve({"skip_layers": {"count": 1}})
    other_target = CompileSession(model, entry.example_inputs(), target="h200", entry=entry, log=lambda m: None)
    longer_cache = CompileSession(model, entry.example_inputs(), target="cpu", entry=entry, max_cache_len=128,
                                  log=lambda m: None)
    user_data = CompileSession(model, entry.example_inputs(), target="cpu", log=lambda m: None,
                               calibration=[(torch.randint(0, 256, (1, 32)),)])
    hashes = {s.resolve({"skip_layers": {"count": 1}})["hash"]
              for s in (session, other_target, longer_cache, user_data)}
    assert len(hashes) == 4
    assert here["compile"]["calibration"] == "zoo:tiny-llama:calibration"
    assert user_data.calibration_source().startswith("user:")


def test_calibration_takes_as_many_batches_as_a_pass_asks_for(session):
    config = session.resolve({"skip_layers": {"count": 1, "selection": "cosine", "calibration_samples": 7}})
    session.run(config)
    assert 7 in session._calibration_inputs and len(session._calibration_inputs[7]) == 7


def test_held_out_quality_reports_halves(session):
    dense = session.run(session.resolve({}))
    q = session.quality(dense.primary_gm, n=4)
    assert q["loss"] == pytest.approx(0.0, abs=1e-6) and q["windows"] == 4 and q["of"] == session.heldout().size
    cut = session.run(session.resolve({"skip_layers": {"layers": [0, 1, 2]}}))
    q = session.quality(cut.primary_gm, n=4)
    assert q["loss"] != 0.0 and len(q["halves"]) == 2 and q["spread"] == abs(q["halves"][0] - q["halves"][1])


def test_programs_exported_on_use_are_those_a_run_exports(session):
    """A search trial's programs are re-exported when first read, after a quality run on
    the rewritten graph (which writes the KV cache): the same graphs, weights and state
    as a run that exports at once."""
    config = session.resolve({"skip_layers": {"count": 1, "granularity": "block"}})
    eager = session.run(config)
    lazy = session.run(config, export_on_use=True)
    assert "decode" in lazy.programs and "forward" not in lazy.programs
    assert not lazy.programs._done and "reexport" not in lazy.manifest["timings_s"]
    session.quality(lazy.primary_gm, n=2)
    assert list(lazy.programs) == list(eager.programs) == ["prefill", "decode"]
    for name in eager.programs:
        want, got = eager.programs[name], lazy.programs[name]
        assert str(got.graph) == str(want.graph)
        for table in ("state_dict", "constants"):
            a, b = getattr(want, table), getattr(got, table)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        # The KV caches are the same tensors, not copies: every run shares the captured
        # program's state, so a quality run in between changed both alike.
        caches = [k for k in want.constants if "_cache_" in k]
        assert caches and all(want.constants[k] is got.constants[k] for k in caches)
    assert lazy.manifest["lowering"] == eager.manifest["lowering"]


def test_structured_widths_follow_the_targets_alignment(session):
    entry = zoo.get("tiny-llama")
    gpu = CompileSession(entry.load(), entry.example_inputs(), target="h200", entry=entry, log=lambda m: None)
    assert session.resolve({"prune_mlp": {"ratio": 0.5}})["passes"]["prune_mlp"]["align"] == 1
    assert gpu.resolve({"prune_mlp": {"ratio": 0.5}})["passes"]["prune_mlp"]["align"] == 64
    assert gpu.resolve({"prune_mlp": {"ratio": 0.5, "align": 8}})["passes"]["prune_mlp"]["align"] == 8
    assert gpu.resolve({"prune_heads": {"ratio": 0.5}})["passes"]["prune_heads"]["align"] == 64
    assert session.resolve({"prune_heads": {"ratio": 0.5}})["passes"]["prune_heads"]["align"] == 1
    pruned = session.run(session.resolve({"prune_mlp": {"ratio": 0.3, "repair": "none"}}))
    plan = next(p["plan"] for p in pruned.manifest["passes"] if p["name"] == "prune_mlp")
    assert set(plan["kept_channels"].values()) == {90}  # 70% of 128 on cpu; a GPU target would keep 64


def test_encoder_data_comes_at_the_captured_shape():
    """A zoo encoder captured at batch 1 is calibrated and evaluated on batches of that
    shape (the program refuses others), with as many samples as batches of 4 would hold."""
    entry = zoo.get("tiny-bert")
    example = entry.example_inputs()
    bert = CompileSession(entry.load(), example, target="cpu", entry=entry, log=lambda m: None)
    compiled = bert.run(bert.resolve({"prune_mlp": {"ratio": 0.5}}), evaluate=True)
    calib = bert.calibration_inputs(4)
    assert len(calib) == 16 and all(a[0].shape == example[0].shape for a, _ in calib)
    q = compiled.manifest["quality"]
    assert q["metric"] == "embedding-cosine" and q["n"] == 64 and 0 < q["loss"] < 1


def test_encoder_calibration_at_a_large_batch_holds_the_same_samples():
    """Captured at batch 8, n batches of 4 samples are n/2 batches of 8, not n of 8."""
    entry = zoo.get("tiny-bert")
    example = tuple(t.expand(8, *t.shape[1:]).contiguous() for t in entry.example_inputs())
    bert = CompileSession(entry.load(), example, target="cpu", entry=entry, log=lambda m: None)
    calib = bert.calibration_inputs(4)
    assert len(calib) == 2 and all(a[0].shape == example[0].shape for a, _ in calib)
    assert [encoder_batches(n, b) for n, b in ((32, 1), (32, 4), (32, 64), (1, 64), (3, 8))] == [128, 32, 2, 1, 2]


def test_a_greedy_skip_plan_extends_the_rounds_of_a_smaller_one():
    """The greedy rounds do not depend on the budget: after planning 3 blocks' worth, a
    plan for 1 or 2 is a prefix of it and costs no new calibration forward."""
    entry = zoo.get("tiny-llama")
    fresh = CompileSession(entry.load(), entry.example_inputs(), target="cpu", entry=entry, log=lambda m: None)
    warm = CompileSession(entry.load(), entry.example_inputs(), target="cpu", entry=entry, log=lambda m: None)

    def units(sess, count):
        config = sess.resolve({"skip_layers": {"count": count, "granularity": "sublayer"}})
        return sess.run(config).manifest["passes"][0]["plan"]["units"]

    expected = units(fresh, 2)
    units(warm, 3)
    calls = []
    original = CalibrationContext.calibration_loss
    CalibrationContext.calibration_loss = lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    try:
        assert units(warm, 2) == expected
    finally:
        CalibrationContext.calibration_loss = original
    assert calls == []
    assert len(expected) >= 2 and units(warm, 3)[: len(expected)] == expected
