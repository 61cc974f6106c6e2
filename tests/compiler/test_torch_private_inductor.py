"""optc.compiler.torch_private, continued: the smoke tests of its Inductor, export-loading
and AOTInductor wrappers that need no exported program (the others are in
test_torch_private.py, whose docstring says what these tests are for; the rule in
test_torch_private_rule.py reads both files)."""

from __future__ import annotations

import inspect
import os

import torch
import torch.fx as fx
from torch import nn

from optc.compiler import torch_private as tp


def test_inductor_realize_op():
    op = tp.inductor_realize_op()
    x = torch.randn(4, 6)
    assert torch.equal(op(x, list(x.stride())), x)  # the identity
    y = op(x.t(), [4, 1])  # a copy into the stride asked for
    assert y.stride() == (4, 1) and torch.equal(y, x.t())
    gm = fx.symbolic_trace(lambda a: op(torch.sigmoid(a) * a, [6, 1]).sum(-1))
    out = torch.compile(gm, backend="inductor", fullgraph=True)(x)
    torch.testing.assert_close(out, (torch.sigmoid(x) * x).sum(-1))


def test_fresh_cache_artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    gm = fx.symbolic_trace(lambda a: torch.sigmoid(a) * 3 + a)
    with tp.fresh_cache_artifacts():
        torch.compile(gm, backend="inductor", fullgraph=True, options={"fx_graph_cache": True})(torch.randn(8))
        saved = torch.compiler.save_cache_artifacts()
    assert saved is not None
    data, info = saved
    assert isinstance(data, bytes) and len(info.inductor_artifacts) >= 1  # the compiled graph was recorded
    with tp.fresh_cache_artifacts():
        assert torch.compiler.save_cache_artifacts() is None  # a fresh record holds nothing
    torch._dynamo.reset()


def test_autotune_cache_artifacts(tmp_path, monkeypatch):
    from torch.compiler._cache import CacheArtifactManager

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    choice = {"XBLOCK": 32, "num_warps": 2, "num_stages": 1, "configs_hash": "x"}
    with tp.fresh_cache_artifacts():
        CacheArtifactManager.record_artifact("autotune", os.path.join("cd", "k.best_config"), choice)
        data, _ = torch.compiler.save_cache_artifacts()
    (entry,) = tp.autotune_cache_artifacts(data)
    entry.populate_cache()
    assert (tmp_path / "cd" / "k.best_config").is_file()
    assert tp.autotune_cache_artifacts(b"garbage") is None


def test_inductor_triton_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    assert tp.inductor_triton_cache_dir(1) == str(tmp_path / "inductor" / "triton" / "1")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    assert tp.inductor_triton_cache_dir(1) == str(tmp_path / "mine")


def test_warm_compile_workers(monkeypatch):
    """torch's own warm-up runs, and leaves the pool alone where the environment says so
    (the tests never start compile workers)."""
    from torch._inductor import async_compile

    monkeypatch.setenv("TORCH_WARM_POOL", "0")
    before = async_compile.AsyncCompile.process_pool.cache_info().currsize
    called = []
    real = async_compile.maybe_warm_pool
    monkeypatch.setattr(async_compile, "maybe_warm_pool", lambda: called.append(1) or real())
    tp.warm_compile_workers()
    assert called == [1] and async_compile.AsyncCompile.process_pool.cache_info().currsize == before


def test_use_inductors_ptxas(tmp_path, monkeypatch):
    """Where torch's build ships a ptxas, TRITON_PTXAS_PATH names it after the call (what
    Inductor's compile workers set), so every Triton compile of the process, before
    Inductor's and in them, keys its kernels on one ptxas version; one already set stays."""
    from torch._inductor.runtime import compile_tasks

    ptxas = tmp_path / "_inductor" / "bin" / "ptxas"
    ptxas.parent.mkdir(parents=True)
    ptxas.write_text("#!/bin/sh\n")
    ptxas.chmod(0o755)
    monkeypatch.setattr(compile_tasks, "__file__", str(tmp_path / "_inductor" / "runtime" / "compile_tasks.py"))
    monkeypatch.delenv("TRITON_PTXAS_PATH", raising=False)
    compile_tasks._set_triton_ptxas_path.cache_clear()
    try:
        tp.use_inductors_ptxas()
        assert os.environ["TRITON_PTXAS_PATH"] == str(ptxas)
        monkeypatch.setenv("TRITON_PTXAS_PATH", "/chosen/ptxas")
        compile_tasks._set_triton_ptxas_path.cache_clear()
        tp.use_inductors_ptxas()
        assert os.environ["TRITON_PTXAS_PATH"] == "/chosen/ptxas"
    finally:
        compile_tasks._set_triton_ptxas_path.cache_clear()


def test_lowering_entries_choose_the_ptxas_first(monkeypatch):
    """compile_fx_static and compile_fx settle the ptxas before Inductor compiles anything."""
    from torch._inductor import compile_fx as inductor

    order = []
    monkeypatch.setattr(tp, "use_inductors_ptxas", lambda: order.append("ptxas"))

    def compile_fx(gm, example_inputs, config_patches=None, ignore_shape_env=False):
        order.append("inductor")

    monkeypatch.setattr(inductor, "compile_fx", compile_fx)
    gm = fx.symbolic_trace(nn.ReLU())
    tp.compile_fx(gm, [torch.ones(2)])
    tp.compile_fx_static(gm, [torch.ones(2)], {})
    assert order == ["ptxas", "inductor"] * 2


def test_import_export_deserialiser():
    import subprocess
    import sys

    # A fresh process: in this one the deserialiser was imported long ago.
    code = ("import sys, torch.export; from optc.compiler import torch_private as tp; "
            "name = 'torch._export.serde.serialize'; before = name in sys.modules; "
            "tp.import_export_deserialiser(); print(before, name in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.stdout.split() == ["False", "True"], out.stderr[-2000:]


def test_pick_vec_isa():
    isa = tp.pick_vec_isa()
    assert isinstance(str(isa), str)  # falsy (empty) when the CPU has none Inductor knows
    from optc.compiler.codegen.aoti_probe import environment
    from optc.compiler.targets import get

    assert environment(get("cpu"))["cpu_isa"] == (str(isa) or "none")


def test_inductor_config_patch():
    import torch._inductor.config as inductor_config

    before = inductor_config.fx_graph_cache
    with tp.inductor_config_patch(fx_graph_cache=not before):
        assert inductor_config.fx_graph_cache is (not before)
    assert inductor_config.fx_graph_cache == before


def test_aoti_compile_and_package():
    # Existence and the keywords codegen/aoti.build_package passes; compiled end to end
    # in tests/runtime/test_packages.py (minutes on CPU).
    import torch._inductor

    assert callable(tp.aoti_compile_and_package)
    params = inspect.signature(torch._inductor.aoti_compile_and_package).parameters
    assert {"package_path", "inductor_configs"} <= set(params)


def test_aoti_load_package():
    # Existence and the keyword codegen/aoti.load_package passes; loaded end to end in
    # tests/runtime/test_packages.py.
    import torch._inductor

    assert callable(tp.aoti_load_package)
    assert "device_index" in inspect.signature(torch._inductor.aoti_load_package).parameters
