"""The CLI contract on the tiny models: JSON on stdout only, exit codes, artifacts."""

import json
import zipfile

import pytest
import torch

from cli_process import optc_cli


def optc(*args):
    proc = optc_cli(*args, timeout=900)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("art") / "x.optc"
    # --package none: packaging has its own tests (tests/runtime/test_packages.py).
    rc, out, err = optc("compile", "tiny-llama", "--target", "cpu", "-o", str(path), "--json", "--package", "none",
                        "--set", "skip_layers.layers=[1]", "--set", "skip_layers.granularity=mlp")
    assert rc == 0, err
    return path, json.loads(out)


def test_compile_json_contract(artifact):
    path, doc = artifact
    for key in ("artifact", "target", "config", "config_hash", "passes", "params"):
        assert key in doc
    assert doc["target"] == "cpu" and doc["artifact"] == str(path)
    skip = doc["passes"][0]
    assert skip["name"] == "skip_layers" and skip["applied"] and skip["plan"]["units"] == [[1, "mlp"]]
    assert doc["params"]["after"] < doc["params"]["before"]
    assert all(v["ok"] for v in doc["verification"].values())
    # The lowering the check used, as the manifest records it (on the CPU: as a load lowers).
    assert doc["lowering"]["check"] == doc["lowering"]["load"]
    assert doc["lowering"]["check"]["decode"]["autotune"] is False
    # What Inductor compiled for the check ships, hashed, for this environment.
    kc = doc["kernel_cache"]
    assert kc["programs"] == ["decode", "prefill"] and kc["entries"]["inductor"] >= 2
    assert kc["environment"]["target"] == "cpu" and len(kc["sha256"]) == 64


def test_compile_for_a_gpu_that_is_not_here(tmp_path):
    """Compiled on the CPU for the h100, lowered where it loads; the report estimates
    whether the lossy pass pays there (merging tiny-vit's few tokens does not)."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the target's device would be used")
    rc, out, err = optc("compile", "tiny-vit", "--target", "h100", "-o", str(tmp_path / "v.optc"), "--json",
                        "--package", "none", "--set", "merge_tokens.r=2")
    assert rc == 0, err
    doc = json.loads(out)
    assert "no h100 device here: capturing on the CPU in bfloat16" in err
    assert doc["target"] == "h100" and "skipped" in doc["verification"]
    assert doc["estimate"]["passes"] == ["merge_tokens"] and doc["estimate"]["pays"] is False
    assert "does NOT pay" in err


def test_load_and_run_matches_program(artifact):
    import optc

    path, _ = artifact
    art = optc.load(path)
    assert art.manifest["config_hash"] == art.manifest["config"]["hash"]
    ids = torch.randint(0, 256, (1, 10))
    eager_out = art.module("prefill", compiled=False)(input_ids=ids, cache_position=torch.arange(10))
    compiled_out = art.module("prefill")(input_ids=ids, cache_position=torch.arange(10))
    assert torch.allclose(eager_out, compiled_out, atol=1e-4)
    tokens = art.generate(ids, 6)
    assert tokens.shape == (1, 16) and torch.equal(tokens[:, :10], ids)


def test_load_matches_eager_model_without_passes(tmp_path):
    import optc
    from optc.models import zoo

    entry = zoo.get("tiny-llama")
    model = entry.load()
    art = optc.compile(model, entry.example_inputs(seq_len=8), target="cpu", pipeline_name="none", log=lambda m: None)
    art.save(tmp_path / "n.optc")
    loaded = optc.load(tmp_path / "n.optc")
    ids = torch.randint(0, 256, (1, 12))
    out = loaded.module("prefill")(input_ids=ids, cache_position=torch.arange(12))
    assert torch.allclose(out, model(ids, use_cache=False).logits, atol=1e-4)
    greedy = model.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert torch.equal(loaded.generate(ids, 5), greedy)


def test_inspect(artifact):
    path, _ = artifact
    rc, out, err = optc("inspect", str(path), "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["anatomy"]["n_blocks"] == 4 and doc["compatible"]
    assert "model.model.layers.0" in err  # the human-readable anatomy goes to stderr
    assert "entries in one member, weights/parameters.bin" in err  # format 3: the weights' member


def test_corrupted_artifact_refused(artifact, tmp_path):
    path, _ = artifact
    data = bytearray(path.read_bytes())
    bad = tmp_path / "bad.optc"
    bad.write_bytes(bytes(data[: len(data) // 2]))
    rc, out, err = optc("inspect", str(bad))
    assert rc == 2 and "bad.optc" in err and out == ""
    with zipfile.ZipFile(path) as zf:
        member = next(n for n in zf.namelist() if n.endswith(".pt2"))
        info = zf.getinfo(member)
    flipped = tmp_path / "flipped.optc"
    data[info.header_offset + 200] ^= 0xFF
    flipped.write_bytes(bytes(data))
    rc, _, err = optc("inspect", str(flipped))
    assert rc == 2 and member in err


def test_bad_usage_exit_2():
    rc, out, err = optc("compile", "no-such-model")
    assert rc == 2 and "no-such-model" in err and "optc models" in err and out == ""
    rc, _, err = optc("compile", "tiny-llama", "--set", "skip_layers.bogus=1")
    assert rc == 2 and "skip_layers.bogus" in err
    rc, _, err = optc("compile", "tiny-llama", "--target", "tpu")
    assert rc == 2 and "tpu" in err


def test_models_json():
    rc, out, _ = optc("models", "--json")
    names = {m["name"] for m in json.loads(out)["models"]}
    assert rc == 0 and {"smollm2-135m", "minilm-l6", "llama-1b", "vit-b16", "bert-base", "tiny-llama"} <= names


def test_search_refuses_bad_arguments_before_loading(tmp_path):
    rc, _, err = optc("search", "tiny-llama", "--target", "cpu", "--workers", "0", "-o", str(tmp_path))
    assert rc == 2 and "--workers" in err
    rc, _, err = optc("search", "tiny-llama", "--target", "h200", "-o", str(tmp_path))
    assert rc == 2 and "not present on this machine" in err


def test_compile_reports_held_out_sparsity(tmp_path):
    rc, out, err = optc("compile", "tiny-llama", "--target", "cpu", "--no-verify", "--eval", "--json", "--package",
                        "none", "-o", str(tmp_path / "s.optc"), "--set", "sparsify_activations.method=cats",
                        "--set", "sparsify_activations.sparsity=0.5")
    assert rc == 0, err
    q = json.loads(out)["quality"]
    assert q["split"] == "evaluation" and q["metric"] == "perplexity"
    assert abs(q["sparsify_activations"]["sparsity"] - 0.5) < 0.15, q
    assert {"1", "4_consecutive", "16_consecutive", "4_sequences", "16_sequences"} <= set(
        q["sparsify_activations"]["rows_read"]), q
    assert "pass sparsify_activations   applied" in err
    assert "weight rows read for tokens at once: 1 0." in err and "4 consecutive" in err
    # --no-verify lowered nothing: the decode loop's figure comes from the uncompiled programs.
    assert q["decode"]["programs"] == "uncompiled" and abs(q["decode"]["vs_prefill_graph"]) < 1e-3, q["decode"]
    assert "quality through the decode program (uncompiled, cpu; 2 held-out windows of 64 tokens" in err


@pytest.mark.parametrize("programs, said", [("uncompiled", "uncompiled"),
                                            ("lowered", "lowered as the artifact loads them"),
                                            ("packages", "the artifact's AOTInductor packages")])
def test_the_decode_quality_line_names_what_ran(programs, said, capsys):
    from optc import commands

    commands._report_decode_quality({"programs": programs, "device": "cpu", "windows": 2, "window_tokens": 64,
                                     "prefill_tokens": 32, "tokens": 64, "metric": "perplexity", "before": 33.4,
                                     "after": 34.5, "prefill_graph_after": 35.4, "vs_prefill_graph": -0.024})
    assert f"quality through the decode program ({said}, cpu;" in capsys.readouterr().err
