"""The AOTInductor probe: a child that crashes is a reason not to package (never a crash
of the compile), the answer is kept per environment, and both the compile and a load act
on it (CPU: the probe itself is faked, as it only runs for CUDA targets). The load side:
tests/runtime/test_packages.py::test_a_load_where_packages_crash_runs_the_portable_programs."""

import sys

import pytest
import torch

import optc
from optc.compiler import targets
from optc.compiler.codegen import aoti, aoti_probe
from optc.models import zoo


def test_a_child_killed_by_a_signal_is_named():
    crash = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
    failure = aoti_probe._probe("cuda", crash)
    assert "killed by SIGSEGV" in failure and torch.__version__ in failure


def test_a_failing_child_gives_its_error_and_a_passing_one_none():
    fail = [sys.executable, "-c", "raise RuntimeError('no kernel image is available')"]
    assert "exit 1: RuntimeError: no kernel image is available" in aoti_probe._probe("cuda", fail)
    assert aoti_probe._probe("cuda", [sys.executable, "-c", "pass"]) is None


def test_the_answer_is_kept_per_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTC_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(aoti_probe, "_probe", lambda device: calls.append(device) or "it crashed")
    h200 = targets.get("h200")
    assert aoti_probe.load_failure(h200) == "it crashed"
    assert aoti_probe.load_failure(h200) == "it crashed"
    assert calls == ["cuda"]  # the second answer came from the cache
    real = aoti_probe.environment
    monkeypatch.setattr(aoti_probe, "environment", lambda t: {**real(t), "torch": "9.9.9"})
    aoti_probe.load_failure(h200)
    assert len(calls) == 2  # another environment is probed again
    assert aoti_probe.load_failure(targets.get("cpu")) is None and len(calls) == 2  # CPU: never probed


def test_compile_skips_packages_with_the_reason(monkeypatch):
    monkeypatch.setattr(aoti, "load_failure", lambda target, log=None: "killed by SIGSEGV")
    monkeypatch.setattr(aoti, "build_package", lambda *a, **k: pytest.fail("built a package where they crash"))
    entry = zoo.get("tiny-llama")
    art = optc.compile(entry.load(), entry.example_inputs(seq_len=8), target="cpu", pipeline_name="none",
                       max_cache_len=32, verify=False, package="aoti", log=lambda m: None)
    programs = art.manifest["packages"]["programs"]
    assert set(programs) == {"prefill", "decode"}
    assert all(p["skipped"] == "killed by SIGSEGV" for p in programs.values())


def test_a_gpu_environment_names_the_ptxas_chosen_as_inductor_chooses_it(monkeypatch):
    """Triton keys its kernels on the ptxas version, so a kernel cache built with one ptxas
    is not the code another would run: the version is part of the environment, read only
    after the process settled on Inductor's ptxas (read before, Triton would keep the
    other one for the whole process)."""
    from triton.backends.nvidia import compiler as nvidia

    order = []
    monkeypatch.setattr(aoti_probe, "use_inductors_ptxas", lambda: order.append("chosen"))
    monkeypatch.setattr(nvidia, "get_ptxas_version", lambda *a: order.append("read") or
                        "ptxas: NVIDIA (R) Ptx optimizing assembler\nCuda compilation tools, release 13.0, V13.0.88\n")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    env = aoti_probe.environment(targets.get("h200"))
    assert env["ptxas"] == "V13.0.88" and env["gpu"] == "NVIDIA H200" and order == ["chosen", "read"]
    assert "ptxas" not in aoti_probe.environment(targets.get("cpu"))
    monkeypatch.setattr(nvidia, "get_ptxas_version", lambda *a: "no version here")
    assert aoti_probe.environment(targets.get("h200"))["ptxas"] is None
