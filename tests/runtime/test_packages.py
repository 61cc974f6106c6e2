"""AOTInductor packages in the artifact (CPU): a load runs them without Inductor and
gives what the portable programs give; a tampered package is refused (exit 2); another
environment falls back to the portable programs with a warning that says why."""

import dataclasses
import hashlib
import json
import zipfile

import pytest
import torch

import optc
from optc.compiler import targets
from optc.compiler.codegen import aoti, aoti_probe, lowering
from optc.compiler.session import CompileSession
from optc.errors import ArtifactError
from optc.models import zoo
from optc.runtime.artifact import MANIFEST_NAME

from cli_process import optc_cli

QUIET = {"log": lambda m: None}


@pytest.fixture(scope="module")
def thresholded(tmp_path_factory):
    """tiny-llama with its activations sparsified (threshold buffers in both programs),
    verified and packaged, in memory and saved: packaging both programs is most of this
    file's time, so the LM tests share this one artifact (its file is only read)."""
    entry = zoo.get("tiny-llama")
    art = optc.compile(entry.load(), entry.example_inputs(seq_len=8), target="cpu", entry=entry,
                       passes={"sparsify_activations.sparsity": 0.5}, verify=True, package="aoti", **QUIET)
    return art, art.save(tmp_path_factory.mktemp("pk") / "lm.optc")


@pytest.fixture(scope="module")
def lm(thresholded):
    return thresholded[1]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    entry = zoo.get("tiny-bert")
    art = optc.compile(entry.load(), entry.example_inputs(), target="cpu", pipeline_name="none", verify=True,
                       package="aoti", **QUIET)
    return art.save(tmp_path_factory.mktemp("pk") / "enc.optc"), entry.example_inputs()


@pytest.fixture
def no_inductor(monkeypatch):
    def lower(*args, **kwargs):
        raise AssertionError("a program was lowered by Inductor although its package fits")

    monkeypatch.setattr(lowering, "lower", lower)


def test_manifest_records_the_packages(lm):
    rec = optc.load(lm).manifest["packages"]
    assert rec["format"] == "aoti" and rec["environment"] == aoti_probe.environment(optc.compiler.targets.get("cpu"))
    for name in ("prefill", "decode"):
        p = rec["programs"][name]
        assert p["member"] == f"packages/{name}.pt2" and len(p["sha256"]) == 64 and p["custom_ops"] == []
        assert p["inductor_options"]["aot_inductor.package_constants_in_so"] is False  # weights stay in the program
        assert any("lifted_tensor" in s for s in p["state"])  # the KV cache goes in as inputs


def test_lm_generate_through_packages_matches_portable(lm, no_inductor):
    art = optc.load(lm)
    prompt = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(0))  # prefill is dynamic
    out = art.generate(prompt, 6)
    assert isinstance(art.decoder().decode_fn, aoti.PackagedProgram)
    assert torch.equal(out, art.generate(prompt, 6, compiled=False))
    assert torch.equal(out, art.generate(prompt, 6))  # the decoder (and its tied cache) is reused


def test_thresholded_program_is_packaged_and_reads_its_thresholds(thresholded, monkeypatch):
    # AOTInductor bakes the threshold buffers into the code; as inputs they are read on
    # every call, so the check's all-kept / all-dropped regimes reach the package too.
    art, _ = thresholded
    rec = art.manifest["packages"]["programs"]["decode"]
    assert rec["verification"]["ok"], rec  # verified at both threshold extremes
    assert any(lowering.THRESHOLD_BUFFER_PREFIX in s for s in rec["state"])
    monkeypatch.setattr(lowering, "lower", lambda *a, **k: pytest.fail("lowered although its package fits"))
    prompt = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    out = art.generate(prompt, 6)
    assert isinstance(art.decoder().decode_fn, aoti.PackagedProgram)
    assert torch.equal(out, art.generate(prompt, 6, compiled=False))


@pytest.mark.parametrize("cache_write", [False, True])
def test_a_package_runs_the_graph_its_target_lowers(cache_write):
    """A target's decode rewrites (lowering.target_graph) are in its packages, as in its
    lowering: on this CPU target with them switched on, the decode package calls optc's
    attention, GEMV and norm + q/k/v + rotary ops (with the cache write or without) and reads
    its GEMV inputs through the realizing op, and still matches the uncompiled program."""
    entry = zoo.get("tiny-llama")
    session = CompileSession(entry.load(), entry.example_inputs(seq_len=8), target="cpu", entry=entry,
                             max_cache_len=32, **QUIET)
    programs = session.run(session.resolve(None, "none"), export_on_use=True).programs  # decode only
    rewriting = dataclasses.replace(targets.get("cpu"), realize_gemv_inputs=True, decode_attention=True,
                                    decode_gemv=True, decode_qkv=True, decode_qkv_cache=cache_write)
    decode = {"decode": programs["decode"]}
    _, record = aoti.package_programs(decode, session.captured.example_inputs, rewriting, **QUIET)
    rec = record["programs"]["decode"]
    assert rec["verification"]["ok"], rec
    qkv = "optc.decode_qkv_cached.default" if cache_write else "optc.decode_qkv.default"
    assert sorted(rec["custom_ops"]) == ["optc.decode_attention.default", qkv, "optc.gemv.default"], rec
    wrapped, _ = aoti.export_with_state_inputs(programs["decode"], session.captured.example_inputs["decode"],
                                               rewriting, "decode")
    assert "prims.inductor_force_stride_order.default" in {str(n.target) for n in wrapped.graph.nodes}
    # (the plain CPU target's packages hold no optc op: test_manifest_records_the_packages)


def test_an_encoder_package_runs_optcs_masked_attention_where_its_target_asks():
    """tiny-bert's padding-masked attention in a package for a target with encoder_attention:
    the package calls optc's op and verifies against the program, which keeps SDPA."""
    entry = zoo.get("tiny-bert")
    session = CompileSession(entry.load(), entry.example_inputs(), target="cpu", entry=entry, **QUIET)
    programs = session.run(session.resolve(None, "none"), export_on_use=True).programs
    rewriting = dataclasses.replace(targets.get("cpu"), encoder_attention=True)
    _, record = aoti.package_programs(programs, session.captured.example_inputs, rewriting, **QUIET)
    rec = record["programs"]["forward"]
    assert rec["verification"]["ok"], rec
    assert rec["custom_ops"] == ["optc.encoder_attention.default"], rec


def test_encoder_forward_through_package_matches_portable(encoder, no_inductor):
    path, inputs = encoder
    art = optc.load(path)
    assert art.manifest["packages"]["programs"]["forward"]["verification"]["ok"]
    assert isinstance(art.module("forward"), aoti.PackagedProgram)
    torch.testing.assert_close(art(*inputs), art(*inputs, compiled=False), rtol=1e-4, atol=1e-5)


def test_a_package_with_merged_gemms_reads_weights_a_load_makes_again(tmp_path, monkeypatch, encoder):
    """A forward program whose target merges its q/k/v GEMMs (lowering.target_graph) is
    packaged from the merged graph; the concatenated weights are not in the file (the
    portable program's are), so a load makes them again from the program and binds them.
    What a package needs is read off the package: it loads whatever the target says now."""
    cpu = targets.get("cpu")
    monkeypatch.setitem(targets.TARGETS, "cpu", dataclasses.replace(cpu, merge_gemms=True))
    entry = zoo.get("tiny-bert")
    inputs = entry.example_inputs()
    art = optc.compile(entry.load(), inputs, target="cpu", pipeline_name="none", verify=True, package="aoti", **QUIET)
    path = art.save(tmp_path / "merged.optc")
    monkeypatch.setattr(lowering, "lower", lambda *a, **k: pytest.fail("lowered although its package fits"))
    loaded = optc.load(path)
    assert loaded.manifest["packages"]["programs"]["forward"]["verification"]["ok"]
    module = loaded.module("forward")
    assert isinstance(module, aoti.PackagedProgram)
    assert sum(1 for n in module.constants.graph.nodes if n.target == torch.ops.aten.linear.default) == 2 * 4
    torch.testing.assert_close(loaded(*inputs), loaded(*inputs, compiled=False), rtol=1e-4, atol=1e-5)
    unmerged_path, _ = encoder  # packaged by the plain CPU target: loaded while it merges
    assert isinstance(optc.load(unmerged_path).module("forward"), aoti.PackagedProgram)
    monkeypatch.setitem(targets.TARGETS, "cpu", cpu)  # and the merged package where it no longer does
    again = optc.load(path)
    assert isinstance(again.module("forward"), aoti.PackagedProgram)
    torch.testing.assert_close(again(*inputs), loaded(*inputs), rtol=0, atol=0)


def test_other_environment_falls_back_with_a_warning(lm, monkeypatch, eager_lower):
    calls = eager_lower
    real = aoti_probe.environment
    monkeypatch.setattr(aoti_probe, "environment", lambda target: {**real(target), "torch": "2.99.0+other"})
    art = optc.load(lm)
    prompt = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match=r"another environment: torch '.*' there, '2.99.0\+other' here"):
        out = art.generate(prompt, 4)
    assert len(calls) == 2  # prefill and decode lowered here instead
    assert torch.equal(out, art.generate(prompt, 4, compiled=False))


def test_a_load_where_packages_crash_runs_the_portable_programs(lm, monkeypatch, eager_lower):
    """Where the probe says packages crash on load (compiler/codegen/aoti_probe.py), none
    is loaded: the portable programs are lowered, with a warning giving the reason."""
    calls = eager_lower
    monkeypatch.setattr(aoti_probe, "load_failure", lambda target, log=None: "killed by SIGSEGV")
    monkeypatch.setattr(aoti, "load_package", lambda *a, **k: pytest.fail("loaded a package where they crash"))
    art = optc.load(lm)
    prompt = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match="AOTInductor packages do not load here: killed by SIGSEGV"):
        out = art.generate(prompt, 3)
    assert len(calls) == 2
    assert torch.equal(out, art.generate(prompt, 3, compiled=False))


def test_load_without_packages_lowers(lm, eager_lower):
    calls = eager_lower
    optc.load(lm, packages=False).generate(torch.zeros(1, 8, dtype=torch.long), 2)
    assert len(calls) == 2


def _rewrite(src, dst, edit_package, *, fix_file_hash: bool):
    """Copy the artifact with the decode package's bytes edited; with fix_file_hash the
    manifest's file list is updated to the new bytes (only the package record then
    tells), else the zip's own checksums catch it."""
    with zipfile.ZipFile(src) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    man = json.loads(members[MANIFEST_NAME])
    member = man["packages"]["programs"]["decode"]["member"]
    members[member] = edit_package(members[member])
    if fix_file_hash:
        man["files"][member] = {"sha256": hashlib.sha256(members[member]).hexdigest(), "size": len(members[member])}
    members[MANIFEST_NAME] = json.dumps(man).encode()
    with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return dst


def _flip(data: bytes) -> bytes:
    mid = len(data) // 2
    return data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1:]


def _cli(*args):
    proc = optc_cli(*args, timeout=300)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("fix_file_hash", [True, False])
def test_tampered_package_is_refused(lm, tmp_path, fix_file_hash):
    bad = _rewrite(lm, tmp_path / "bad.optc", _flip, fix_file_hash=fix_file_hash)
    with pytest.raises(ArtifactError, match="modified"):
        optc.load(bad)
    rc, err = _cli("inspect", str(bad))
    assert rc == 2 and "modified" in err


def test_corrupt_file_still_exits_2(lm, tmp_path):
    cut = tmp_path / "cut.optc"
    cut.write_bytes(lm.read_bytes()[: lm.stat().st_size // 2])
    rc, err = _cli("inspect", str(cut))
    assert rc == 2 and "truncated" in err


def test_inspect_shows_the_packages(lm):
    rc, err = _cli("inspect", str(lm))
    assert rc == 0 and "AOTInductor packages for cpu" in err and "decode: " in err


def test_a_lowering_for_another_target_does_not_run_the_package(encoder, monkeypatch):
    """A package holds the manifest target's lowering: a module lowered for other
    settings (a bench row's target words) is lowered by Inductor, the package untouched."""
    path, inputs = encoder
    art = optc.load(path)
    assert isinstance(art.module("forward"), aoti.PackagedProgram)
    lowered_for = []
    monkeypatch.setattr(lowering, "lower", lambda gm, target, **kw: lowered_for.append(target) or gm)
    other = targets.with_overrides(targets.get("cpu"), ["drop_constant_masks=false"])
    assert not isinstance(art.module("forward", target=other), aoti.PackagedProgram)
    assert lowered_for == [other]
    own = art.module("forward", target=targets.get("cpu"))  # its own target: the same module, packaged
    assert own is art.module("forward") and isinstance(own, aoti.PackagedProgram)
