"""`optc bench` on CPU with the tiny Llama: one process, the baseline and every optc
row (dense, --set, each --variant), timed in rounds, JSON written; bad variants
refused before the model is loaded."""

import json

import pytest

from optc.errors import UsageError

from cli_process import optc_cli


def optc(*args):
    proc = optc_cli(*args, timeout=900)
    return proc.returncode, proc.stdout, proc.stderr


def test_bench_rows_for_each_variant(tmp_path):
    out = tmp_path / "b.json"
    rc, stdout, err = optc("bench", "tiny-llama", "--target", "cpu", "--tokens", "4", "--baselines", "eager",
                           "--no-autotune", "--set", "skip_layers.layers=[1]", "--set", "skip_layers.granularity=block",
                           "--set", "merge_projections.ops=all",
                           "--variant", "sparsify_activations.method=cats sparsify_activations.sparsity=0.5",
                           "--variant", "target.decode_attention=true",
                           "--rounds", "2", "--json", "--out", str(out))
    assert rc == 0, err
    doc = json.loads(stdout)
    assert doc == json.loads(out.read_text()) and "partial" not in doc
    names = [r["name"] for r in doc["rows"]]
    assert names[:2] == ["eager", "optc"] and len(names) == 5
    assert names[2].startswith("optc skip_layers.layers=[1]") and 'method="cats"' in names[3]
    assert doc["baseline"] == "eager" and doc["failed"] == {} and doc["optc_lowering"] == "inductor"
    assert doc["probe"] is None  # the GPU probe (copy and GEMV speed) runs on CUDA only
    # The result envelope every result file opens with (runtime/timing.py result_envelope).
    assert doc["argv"][1:3] == ["bench", "tiny-llama"] and doc["versions"]["optc"] and "git_commit" in doc
    rows = {r["name"]: r for r in doc["rows"]}
    assert all(r["median_ms"] > 0 for r in doc["rows"])
    # Every optc row was checked against its own program; the dense one also against eager.
    assert rows["optc"]["agreement"]["argmax_match_vs_eager"] == 1.0
    cats = rows[names[3]]
    assert "rel_err_vs_program" in cats["agreement"] and "rel_err_vs_eager" not in cats["agreement"]
    assert cats["decode_program"]["sparsify_activations"]["rewritten"]
    assert rows[names[2]]["removed"] == [[1, "block"]]
    # A row lowered otherwise (the dense model, its decode attention through optc's op).
    lowered = rows["optc target.decode_attention=true"]
    assert lowered["lowering_overrides"] == ["decode_attention=true"] and "lowering_overrides" not in rows["optc"]
    assert lowered["agreement"]["argmax_match_vs_eager"] == 1.0 and lowered["config"] == rows["optc"]["config"]
    # merge_projections merges sparse siblings only by default (the dense row has none);
    # with ops=all it merged q/k/v and gate/up of the 3 blocks left.
    assert "merge_projections" not in rows["optc"].get("decode_program", {})
    assert rows[names[2]]["decode_program"]["merge_projections"]["linears_merged"] == 3 * 5
    # Every optc row was timed in both rounds (the baseline once).
    assert all(len(rows[n]["round_medians_ms"]) == 2 for n in names[1:]) and "rounds" not in rows["eager"]
    # Each optc row says which settings it ran with, defaults included.
    assert rows["optc"]["config"]["passes"]["share_kv_heads"]["enabled"] is True
    assert rows[names[3]]["config"]["passes"]["sparsify_activations"]["method"] == "cats"
    assert rows["optc"]["config"]["hash"] != rows[names[3]]["config"]["hash"] and "config" not in rows["eager"]


def test_an_encoder_is_timed_at_the_batch_and_length_asked_for():
    rc, stdout, err = optc("bench", "tiny-bert", "--target", "cpu", "--baselines", "eager", "--batch", "3",
                           "--seq", "20",
                           "--variant", "prune_mlp.ratio=0.5", "--json")
    assert rc == 0, err
    doc = json.loads(stdout)
    assert doc["batch"] == 3 and doc["seq"] == 20
    rows = {r["name"]: r for r in doc["rows"]}
    dense, pruned = rows["optc"]["work"], rows["optc prune_mlp.ratio=0.5"]["work"]
    assert pruned["weight_bytes"] < dense["weight_bytes"] and pruned["flops"] < dense["flops"]
    # Each row is checked as it ran: the dense one against the eager model and its own
    # program, the pruned (lossy) one against its own program only.
    lossless, lossy = rows["optc"]["agreement"], rows["optc prune_mlp.ratio=0.5"]["agreement"]
    assert lossless["rel_err_vs_eager"] < 1e-3 and lossless["rel_err_vs_program"] < 1e-3
    assert "rel_err_vs_eager" not in lossy and lossy["rel_err_vs_program"] < 1e-3
    rc, _, err = optc("bench", "tiny-llama", "--target", "cpu", "--seq", "20")
    assert rc == 2 and "--seq is for encoders" in err


def test_bad_variants_are_refused_up_front():
    rc, _, err = optc("bench", "tiny-llama", "--target", "cpu", "--variant", "not-a-setting")
    assert rc == 2 and "PASS.KEY=VALUE" in err
    rc, _, err = optc("bench", "tiny-llama", "--target", "cpu", "--variant", "sparsify_activations.kernels=sprase")
    assert rc == 2 and "kernels" in err and "loading" not in err
    same = "sparsify_activations.method=cats sparsify_activations.sparsity=0.5"
    rc, _, err = optc("bench", "tiny-llama", "--target", "cpu", "--variant", same, "--variant", same)
    assert rc == 2 and "same settings" in err
    rc, _, err = optc("bench", "tiny-llama", "--target", "cpu", "--rounds", "0")
    assert rc == 2 and "--rounds" in err and "loading" not in err
    # target.FIELD=VALUE words change a row's lowering only: a setting that would change
    # what the passes do (align) or a value of the wrong kind is refused before loading.
    for word in ("target.align=128", "target.decode_attention=yes"):
        rc, _, err = optc("bench", "tiny-llama", "--target", "cpu", "--variant", word)
        assert rc == 2 and "target." in err and "loading" not in err
    # a word repeating the target's own setting would time the dense row again under another name
    repeat = "skip_layers.count=1 target.decode_attention=false"
    rc, _, err = optc("bench", "tiny-llama", "--target", "cpu", "--variant", repeat)
    assert rc == 2 and "already how cpu lowers" in err and "loading" not in err


def test_baselines_compile_cold():
    import torch._inductor.config as inductor_config

    from optc.runtime.bench import _cold_inductor

    before = inductor_config.fx_graph_cache
    with _cold_inductor():
        assert inductor_config.fx_graph_cache is False
    assert inductor_config.fx_graph_cache == before


def test_a_saved_artifact_is_timed_beside_the_model_as_a_load_runs_it(tmp_path, eager_lower, capsys):
    """--artifact: the file's row is timed through optc.load and the artifact's own decoder
    (prefill compiled too), checked against the eager model, with its load time; an
    artifact of another model, or a file given as MODEL, is refused (exit 2)."""
    from optc import compile as compile_model
    from optc.models import zoo
    from optc.runtime.bench import bench

    entry = zoo.get("tiny-llama")
    # The settings bench's dense row compiles with (default pipeline, zoo calibration source).
    path = compile_model(entry.load(), entry.example_inputs(seq_len=8), target="cpu", entry=entry,
                         verify=False, log=lambda m: None).save(tmp_path / "tiny.optc")
    doc = bench("tiny-llama", target="cpu", baselines=["eager"], tokens=4, rounds=1, artifacts=[str(path)])
    rows = {r["name"]: r for r in doc["rows"]}
    assert list(rows) == ["eager", "optc", "tiny.optc"] and doc["failed"] == {}
    loaded = rows["tiny.optc"]
    assert loaded["median_ms"] > 0 and loaded["artifact"] == str(path)
    assert loaded["load_to_ready_s"] >= loaded["load_s"] > 0
    assert loaded["agreement"]["argmax_match_vs_eager"] == 1.0
    assert loaded["kernel_cache"] == {"used": False, "reason": None, "hits": None}  # compiled without the check
    # Both of the artifact's programs were lowered for its decoder, as a load lowers them.
    assert sum(1 for c in eager_lower if c.get("kernel_cache") is not None) >= 2
    assert loaded["config"]["hash"] == rows["optc"]["config"]["hash"]  # the same configuration, compiled here

    rc, _, err = optc("bench", "tiny-bert", "--target", "cpu", "--artifact", str(path))
    assert rc == 2 and "was compiled from a LlamaForCausalLM" in err
    with pytest.raises(UsageError, match="--artifact"):
        bench(str(path), target="cpu")
    with pytest.raises(UsageError, match="missing.optc"):
        bench("tiny-llama", target="cpu", artifacts=[str(tmp_path / "missing.optc")])
    with pytest.raises(UsageError, match="batch 1; pass --batch 1"):
        bench("tiny-llama", target="cpu", batch=2, artifacts=[str(path)])


def test_a_saved_encoder_artifact_is_timed_per_forward(tmp_path, eager_lower):
    from optc import compile as compile_model
    from optc.models import zoo
    from optc.runtime.bench import bench

    entry = zoo.get("tiny-bert")
    path = compile_model(entry.load(), entry.example_inputs(), target="cpu", entry=entry, verify=False,
                         log=lambda m: None).save(tmp_path / "bert.optc")
    doc = bench("tiny-bert", target="cpu", baselines=["eager"], artifacts=[str(path)])
    rows = {r["name"]: r for r in doc["rows"]}
    assert list(rows) == ["eager", "optc", "bert.optc"] and doc["failed"] == {}
    assert rows["bert.optc"]["median_ms"] > 0 and rows["bert.optc"]["load_to_ready_s"] > 0
    assert rows["bert.optc"]["work"] == rows["optc"]["work"]  # the same program, loaded
    # One lowering for the row compiled here, one for the artifact's own load (no kernel
    # cache: it was compiled without the check); on the CPU neither autotunes.
    assert eager_lower == [{"autotune": False, "cudagraphs": False, "kernel_cache": False}] * 2



def test_a_baseline_that_skipped_its_cuda_graphs_says_so(monkeypatch, capsys):
    """An Inductor baseline that ran without some of its CUDA graphs is slower than itself
    elsewhere: its row keeps the count and bench warns."""
    from optc.runtime import baselines
    from optc.runtime.bench import bench

    def skipping(model, inputs, **kw):
        return baselines.FORWARD_BASELINES["eager"](model, inputs, **kw).with_extra(cudagraph_skips=3, dynamo_graphs=1)

    monkeypatch.setitem(baselines.FORWARD_BASELINES, "inductor-max", skipping)
    doc = bench("tiny-bert", target="cpu", baselines=["inductor-max"], variants=())
    row = doc["rows"][0]
    assert row["name"] == "inductor-max" and row["cudagraph_skips"] == 3 and row["dynamo_graphs"] == 1
    assert "baseline inductor-max: Inductor skipped its CUDA graphs 3 time(s)" in capsys.readouterr().err
