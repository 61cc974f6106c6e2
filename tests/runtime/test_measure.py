"""optc.runtime.measure on CPU with the tiny zoo models: decode and forward latencies,
remeasure, clear refusals of workloads that do not fit the artifact; and the layering
rule that the runtime never imports the CLI."""

import ast
from pathlib import Path

import pytest
import torch

import optc
from optc.errors import UsageError
from optc.runtime.measure import Measurement, Workload, agreement, measure, workload_for

RUNTIME = Path(__file__).resolve().parents[2] / "runtime"
quiet = lambda msg: None  # noqa: E731


def _compile(name):
    from optc.models.user import resolve

    entry, model, inputs = resolve(name, device="cpu")
    if entry.task == "causal-lm":
        inputs = (inputs[0][:, :8].contiguous(),)
    # No passes and no verification: these tests are about timing, and must stay fast.
    art = optc.compile(model, inputs, target="cpu", pipeline_name="none", entry=entry, max_cache_len=32,
                       verify=False, log=quiet)
    return art, model, inputs


@pytest.fixture(scope="module")
def llama():
    return _compile("tiny-llama")


@pytest.fixture(scope="module")
def bert():
    return _compile("tiny-bert")


def _sane(t):
    assert t.median_ms > 0 and t.p20_ms <= t.median_ms <= t.p80_ms


def test_decode_latency_and_remeasure(llama):
    art, model, (prompt,) = llama
    w = Workload("decode", batch=1, tokens=4, prompt_len=prompt.shape[1])
    m = measure(art, "cpu", w, inputs=prompt, log=quiet)
    assert isinstance(m, Measurement) and m.workload == w
    _sane(m.timing)
    assert m.setup_s > 0 and m.timing.compile_s == m.setup_s and m.timing.info["steps"] == 4
    _sane(m.remeasure())
    assert m.to_dict()["workload"]["unit"] == "ms/token (decode, prefill excluded)"
    # The timed program is the one the agreement check reads (lossless: matches eager).
    assert agreement(m.program, art, prompt, model)["argmax_match_vs_eager"] == 1.0


def test_forward_latency(bert):
    art, _, inputs = bert
    w = workload_for(art.task, batch=inputs[0].shape[0])
    assert w.kind == "forward"
    m = measure(art, "cpu", w, inputs=inputs, log=quiet)
    _sane(m.timing)
    _sane(m.remeasure())


def test_workload_for_and_to_dict():
    w = workload_for("causal-lm", tokens=8)
    assert (w.kind, w.batch, w.tokens) == ("decode", 1, 8)
    assert w.to_dict() == {"kind": "decode", "batch": 1, "tokens": 8, "prompt_len": 16,
                           "unit": "ms/token (decode, prefill excluded)"}
    assert workload_for("text-embedding", batch=4) == Workload("forward", batch=4)
    with pytest.raises(UsageError, match="batch must be a positive integer, got 0"):
        workload_for("causal-lm", batch=0)  # not read as "unset"


@pytest.mark.parametrize("kwargs, words", [
    ({"kind": "decode", "batch": 0}, "batch must be a positive integer"),
    ({"kind": "decode", "tokens": -1}, "tokens must be a positive integer"),
    ({"kind": "train"}, "unknown workload kind"),
])
def test_bad_workloads_are_refused(kwargs, words):
    with pytest.raises(UsageError, match=words):
        Workload(**kwargs)


def test_workload_that_does_not_fit_the_artifact(llama, bert):
    lm, _, (prompt,) = llama
    enc, _, inputs = bert
    with pytest.raises(UsageError, match="decode workload needs a causal-LM artifact"):
        measure(enc, "cpu", Workload("decode"), inputs=inputs, log=quiet)
    with pytest.raises(UsageError, match="forward workload needs an encoder"):
        measure(lm, "cpu", Workload("forward"), inputs=(prompt,), log=quiet)
    with pytest.raises(UsageError, match="compiled for batch 1"):
        measure(lm, "cpu", Workload("decode", batch=2, prompt_len=8),
                inputs=prompt.expand(2, -1), log=quiet)
    with pytest.raises(UsageError, match=r"needs a \[1, 16\] torch.long prompt"):
        measure(lm, "cpu", Workload("decode"), inputs=prompt, log=quiet)
    with pytest.raises(UsageError, match="max_cache_len=32"):
        measure(lm, "cpu", Workload("decode", tokens=64, prompt_len=8), inputs=prompt, log=quiet)
    with pytest.raises(UsageError, match="forward workload is batch 3"):
        measure(enc, "cpu", Workload("forward", batch=3), inputs=inputs, log=quiet)
    with pytest.raises(UsageError, match="unknown target"):
        measure(enc, "tpu", Workload("forward"), inputs=inputs, log=quiet)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # from optc import cli
    return names


def test_runtime_never_imports_the_cli():
    files = sorted(RUNTIME.rglob("*.py"))
    assert files, f"no runtime sources under {RUNTIME}"
    bad = {f.name: sorted(n for n in _imports(f) if n.split(".")[:2] in (["optc", "cli"], ["optc", "commands"]))
           for f in files}
    assert not {k: v for k, v in bad.items() if v}, f"runtime/ imports the command layer: {bad}"


@pytest.mark.parametrize("load, warned", [(0.5, False), (10_000.0, True)])
def test_a_cpu_timing_on_a_busy_machine_says_so(monkeypatch, load, warned):
    from optc.runtime import measure as measure_mod

    monkeypatch.setattr(measure_mod.os, "getloadavg", lambda: (load, load, load))
    said = []
    measure_mod._warn_if_busy(said.append)
    assert bool(said) == warned and all("this machine is busy" in m for m in said)


def test_a_forward_row_lowers_with_its_own_target(bert, monkeypatch):
    """A bench row's target.FIELD=VALUE words reach the forward lowering (they once
    lowered the artifact's own target, so such rows timed the default lowering)."""
    from optc.compiler import targets
    from optc.compiler.codegen import lowering

    seen = []
    real = lowering.lower
    monkeypatch.setattr(lowering, "lower", lambda gm, target, **kw: seen.append(target) or real(gm, target, **kw))
    art, _, inputs = bert
    w = workload_for(art.task, batch=inputs[0].shape[0])
    kept = targets.with_overrides(targets.get("cpu"), ["drop_constant_masks=false"])
    measure(art, kept, w, inputs=inputs, autotune=False, log=quiet)
    measure(art, "cpu", w, inputs=inputs, autotune=False, log=quiet)
    assert [t.drop_constant_masks for t in seen] == [False, True]
