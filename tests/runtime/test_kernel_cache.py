"""The artifact's kernel cache (CPU): what Inductor compiled for the compile-time check
ships, a fresh process with empty Inductor caches runs exactly those graphs (cache hits,
no misses), a tampered cache is refused (exit 2), and another environment compiles the
portable programs with a warning that says why."""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

import optc
from optc.compiler.codegen import aoti_probe, kernel_cache
from optc.compiler.targets import get as get_target
from optc.errors import ArtifactError
from optc.models import zoo
from optc.runtime.artifact import MANIFEST_NAME

from cli_process import optc_cli


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    entry = zoo.get("tiny-llama")
    model = entry.load()
    # Tied as in SmolLM2 and Llama-3.2: read from a file, the two names are two objects over
    # one storage, and Dynamo then lifts the weight at another position than at compile time.
    model.lm_head.weight = model.model.embed_tokens.weight
    art = optc.compile(model, entry.example_inputs(seq_len=8), target="cpu", pipeline_name="none",
                       max_cache_len=32, verify=True, log=lambda m: None)
    return art.save(tmp_path_factory.mktemp("kc") / "lm.optc")


def _prompt_len(path) -> int:
    """The prompt length the check lowered the prefill program for."""
    with zipfile.ZipFile(path) as zf:
        man = json.loads(zf.read(MANIFEST_NAME))
    return man["example_inputs"]["prefill"]["kwargs"]["input_ids"]["shape"][1]


def test_manifest_records_the_kernel_cache(lm):
    art = optc.load(lm)
    rec = art.manifest["kernel_cache"]
    data = art.extra_files[rec["member"]]
    assert rec["sha256"] == hashlib.sha256(data).hexdigest() and rec["bytes"] == len(data)
    assert rec["programs"] == ["decode", "prefill"] and rec["entries"]["inductor"] >= 2
    assert rec["environment"] == aoti_probe.environment(get_target("cpu"))
    for name in ("prefill", "decode"):
        assert art.manifest["lowering"]["load"][name]["kernel_cache"] is True


@pytest.mark.parametrize("moved", [False, True])
def test_tied_weights_read_from_the_file_are_one_parameter_again(lm, monkeypatch, moved):
    import optc.runtime.loaded as loaded

    monkeypatch.setattr(loaded, "_held_elsewhere", lambda ep, device: moved)
    gm = optc.load(lm).module("prefill", compiled=False)
    params = dict(gm.named_parameters(remove_duplicate=False))
    assert params["model.lm_head.weight"] is params["model.model.embed_tokens.weight"]


def test_tied_weights_are_placed_on_a_device_once(lm):
    art = optc.load(lm)
    ep = art._place_weights(art.programs["decode"], "meta")  # a device that needs no GPU
    assert ep.state_dict["model.lm_head.weight"] is ep.state_dict["model.model.embed_tokens.weight"]
    assert ep.state_dict["model.lm_head.weight"].device.type == "meta"


_FRESH_LOAD = """
import json, sys, torch, optc
import optc.runtime.loaded as loaded
if sys.argv[3] == "moved":  # as on a GPU, where the read programs are moved to the device
    loaded._held_elsewhere = lambda ep, device: True
art = optc.load(sys.argv[1])
prompt = torch.randint(0, 256, (1, int(sys.argv[2])), generator=torch.Generator().manual_seed(0))
out = art.generate(prompt, 4)
hits = art.kernel_cache_hits()
same = torch.equal(out, art.generate(prompt, 4, compiled=False))
print(json.dumps({"hits": hits, "used": art.kernel_cache_status["used"], "same": same}))
"""


@pytest.mark.parametrize("placement", ["as_read", "moved"])
def test_a_fresh_process_runs_the_recorded_kernels(lm, tmp_path, placement):
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "empty-inductor-cache")}
    proc = subprocess.run([sys.executable, "-c", _FRESH_LOAD, str(lm), str(_prompt_len(lm)), placement], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["used"] and result["same"]
    # Both programs came from the artifact's entries: the graphs the check verified.
    assert result["hits"]["hits"] == 2 and result["hits"]["misses"] == 0


def test_another_environment_compiles_here_with_a_warning(lm, monkeypatch, eager_lower):
    calls = eager_lower
    real = aoti_probe.environment
    monkeypatch.setattr(aoti_probe, "environment", lambda target: {**real(target), "torch": "2.99.0+other"})
    monkeypatch.setattr(kernel_cache, "install", lambda data: pytest.fail("installed a foreign kernel cache"))
    art = optc.load(lm)
    with pytest.warns(UserWarning, match=r"kernel cache was built in another environment: torch '.*' there, "
                                         r"'2.99.0\+other' here"):
        art.generate(torch.zeros(1, 8, dtype=torch.long), 2)
    assert len(calls) == 2 and not any(c["kernel_cache"] for c in calls)
    assert art.kernel_cache_status == {"used": False, "reason": art.kernel_cache_status["reason"]}


def test_a_cache_recorded_through_dynamo_is_not_installed(lm, tmp_path, monkeypatch, eager_lower):
    """An artifact compiled when programs were lowered through Dynamo: its entries key
    other graphs, so the load says so and lowers the portable programs."""
    calls = eager_lower
    with zipfile.ZipFile(lm) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    man = json.loads(members[MANIFEST_NAME])
    for record in man["lowering"]["check"].values():
        del record["frontend"]
    members[MANIFEST_NAME] = json.dumps(man).encode()
    old = tmp_path / "dynamo.optc"
    with zipfile.ZipFile(old, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, payload in members.items():
            zf.writestr(name, payload)
    monkeypatch.setattr(kernel_cache, "install", lambda data: pytest.fail("installed a Dynamo-keyed kernel cache"))
    art = optc.load(old)
    with pytest.warns(UserWarning, match="kernel cache holds the graphs that 'dynamo' handed Inductor for "
                                         "decode, prefill, where this optc lowers through 'direct'"):
        art.generate(torch.zeros(1, 8, dtype=torch.long), 2)
    assert len(calls) == 2 and not any(c["kernel_cache"] for c in calls)


def test_a_cache_compiled_with_other_inductor_options_is_not_installed(lm):
    """A target whose options changed since the compile (h100's decoder programs took
    combo kernels) would miss every entry: the load says why instead of installing it."""
    import copy

    art = optc.load(lm)
    cpu = get_target("cpu")
    assert kernel_cache.usable(art.manifest, art.extra_files, cpu)[0] is not None  # as compiled: used
    older = copy.deepcopy(art.manifest)
    older["lowering"]["load"]["decode"]["inductor_options"]["combo_kernels"] = True
    data, reason = kernel_cache.usable(older, art.extra_files, cpu)
    assert data is None and "other Inductor options or graph rewrites for decode" in reason
    assert "combo_kernels: True there" in reason
    rewrites = copy.deepcopy(art.manifest)  # a target that now rewrites the decode GEMVs
    rewrites["lowering"]["load"]["decode"]["decode_gemv"] = True
    data, reason = kernel_cache.usable(rewrites, art.extra_files, cpu)
    assert data is None and "decode_gemv: True there, False here" in reason
    older_fields = copy.deepcopy(art.manifest)  # recorded before decode_gemv existed: it was off
    del older_fields["lowering"]["load"]["decode"]["decode_gemv"]
    assert kernel_cache.usable(older_fields, art.extra_files, cpu)[0] is not None
    on = dataclasses.replace(cpu, decode_gemv=True)
    data, reason = kernel_cache.usable(older_fields, art.extra_files, on)
    assert data is None and "decode_gemv: False there, True here" in reason
    # Recorded before drop_constant_masks existed, which every target has on: left to the
    # cache's keys (the LM's masks read inputs, so its graphs, and keys, are unchanged).
    before_masks = copy.deepcopy(art.manifest)
    for program in before_masks["lowering"]["load"].values():
        del program["drop_constant_masks"]
    assert cpu.drop_constant_masks and kernel_cache.usable(before_masks, art.extra_files, cpu)[0] is not None
    recorded_off = copy.deepcopy(art.manifest)  # but one that says it was off differs
    recorded_off["lowering"]["load"]["decode"]["drop_constant_masks"] = False
    data, reason = kernel_cache.usable(recorded_off, art.extra_files, cpu)
    assert data is None and "drop_constant_masks: False there, True here" in reason


def test_a_cache_keyed_to_other_op_sources_is_not_installed(lm):
    """Inductor's keys carry the digest of optc's op sources they were written under
    (codegen/sources_tag): after those sources change, or from before the tag existed,
    no entry would be found, and the load says so."""
    import copy

    from optc.compiler.codegen import sources_tag

    art = optc.load(lm)
    cpu = get_target("cpu")
    assert art.manifest["kernel_cache"]["sources_tag"] == sources_tag.optc_tag()
    other = copy.deepcopy(art.manifest)
    other["kernel_cache"]["sources_tag"] = "optc-0000000000000000"
    data, reason = kernel_cache.usable(other, art.extra_files, cpu)
    assert data is None and "keyed to optc's op sources 'optc-0000000000000000'" in reason
    del other["kernel_cache"]["sources_tag"]
    data, reason = kernel_cache.usable(other, art.extra_files, cpu)
    assert data is None and "op sources None" in reason


def test_load_without_the_kernel_cache(lm, monkeypatch, eager_lower):
    calls = eager_lower
    monkeypatch.setattr(kernel_cache, "install", lambda data: pytest.fail("installed the kernel cache"))
    art = optc.load(lm, kernel_cache=False)
    art.generate(torch.zeros(1, 8, dtype=torch.long), 2)
    assert len(calls) == 2 and not any(c["kernel_cache"] for c in calls)
    assert art.kernel_cache_hits() is None


def _tampered(src, dst, *, fix_file_hash: bool):
    """The artifact with one byte of its kernel cache flipped; with fix_file_hash the
    file's own member list is updated (only the kernel cache record then tells)."""
    with zipfile.ZipFile(src) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    man = json.loads(members[MANIFEST_NAME])
    member = man["kernel_cache"]["member"]
    data = bytearray(members[member])
    data[len(data) // 2] ^= 0xFF
    members[member] = bytes(data)
    if fix_file_hash:
        man["files"][member] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    members[MANIFEST_NAME] = json.dumps(man).encode()
    with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, payload in members.items():
            zf.writestr(name, payload)
    return dst


@pytest.mark.parametrize("fix_file_hash", [True, False])
def test_tampered_kernel_cache_is_refused(lm, tmp_path, fix_file_hash):
    bad = _tampered(lm, tmp_path / "bad.optc", fix_file_hash=fix_file_hash)
    with pytest.raises(ArtifactError, match="modified"):
        optc.load(bad)
    proc = optc_cli("inspect", str(bad), timeout=300)
    assert proc.returncode == 2 and "modified" in proc.stderr


def test_inspect_shows_the_kernel_cache(lm):
    proc = optc_cli("inspect", str(lm), timeout=300)
    assert proc.returncode == 0 and "kernel cache: " in proc.stderr and "compiled graphs" in proc.stderr


def test_moving_a_read_program_keeps_its_cache_views_one_tensor(lm):
    """A program read from a file holds each KV cache as a buffer and a lifted constant
    over one storage; moved to a device (here "meta", which needs no GPU) each must stay
    one tensor, or the program would write one copy and the decoder tie the other."""
    from optc.compiler.capture import is_state_buffer
    from optc.runtime.loaded import _move_shared

    ep = optc.load(lm).programs["decode"]
    entries = {**{("s", k): v for k, v in ep.state_dict.items()}, **{("c", k): v for k, v in ep.constants.items()}}
    groups: dict = {}
    for key, t in entries.items():
        groups.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)), []).append(key)
    shared = [keys for keys in groups.values() if len(keys) > 1]
    # The caches (and their cumulative lengths) are held twice: a state buffer and a
    # constant over one storage (the tied embedding is a pair of parameters, not this).
    assert any(any(kind == "c" for kind, _ in keys) and any(is_state_buffer(n) for _, n in keys) for keys in shared)
    _move_shared(ep, torch.device("meta"))
    table = lambda kind: ep.state_dict if kind == "s" else ep.constants  # noqa: E731
    assert all(table(k)[n].device.type == "meta" for k, n in entries)
    for keys in shared:
        first = table(keys[0][0])[keys[0][1]]
        assert all(table(k)[n] is first for k, n in keys[1:]), keys


def test_the_frontend_each_program_lowers_through():
    """GPU forward programs keep Inductor's CUDA graphs, so Dynamo: a cache recorded before
    frontends were named still fits them; decoder programs and CPU programs go direct."""
    h200, cpu = get_target("h200"), get_target("cpu")
    assert kernel_cache._frontend(h200, "forward") == "dynamo"
    assert kernel_cache._frontend(h200, "decode") == kernel_cache._frontend(cpu, "forward") == "direct"
    old_forward = {"kernel_cache": {"member": kernel_cache.MEMBER, "programs": ["forward"], "environment": {}},
                   "lowering": {"check": {"forward": {"cudagraphs": True}}}}
    _, reason = kernel_cache.usable(old_forward, {}, h200)
    assert "handed Inductor" not in reason  # refused for another reason (no sources tag)
    old_decoder = {"kernel_cache": {**old_forward["kernel_cache"], "programs": ["decode", "prefill"]},
                   "lowering": {"check": {"decode": {"cudagraphs": False}, "prefill": {"cudagraphs": False}}}}
    _, reason = kernel_cache.usable(old_decoder, {}, h200)
    assert "'dynamo' handed Inductor for decode, prefill" in reason
    new_decoder = {**old_decoder, "lowering": {"check": {"decode": {"frontend": "direct"},
                                                         "prefill": {"frontend": "direct"}}}}
    _, reason = kernel_cache.usable(new_decoder, {}, h200)
    assert "handed Inductor" not in reason
