"""optc.compiler.torch_fixes, the workarounds torch_private re-exports: one test per name
(named test_<name>, checked by tests/compiler/test_torch_private_rule.py), each showing the
bug's case and the workaround's result, on the CPU."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from optc.compiler import torch_private as tp


def _coordesc_cache_stub(tmp_path, compiled, tuned):
    """A statically launchable kernel as an FX graph cache hit hands it back (its compiled
    configurations only), with coordinate descent's choice `tuned` in its autotune cache."""
    from torch._inductor.runtime import triton_heuristics as th
    from torch._inductor.runtime.autotune_cache import AutotuneCache

    class Stub:
        filename = str(tmp_path / "cstubkernel.py")
        inductor_meta = {"coordinate_descent_tuning": True}
        fn = SimpleNamespace(fn=object())
        compile_results = [SimpleNamespace(config=c) for c in compiled]
        precompiled: list = []

        def is_statically_launchable(self):
            return True

        def _precompile_config(self, cfg):
            self.precompiled.append(cfg)
            return SimpleNamespace(config=cfg)

    stub = Stub()
    cache = AutotuneCache.create(stub.inductor_meta, stub.filename, th.hash_configs(compiled))
    cache.save(tuned, 0, found_by_coordesc=True)
    return stub


def _kernel_as_inductor_loads_it(tmp_path, filename, configs):
    """A reduction kernel's CachingAutotuner as Inductor's kernel module builds it (its
    autotune cache for `filename` looked up under `configs`), from a source file of its own."""
    import importlib.util

    from torch._inductor.runtime import triton_heuristics as th
    from torch._inductor.runtime.hints import DeviceProperties, HeuristicType

    source = tmp_path / "kernel_source.py"
    source.write_text("import triton\nimport triton.language as tl\n\n\n@triton.jit\n"
                      "def kernel(x, XBLOCK: tl.constexpr, R0_BLOCK: tl.constexpr):\n    pass\n")
    spec = importlib.util.spec_from_file_location("kernel_source", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return th.cached_autotune({"x": 64, "r0_": 64}, configs, {"device": DeviceProperties.create(torch.device("cpu"))},
                              HeuristicType.REDUCTION, filename=filename,
                              inductor_meta={"coordinate_descent_tuning": True})(module.kernel)


@pytest.fixture
def torchs_recheck(monkeypatch):
    """torch's own `recheck_autotune_cache`, installed for the test (and whatever was
    installed before put back after it), with the installer's memory cleared both ways."""
    from torch._inductor.runtime import triton_heuristics as th

    from optc.compiler import torch_fixes

    original = torch_fixes.REPLACED.get("CachingAutotuner.recheck_autotune_cache",
                                        th.CachingAutotuner.recheck_autotune_cache)
    monkeypatch.setattr(th.CachingAutotuner, "recheck_autotune_cache", original)
    monkeypatch.setattr(torch_fixes, "REPLACED", {k: v for k, v in torch_fixes.REPLACED.items()
                                                  if k != "CachingAutotuner.recheck_autotune_cache"})
    tp.static_autotuner_keeps_coordesc.cache_clear()
    yield original
    tp.static_autotuner_keeps_coordesc.cache_clear()


@pytest.mark.parametrize("moved", [False, True])
def test_static_autotuner_keeps_coordesc(tmp_path, moved, monkeypatch, torchs_recheck):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # Inductor skips its autotune cache under it

    import triton
    from torch._inductor.runtime import triton_heuristics as th

    from optc.compiler.torch_fixes import recheck_keeping_coordesc

    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    installed = tp.static_autotuner_keeps_coordesc()
    assert installed == ((2, 11) <= version <= (2, 13))  # the releases with the second loss
    assert (th.CachingAutotuner.recheck_autotune_cache is recheck_keeping_coordesc) == installed
    start = triton.Config({"XBLOCK": 64, "R0_BLOCK": 8}, num_warps=4, num_stages=1)
    tuned = triton.Config({"XBLOCK": 64, "R0_BLOCK": 32 if moved else 8}, num_warps=8 if moved else 4, num_stages=1)
    # optc's method, and torch's own where it has 2.13's fix of the first loss (2.11's fails here)
    has_fix = "len(configs) > 1" not in inspect.getsource(torchs_recheck)
    for recheck in (recheck_keeping_coordesc, torchs_recheck) if has_fix else (recheck_keeping_coordesc,):
        stub = _coordesc_cache_stub(tmp_path / recheck.__name__ / str(recheck is torchs_recheck), [start], tuned)
        recheck(stub, lambda: pytest.fail("the kernel's source was there"))
        (kept,) = stub.compile_results
        assert kept.config.found_by_coordesc  # so run() does not tune it again
        assert th.triton_config_to_hashable(kept.config) == th.triton_config_to_hashable(tuned)
        assert len(stub.precompiled) == int(moved)  # compiled only where the choice was not compiled
        assert stub.autotune_cache_info["autotune_cache_state"] == "hit"


def test_static_autotuner_keeps_a_choice_its_compile_started_from(tmp_path, monkeypatch):
    """A graph compiled while the autotune cache held a kernel's choice was compiled with
    that choice alone; its entry is keyed by the configurations the first tuning started
    from. The recheck finds it through the kernel's source, as Inductor's decorator does."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import triton
    from torch._inductor.runtime import triton_heuristics as th

    from optc.compiler.torch_fixes import recheck_keeping_coordesc

    start = triton.Config({"XBLOCK": 64, "R0_BLOCK": 8}, num_warps=4, num_stages=1)
    tuned = triton.Config({"XBLOCK": 64, "R0_BLOCK": 32}, num_warps=8, num_stages=1)
    stub = _coordesc_cache_stub(tmp_path, [start], tuned)  # the entry, keyed by [start]
    stub.compile_results = [SimpleNamespace(config=triton.Config(dict(tuned.kwargs), num_warps=8, num_stages=1))]
    stub.fn = SimpleNamespace(fn=None)  # as a kernel from the bundle comes: no function loaded
    reloads = []

    def reload_kernel_from_src():  # what Inductor's kernel module does when it is loaded
        reloads.append(_kernel_as_inductor_loads_it(tmp_path, stub.filename, [start]))
        return reloads[-1]

    recheck_keeping_coordesc(stub, reload_kernel_from_src)
    (kept,) = stub.compile_results
    assert kept.config.found_by_coordesc and len(reloads) == 1 and stub.fn is reloads[0].fn
    assert th.triton_config_to_hashable(kept.config) == th.triton_config_to_hashable(tuned)
    assert stub.precompiled == [] and stub.autotune_cache_info["autotune_cache_state"] == "hit"

    other = _coordesc_cache_stub(tmp_path / "other", [start], tuned)  # an entry for other configurations
    other.compile_results = [SimpleNamespace(config=triton.Config({"XBLOCK": 32, "R0_BLOCK": 8}, num_warps=2))]
    recheck_keeping_coordesc(other, lambda: SimpleNamespace(autotune_cache_info={"autotune_cache_state": "miss"},
                                                            configs=[start], fn=None))
    (left,) = other.compile_results  # nothing found: the compiled configuration stays, to be tuned
    assert not getattr(left.config, "found_by_coordesc", False)
    assert other.autotune_cache_info["autotune_cache_state"] == "miss"


@pytest.mark.parametrize("entry", ["found", "not found by coordesc", "another configuration"])
def test_cached_choice_not_tuned_again(tmp_path, monkeypatch, entry):
    """A kernel whose autotune cache hit holds coordinate descent's choice runs it: among
    several launchers the one that runs it is kept without timing any (nothing saved over
    the entry), and coordinate descent keeps it, although the mark on the configuration
    object was lost. Any other kernel is timed and tuned by torch's methods, as before."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import triton
    from torch._inductor.runtime import triton_heuristics as th

    from optc.compiler import torch_fixes

    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    tp.cached_choice_not_tuned_again.cache_clear()
    if not (2, 11) <= version <= (2, 13):
        assert not tp.cached_choice_not_tuned_again()
        return
    for name in ("autotune_to_one_config", "coordinate_descent_tuning"):  # put back after the test
        monkeypatch.setattr(th.CachingAutotuner, name, getattr(th.CachingAutotuner, name))
    monkeypatch.setattr(torch_fixes, "REPLACED", dict(torch_fixes.REPLACED))
    assert tp.cached_choice_not_tuned_again()
    assert th.CachingAutotuner.autotune_to_one_config is torch_fixes.autotune_keeping_cached_choice
    assert th.CachingAutotuner.coordinate_descent_tuning is torch_fixes.coordesc_keeping_cached_choice
    tp.cached_choice_not_tuned_again.cache_clear()
    calls = []  # torch's methods, as the fix calls them
    torch_fixes.REPLACED["CachingAutotuner.autotune_to_one_config"] = lambda self: calls.append("timed")
    torch_fixes.REPLACED["CachingAutotuner.coordinate_descent_tuning"] = (
        lambda self, launcher: calls.append("tuned") or "tuned")

    start = triton.Config({"XBLOCK": 64, "R0_BLOCK": 8}, num_warps=4, num_stages=1)
    tuned = triton.Config({"XBLOCK": 64, "R0_BLOCK": 32}, num_warps=8, num_stages=1)
    filename = _coordesc_cache_stub(tmp_path, [start], tuned).filename  # the entry, keyed by [start]
    if entry == "not found by coordesc":
        th.AutotuneCache.create({"coordinate_descent_tuning": True}, filename,
                                th.hash_configs([start])).save(tuned, 0, found_by_coordesc=False)
    # A real autotuner, as a load's kernel module makes it: its lookup, and its cache's `save` as its hook.
    kernel = _kernel_as_inductor_loads_it(tmp_path, filename, [start])
    if entry != "not found by coordesc":  # (an unmarked entry is a hit on torch 2.13, a miss on 2.11)
        assert kernel.autotune_cache_info["autotune_cache_state"] == "hit"
    ran = tuned if entry != "another configuration" else start
    smaller = SimpleNamespace(config=triton.Config({"XBLOCK": 64, "R0_BLOCK": 16}, num_warps=8, num_stages=1))
    launcher = SimpleNamespace(config=triton.Config(dict(ran.kwargs), num_warps=ran.num_warps, num_stages=1))
    kernel.launchers = [smaller, launcher]  # a smaller reduction block beside the compiled one
    torch_fixes.autotune_keeping_cached_choice(kernel)
    out = torch_fixes.coordesc_keeping_cached_choice(kernel, launcher)
    if entry == "found":
        assert kernel.launchers == [launcher] and out is launcher and launcher.config.found_by_coordesc
        assert calls == []
    else:
        assert calls == ["timed", "tuned"] and out == "tuned" and len(kernel.launchers) == 2
        assert not getattr(launcher.config, "found_by_coordesc", False)
    kernel.autotune_cache_info = {"autotune_cache_state": "miss"}  # a miss is always timed and tuned
    calls.clear()
    torch_fixes.autotune_keeping_cached_choice(kernel)
    assert torch_fixes.coordesc_keeping_cached_choice(kernel, smaller) == "tuned" and calls == ["timed", "tuned"]


def test_export_load_type_hints_cached(monkeypatch):
    import io
    import typing

    buf = io.BytesIO()
    torch.export.save(torch.export.export(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), (torch.ones(1, 3),)), buf)
    calls = []
    real = typing.get_type_hints
    monkeypatch.setattr(typing, "get_type_hints", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    plain, uncached = torch.export.load(io.BytesIO(buf.getvalue())), len(calls)
    calls.clear()
    with tp.export_load_type_hints_cached():
        cached = torch.export.load(io.BytesIO(buf.getvalue()))
    assert len(calls) == len(set(calls)) < uncached  # each class resolved once
    assert torch._export.serde.serialize.typing is typing  # restored
    x = torch.randn(1, 3)
    torch.testing.assert_close(cached.module()(x), plain.module()(x))


def test_export_load_schema_converters():
    """The converters give what torch's `_dict_to_dataclass` gives, value for value (a
    program with a symbolic length, optional fields and unions), refuse what it refuses,
    and are gone after the context."""
    import io
    import json
    import typing

    import pytest
    from torch._export.serde import schema, serialize

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x, mask=None):
            y = torch.relu(self.lin(x)).sum(-1, keepdim=True) * x
            return y if mask is None else y * mask

    seq = torch.export.Dim("seq", min=2, max=64)
    ep = torch.export.export(Net(), (torch.ones(1, 5, 8),), dynamic_shapes=({1: seq},))
    text = serialize.serialize(ep).exported_program.decode("utf-8")
    real = serialize._dict_to_dataclass
    plain = real(schema.ExportedProgram, json.loads(text))
    with tp.export_load_schema_converters():
        assert serialize._dict_to_dataclass is not real
        fast = serialize._dict_to_dataclass(schema.ExportedProgram, json.loads(text))
        again = serialize._dict_to_dataclass(schema.ExportedProgram, json.loads(text))  # converters reused
        with pytest.raises(AssertionError, match="expected dict with 1 key"):
            serialize._dict_to_dataclass(schema.Argument, {"as_int": 1, "as_float": 2.0})
        # Types torch's schema does not use, where torch's branches still decide: the first
        # argument of an Optional (None first fails as in torch), and `X | None`.
        device = {"type": "cpu"}
        assert serialize._dict_to_dataclass(typing.Optional[schema.Device], device) == real(schema.Device, device)
        with pytest.raises(IndexError):
            real(typing.Union[None, schema.Device], device)
        with pytest.raises(IndexError):
            serialize._dict_to_dataclass(typing.Union[None, schema.Device], device)
        assert serialize._dict_to_dataclass(schema.Device | None, device) == real(schema.Device | None, device)
        buf = io.BytesIO()
        torch.export.save(ep, buf)
        loaded = torch.export.load(io.BytesIO(buf.getvalue()))
    assert serialize._dict_to_dataclass is real  # restored
    assert fast == plain and again == plain
    assert any(n.op == "call_function" for n in loaded.graph.nodes)
    x = torch.randn(1, 7, 8)
    torch.testing.assert_close(loaded.module()(x), ep.module()(x))


def test_export_load_sympify_cached(monkeypatch):
    import io

    import sympy

    class Stack(nn.Module):  # enough tensors over a symbolic length for the parses to repeat
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))

        def forward(self, x):
            for layer in self.layers:
                x = torch.relu(layer(x)) * 2
            return x

    seq = torch.export.Dim("seq", min=2, max=64)
    ep = torch.export.export(Stack(), (torch.ones(1, 5, 8),), dynamic_shapes=({1: seq},))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    calls = []
    real = sympy.sympify
    monkeypatch.setattr(sympy, "sympify", lambda a, *r, **k: calls.append(a) or real(a, *r, **k))
    plain, uncached = torch.export.load(io.BytesIO(buf.getvalue())), len([c for c in calls if isinstance(c, str)])
    calls.clear()
    with tp.export_load_sympify_cached():
        cached = torch.export.load(io.BytesIO(buf.getvalue()))
    strings = [c for c in calls if isinstance(c, str)]
    # each expression parsed once, or twice: before and after its symbol joins the locals
    assert len(strings) <= 2 * len(set(strings)) < uncached
    assert torch._export.serde.serialize.sympy is sympy  # restored

    def metas(program):
        return [str(n.meta["val"].shape) for n in program.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]

    assert metas(cached) == metas(plain) and any("s" in m for m in metas(cached))  # the same symbolic shapes
    x = torch.randn(1, 7, 8)
    torch.testing.assert_close(cached.module()(x), plain.module()(x))


def test_config_pickles_keep_coordesc():
    """A configuration that crosses a pickle (a kernel from Inductor's compile workers)
    keeps Inductor's mark that coordinate descent found it; Triton's own `__setstate__`
    drops every attribute it does not know. A copy stays as Triton makes it."""
    import copy
    import pickle

    import triton

    from optc.compiler import torch_fixes

    # Triton's Config as it comes, whatever an earlier lowering of this process installed;
    # all of it put back as it was after the test.
    cls, before = triton.Config, dict(torch_fixes.REPLACED)
    saved = {name: vars(cls)[name] for name in ("__setstate__", "__deepcopy__") if name in vars(cls)}
    if "triton.Config.__setstate__" in before:
        cls.__setstate__ = before["triton.Config.__setstate__"]
        del cls.__deepcopy__
    torch_fixes.REPLACED.pop("triton.Config.__setstate__", None)
    tp.config_pickles_keep_coordesc.cache_clear()
    found = triton.Config({"XBLOCK": 64}, num_warps=8, num_stages=2)
    found.found_by_coordesc = True
    dropped = not getattr(pickle.loads(pickle.dumps(found)), "found_by_coordesc", False)
    try:
        assert dropped  # Triton's Config up to 3.8 at least; the test says so when that changes
        assert tp.config_pickles_keep_coordesc()
        back = pickle.loads(pickle.dumps(found))
        assert back.found_by_coordesc and back.kwargs == {"XBLOCK": 64} and (back.num_warps, back.num_stages) == (8, 2)
        plain = pickle.loads(pickle.dumps(triton.Config({"XBLOCK": 64})))
        assert not getattr(plain, "found_by_coordesc", False)  # nothing marked that was not
        copied = copy.deepcopy(found)  # how Inductor derives other configurations from one
        assert not getattr(copied, "found_by_coordesc", False) and copied.kwargs == found.kwargs
        assert copied.kwargs is not found.kwargs and (copied.num_warps, copied.num_stages) == (8, 2)
    finally:
        for name in ("__setstate__", "__deepcopy__"):
            if name in saved:
                setattr(cls, name, saved[name])
            elif name in vars(cls):
                delattr(cls, name)
        torch_fixes.REPLACED.clear()
        torch_fixes.REPLACED.update(before)
        tp.config_pickles_keep_coordesc.cache_clear()


def test_export_load_stand_ins_quiet(caplog):
    import logging

    logger = logging.getLogger("torch.export.pt2_archive._package")  # where torch 2.11 logs it
    message = "Cannot call torch.frombuffer() on empty bytes. Creating a tensor with zeros as workaround."
    with caplog.at_level(logging.WARNING, logger=logger.name):
        with tp.export_load_stand_ins_quiet():
            logger.warning(message)
            logger.warning("another warning")
        logger.warning(message)
    assert [r.getMessage() for r in caplog.records] == ["another warning", message]
