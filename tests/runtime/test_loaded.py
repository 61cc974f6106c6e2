"""Artifact in memory: the decoder is built once, and loading uses what the manifest
recorded."""

import pytest
import torch

import optc
from optc.compiler.codegen import lowering
from optc.models import zoo


@pytest.fixture(scope="module")
def unverified():
    """`_tiny("cpu", verify=False)`, compiled once for the tests that read it or its file."""
    return _tiny("cpu", verify=False)


@pytest.fixture(scope="module")
def saved(unverified, tmp_path_factory):
    return unverified.save(tmp_path_factory.mktemp("art") / "tiny.optc")


def test_second_generate_reuses_the_decoder(saved, monkeypatch):
    from torch._dynamo.utils import counters

    lowered = []

    def lower(gm, target, **options):  # counted; dynamo without Inductor keeps the test short
        lowered.append(gm)
        return torch.compile(gm, backend="eager", fullgraph=True, dynamic=False)

    monkeypatch.setattr(lowering, "lower", lower)
    art = optc.load(saved)
    prompt = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    first = art.generate(prompt, 4)
    assert len(lowered) == 2  # prefill and decode, once
    graphs = counters["stats"]["unique_graphs"]
    second = art.generate(prompt, 4)
    assert len(lowered) == 2 and counters["stats"]["unique_graphs"] == graphs  # nothing lowered nor traced again
    assert torch.equal(first, second)
    assert art.decoder() is art.decoder(device="cpu")
    assert art.decoder(compiled=False) is not art.decoder()  # the uncompiled one is its own


def test_generate_takes_any_prompt_length_without_compiling_again(saved, monkeypatch):
    """The artifact's prefill program runs at the length it was checked for, in chunks:
    prompts shorter, longer and a multiple of it give the model's own greedy tokens, and
    no new prompt length is traced again (Dynamo stops at 8 shapes with fullgraph)."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(lowering, "lower", lambda gm, target, **o: torch.compile(gm, backend="eager",
                                                                                 fullgraph=True, dynamic=False))
    model = zoo.get("tiny-llama").load()
    art = optc.load(saved)
    checked = art.manifest["example_inputs"]["prefill"]["kwargs"]["input_ids"]["shape"][1]
    graphs = None
    for T in (checked, 1, 3, checked + 5, 2 * checked - 5, checked + 1, 7, 11, 2):
        prompt = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(T))
        out = art.generate(prompt, 3)
        with torch.no_grad():
            want = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3,
                                  min_new_tokens=3, do_sample=False, pad_token_id=0)
        assert torch.equal(out, want), T
        graphs = counters["stats"]["unique_graphs"] if graphs is None else graphs
        assert counters["stats"]["unique_graphs"] == graphs, T  # nothing traced after the first prompt


def _recording_lower(monkeypatch) -> list:
    """lowering.lower replaced by dynamo without Inductor (seconds, not minutes on a CPU),
    recording what each call asked for."""
    calls = []

    def lower(gm, target, *, autotune=False, cudagraphs=False, kernel_cache=False, decoder=False):
        calls.append({"target": target.name, "autotune": autotune, "cudagraphs": cudagraphs,
                      "kernel_cache": kernel_cache, "decoder": decoder})
        return torch.compile(gm, backend="eager", fullgraph=True, dynamic=False)

    monkeypatch.setattr(lowering, "lower", lower)
    return calls


def _tiny(target, **kwargs):
    entry = zoo.get("tiny-llama")
    return optc.compile(entry.load(), entry.example_inputs(seq_len=8), target=target, pipeline_name="none",
                        max_cache_len=32, log=lambda m: None, **kwargs)


def test_manifest_records_the_lowering_the_check_used(unverified, monkeypatch, tmp_path):
    calls = _recording_lower(monkeypatch)
    art = _tiny("cpu", verify=True)
    cpu = optc.compiler.targets.get("cpu")
    assert len(calls) == 2 and all(c == calls[0] for c in calls)  # prefill and decode, alike
    used = calls[0]
    assert used["kernel_cache"] is True  # the check reads and writes Inductor's cache: what it compiles ships
    assert used["decoder"] is True  # a decoder's programs take the target's decoder options
    rec = optc.load(art.save(tmp_path / "a.optc")).manifest["lowering"]  # survives the file
    assert rec["target"] == "cpu"
    # Eager dynamo compiles nothing Inductor caches, so this artifact has no kernel cache
    # and its load lowers without one.
    assert art.manifest["kernel_cache"]["skipped"]
    for name in ("prefill", "decode"):
        assert rec["check"][name] == lowering.lowering_record(cpu, autotune=used["autotune"],
                                                              cudagraphs=used["cudagraphs"], decoder=True)
        assert rec["load"][name] == rec["check"][name]  # the check lowers as a load does
    assert rec["check"]["decode"] == {"target": "cpu", "autotune": False, "cudagraphs": False, "frontend": "direct",
                                      "inductor_options": {"triton.cudagraphs": False}, "realize_gemv_inputs": False,
                                      "decode_attention": False, "decode_gemv": False, "decode_qkv": False,
                                      "decode_qkv_cache": False, "merge_gemms": False, "drop_constant_masks": True,
                                      "encoder_attention": False, "encoder_attention_unmasked": False,
                                      "patch_gemm": True, "linear_gelu": False}
    assert unverified.manifest["lowering"]["check"] is None  # nothing was lowered

    # For a GPU target (no such device here: not checked) neither the prefill nor the
    # decode program autotunes (benchmarks/NOTES.md: the decode GEMVs read stored
    # inputs; the decoder lowers both alike).
    rec = _tiny("h200", verify=True).manifest["lowering"]
    assert rec["check"] is None and rec["load"]["prefill"] == rec["load"]["decode"]
    assert rec["load"]["decode"]["autotune"] is False and rec["load"]["decode"]["realize_gemv_inputs"] is True
    assert rec["load"]["decode"]["decode_attention"] is True
    assert rec["load"]["decode"]["frontend"] == "direct"  # no Dynamo: Inductor's CUDA graphs are off
    assert rec["load"]["decode"]["inductor_options"] == {
        "coordinate_descent_tuning": True, "triton.enable_pdl": True, "fx_graph_cache": False,
        "triton.cudagraphs": False}
    assert lowering.load_lowering(optc.compiler.targets.get("h200"), "forward") == {"autotune": True,
                                                                                     "cudagraphs": True}
    # The h100 target's decoder options (combo kernels) reach its decoder programs, not a forward program.
    h100 = optc.compiler.targets.get("h100")
    assert h100.decoder_inductor
    for program in ("prefill", "decode"):
        options = lowering.lowering_record(h100, **lowering.load_lowering(h100, program))["inductor_options"]
        assert all(options[k] == v for k, v in h100.decoder_inductor.items())
    forward = lowering.lowering_record(h100, **lowering.load_lowering(h100, "forward"))["inductor_options"]
    assert not set(h100.decoder_inductor) & set(forward)


def test_loading_lowers_for_the_manifest_target_not_a_detected_one(saved, monkeypatch):
    from optc.compiler import targets

    calls = _recording_lower(monkeypatch)
    tuned = targets.Target("cpu-tuned", "cpu", torch.float32, inductor={"coordinate_descent_tuning": True})
    monkeypatch.setitem(targets.TARGETS, "cpu-tuned", tuned)
    monkeypatch.setattr(targets, "detect", lambda: pytest.fail("the artifact re-detected its target"))
    art = optc.load(saved)
    art.manifest["target"] = "cpu-tuned"  # as if compiled for it
    assert art.target_for("cpu") is tuned
    art.module("prefill")
    art.generate(torch.randint(0, 256, (1, 8)), 2)
    assert [c["target"] for c in calls] == ["cpu-tuned"] * 3

    # A target of another kind of device: lowered for this one's, and said so.
    art = optc.load(saved)
    art.manifest["target"] = "h200"
    with pytest.warns(UserWarning, match="compiled for h200; on cpu its programs are lowered for cpu instead"):
        assert art.target_for("cpu").name == "cpu"


def test_module_autotune_overrides_the_load_lowering(saved, monkeypatch):
    """bench --no-autotune and plain search trials lower a forward program without
    max-autotune, which loading would otherwise use on a GPU; each choice is its own
    lowered module."""
    calls = _recording_lower(monkeypatch)
    art = optc.load(saved)
    default = art.module("prefill")
    tuned = art.module("prefill", autotune=True)
    plain = art.module("prefill", autotune=False)
    assert [c["autotune"] for c in calls] == [False, True, False]  # the CPU target loads without autotune
    assert len({id(default), id(tuned), id(plain)}) == 3
    assert art.module("prefill", autotune=True) is tuned and len(calls) == 3


def test_a_prefill_length_chosen_at_compile_is_what_a_load_chunks_by(unverified, tmp_path, monkeypatch):
    """`optc compile --prefill-len N`: the prefill program is traced at N tokens, the
    config (and its hash) records N, and the loaded decoder runs prompts of any length
    through it in chunks of N, giving the model's own greedy tokens."""
    import json

    from cli_process import optc_cli

    def cli(*args):
        proc = optc_cli(*args)
        return proc.returncode, proc.stdout, proc.stderr

    out = tmp_path / "p6.optc"
    rc, stdout, err = cli("compile", "tiny-llama", "--target", "cpu", "--prefill-len", "6", "--max-cache-len", "32",
                          "--package", "none", "--no-verify", "-o", str(out), "--json")
    assert rc == 0, err
    assert json.loads(stdout)["config"]["compile"]["prefill_len"] == 6
    six, default = _tiny("cpu", verify=False, prefill_len=6).manifest["config"], unverified.manifest["config"]
    assert default["compile"]["prefill_len"] == 16 and six["hash"] != default["hash"]
    assert {**six["compile"], "prefill_len": 16} == default["compile"]  # the one difference
    rc, _, err = cli("compile", "tiny-llama", "--target", "cpu", "--prefill-len", "1", "--no-verify")
    assert rc == 2 and "prefill length" in err

    monkeypatch.setattr(lowering, "lower", lambda gm, target, **o: torch.compile(gm, backend="eager",
                                                                                 fullgraph=True, dynamic=False))
    art = optc.load(out)
    assert art.manifest["example_inputs"]["prefill"]["kwargs"]["input_ids"]["shape"][1] == 6
    model = zoo.get("tiny-llama").load()
    for T in (6, 2, 13):
        prompt = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            want = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3,
                                  min_new_tokens=3, do_sample=False, pad_token_id=0)
        assert torch.equal(art.generate(prompt, 3), want), T
