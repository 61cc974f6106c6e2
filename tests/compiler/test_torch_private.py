"""optc.compiler.torch_private: one cheap CPU smoke test per private torch API optc uses
(named test_<name>, checked below), so a torch upgrade that moves or changes one fails
here first. tests/compiler/test_torch_private_rule.py checks that every name has one, and
scans the package code for private torch APIs used anywhere but that module. The names
torch_private re-exports from torch_fixes have theirs in tests/compiler/test_torch_fixes.py;
the Inductor, export-loading and AOTInductor ones that need no exported program are in
tests/compiler/test_torch_private_inductor.py.

The AOTInductor compile and load are only checked for the keywords optc passes (a real
compile takes minutes on CPU; tests/runtime/test_packages.py compiles and loads packages
end to end). The CUDA driver version needs a CUDA build with a GPU."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
from torch import nn

from optc.compiler import torch_private as tp

aten = torch.ops.aten


class _Small(nn.Module):
    """A linear layer, a persistent and a non-persistent buffer, an in-place write into
    a buffer, and keyword inputs: what the exported programs optc handles have."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("scale", torch.full((3,), 2.0))
        self.register_buffer("state", torch.zeros(3), persistent=False)

    def forward(self, x, *, bias):
        y = self.lin(x) * self.scale + bias
        self.state.add_(y.sum(0))
        return {"y": y, "total": y.sum()}


@pytest.fixture(scope="module")
def exported():
    x, bias = torch.randn(2, 4), torch.randn(3)
    ep = torch.export.export(_Small(), (x,), {"bias": bias}, strict=False)
    return ep, (x,), {"bias": bias}


def _call_targets(ep):
    return [n.target for n in ep.graph.nodes if n.op == "call_function"]


# --------------------------------------------------------------------------- fake tensors


def test_detect_fake_mode(exported):
    ep, _, _ = exported
    vals = [n.meta.get("val") for n in ep.graph.nodes]
    mode = tp.detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    assert mode is not None
    fake = mode.from_tensor(torch.zeros(5, 2), static_shapes=True)  # how head_narrow makes shape metadata
    assert isinstance(fake, tp.FakeTensor) and fake.shape == (5, 2)
    assert tp.detect_fake_mode([torch.zeros(2)]) is None  # real tensors: no mode


def test_python_dispatcher():
    """Under it, matmul runs its Python decomposition (what reads a symbolic size
    symbolically) instead of its C++ kernel: a C++ kernel that fails is not reached."""
    import warnings

    def failing(x, w):
        raise RuntimeError("the C++ matmul ran")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.library._scoped_library("aten", "IMPL") as lib:
            lib.impl("matmul", failing, "CompositeImplicitAutograd")
            with pytest.raises(RuntimeError, match="the C.. matmul ran"):
                torch.matmul(torch.ones(2, 3), torch.ones(3, 4))
            with tp.python_dispatcher():
                assert torch.equal(torch.matmul(torch.ones(2, 3), torch.ones(3, 4)), torch.full((2, 4), 3.0))


def test_FakeTensor(exported):
    ep, _, _ = exported
    vals = [n.meta["val"] for n in ep.graph.nodes if n.op == "call_function" and "val" in n.meta]
    assert vals and any(isinstance(v, tp.FakeTensor) for v in vals)
    assert not isinstance(torch.zeros(2), tp.FakeTensor)


# --------------------------------------------------------------------------- operators


def test_OpOverload(exported):
    ep, _, _ = exported
    targets = _call_targets(ep)
    assert any(isinstance(t, tp.OpOverload) for t in targets)
    assert isinstance(aten.add_.Tensor, tp.OpOverload)
    assert not isinstance(aten.add_, tp.OpOverload)  # the packet, not an overload
    assert not isinstance(operator.getitem, tp.OpOverload)


def test_op_schema(exported):
    inplace = tp.op_schema(aten.add_.Tensor)
    assert inplace.is_mutable and not tp.op_schema(aten.add.Tensor).is_mutable
    # the alias info rewrite.mutated_attr_names reads: add_ writes its first argument,
    # and returns an alias of it
    first = inplace.arguments[0]
    assert first.alias_info is not None and first.alias_info.is_write
    assert inplace.returns[0].alias_info.before_set == first.alias_info.before_set
    assert tp.op_schema(operator.getitem) is None and tp.op_schema(len) is None
    # the exported program's in-place buffer write is found through its schema
    ep, _, _ = exported
    assert any(getattr(tp.op_schema(t), "is_mutable", False) for t in _call_targets(ep))


# --------------------------------------------------------------------------- pytrees


def test_tree_flatten():
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    flat, spec = tp.tree_flatten(((a, b), {"k": c}))
    assert len(flat) == 3 and all(x is y for x, y in zip(flat, [a, b, c]))
    assert spec.num_leaves == 3


def test_tree_unflatten(exported):
    ep, args, kwargs = exported
    flat, _ = tp.tree_flatten((tuple(args), dict(kwargs)))
    # codegen/aoti rebuilds (args, kwargs) with the spec torch.export recorded
    back_args, back_kwargs = tp.tree_unflatten(flat, ep.call_spec.in_spec)
    assert back_args[0] is args[0] and back_kwargs["bias"] is kwargs["bias"]


def test_tree_flatten_spec(exported):
    ep, args, kwargs = exported
    flat = tp.tree_flatten_spec((args, kwargs), ep.call_spec.in_spec)
    assert len(flat) == 2 and flat[0] is args[0] and flat[1] is kwargs["bias"]


def test_graph_module_in_spec(exported):
    ep, args, kwargs = exported
    gm = ep.module()
    spec = tp.graph_module_in_spec(gm)
    assert spec == ep.call_spec.in_spec
    flat = tp.tree_flatten_spec((args, kwargs), spec)  # codegen/aoti.PackagedProgram
    assert flat[0] is args[0] and flat[1] is kwargs["bias"]


# --------------------------------------------------------------------------- fx codegen


def test_graph_codegen(exported):
    ep, _, _ = exported
    gm = ep.module()
    codegen = tp.graph_codegen(gm.graph)
    assert isinstance(codegen, fx.graph.CodeGen)
    assert codegen.pytree_info.out_spec is not None  # a program's codegen rebuilds its outputs
    assert isinstance(tp.graph_codegen(fx.Graph()), fx.graph.CodeGen)


def test_set_graph_codegen(exported):
    ep, args, kwargs = exported
    gm = ep.module()
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    tp.set_graph_codegen(graph, tp.graph_codegen(gm.graph))
    assert tp.graph_codegen(graph) is tp.graph_codegen(gm.graph)
    copy = fx.GraphModule(gm, graph)  # keeps the keyword signature and the dict output
    out = copy(*args, **kwargs)
    assert set(out) == {"y", "total"}


def test_flat_graph_inputs(exported):
    ep, args, kwargs = exported
    gm = ep.module()
    flat = tp.flat_graph_inputs(gm, args, kwargs)  # calibration's node-by-node run binds placeholders so
    assert len(flat) == 2 and flat[0] is args[0] and flat[1] is kwargs["bias"]
    plain = fx.symbolic_trace(nn.Linear(4, 3))  # no pytree CodeGen: positional
    assert tp.flat_graph_inputs(plain, args, {}) == [args[0]]


def test_codegen_without_out_spec(exported):
    ep, args, kwargs = exported
    gm = ep.module()
    codegen = tp.graph_codegen(gm.graph)
    plain = tp.codegen_without_out_spec(codegen)
    assert plain is not codegen and plain.pytree_info.out_spec is None
    assert plain.pytree_info.in_spec == codegen.pytree_info.in_spec
    assert codegen.pytree_info.out_spec is not None  # the original is untouched
    other = fx.graph.CodeGen()
    assert tp.codegen_without_out_spec(other) is other
    # end to end, as rewrite.rebuild returns extra values next to the outputs
    from optc.compiler.rewrite import rebuild

    extra = next(n for n in gm.graph.nodes if n.op == "call_function")
    new, _ = rebuild(gm, extra_outputs=[extra])
    out, values = new(*args, **kwargs)
    assert len(values) == 1 and isinstance(values[0], torch.Tensor)


# --------------------------------------------------------------------------- module internals


def test_buffer_slots():
    m = _Small()
    m.register_buffer("empty", None)
    slots = tp.buffer_slots(m)
    assert set(slots) == {"scale", "state", "empty"} and slots["empty"] is None
    new = torch.ones(3)
    slots["scale"] = new  # live: the module sees the swap, and it stays persistent
    assert m.scale is new and "scale" in m.state_dict()
    assert tp.buffer_slots(m.lin) == {}


def test_non_persistent_buffer_names():
    m = _Small()
    names = tp.non_persistent_buffer_names(m)
    assert set(names) == {"state"}
    m.register_buffer("state", m.state, persistent=True)  # live: codegen/mlir re-registers
    assert "state" not in tp.non_persistent_buffer_names(m) and "state" in m.state_dict()


def test_set_tensor_attr():
    m = _Small()
    new = torch.ones(3)
    tp.set_tensor_attr(m, "state", new)  # a buffer keeps its slot and stays non-persistent
    assert m.state is new and tp.buffer_slots(m)["state"] is new
    assert "state" in tp.non_persistent_buffer_names(m) and "state" not in m.state_dict()
    const = torch.zeros(2)
    tp.set_tensor_attr(m, "lifted_tensor_0", const)  # a GraphModule constant: a plain attribute
    assert m.lifted_tensor_0 is const and "lifted_tensor_0" not in tp.buffer_slots(m)


# --------------------------------------------------------------------------- Inductor


def test_compile_fx():
    gm = fx.symbolic_trace(lambda x: torch.relu(x) + 1)
    x = torch.randn(8)
    compiled = tp.compile_fx(gm, [x])
    out = compiled(x)
    out = out[0] if isinstance(out, (tuple, list)) else out
    torch.testing.assert_close(out, torch.relu(x) + 1)


def test_compile_fx_static():
    from optc.compiler.codegen.direct import flat_copy

    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    ep = torch.export.export(lin, (torch.randn(2, 4),), strict=False)
    gm = ep.module()
    flat = flat_copy(gm, tp.input_checks(gm))
    x = torch.randn(2, 4)
    counts = tp.dynamo_counters()["inductor"]
    before = {k: counts[k] for k in ("fxgraph_cache_bypass", "fxgraph_cache_hit", "fxgraph_cache_miss")}
    out = tp.compile_fx_static(flat, [x], {"fx_graph_cache": True})(x)
    out = out[0] if isinstance(out, (tuple, list)) else out
    torch.testing.assert_close(out, lin(x))
    # A shape environment was there: the FX graph cache was looked up, not bypassed.
    assert counts["fxgraph_cache_bypass"] == before["fxgraph_cache_bypass"]
    assert counts["fxgraph_cache_hit"] + counts["fxgraph_cache_miss"] == \
        before["fxgraph_cache_hit"] + before["fxgraph_cache_miss"] + 1


def test_check_call_structure(exported):
    ep, args, kwargs = exported
    gm = ep.module()
    tp.check_call_structure(gm, args, kwargs)  # the call it was exported with passes
    with pytest.raises(ValueError):
        tp.check_call_structure(gm, args, {**kwargs, "unknown": 1})


def test_graph_out_spec(exported):
    ep, _, _ = exported
    assert tp.graph_out_spec(ep.module()) is not None
    assert tp.graph_out_spec(fx.symbolic_trace(lambda x: x + 1)) is None


def test_input_checks(exported):
    ep, _, _ = exported
    gm = ep.module()
    name = tp.input_checks(gm)
    if name is not None:  # torch releases whose unlifted modules check their inputs
        assert any(n.op == "call_module" and n.target == name for n in gm.graph.nodes)
    assert tp.input_checks(fx.symbolic_trace(lambda x: x + 1)) is None


# --------------------------------------------------------------------------- Dynamo


def test_dynamo_counters():
    counters = tp.dynamo_counters()
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    fn = torch.compile(lambda x: x * 2 + 1, backend="eager")
    fn(torch.randn(4))
    assert counters["stats"]["unique_graphs"] == before + 1
    assert isinstance(counters["inductor"]["cudagraph_skips"], int)  # read by the baselines
    assert tp.dynamo_counters() is counters
    torch._dynamo.reset()


# --------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA driver version needs a CUDA build and a GPU")
def test_cuda_driver_api_version():
    version = tp.cuda_driver_api_version()
    assert isinstance(version, int) and version >= 11000  # e.g. 12080 for CUDA 12.8


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks a CPU build of torch")
def test_cuda_driver_api_version_fails_on_a_cpu_build():
    # search/device_db catches this and records no driver.
    assert callable(tp.cuda_driver_api_version)
    with pytest.raises(AttributeError):
        tp.cuda_driver_api_version()
    from optc.compiler.search.device_db import _nvidia_driver

    assert _nvidia_driver() is None or isinstance(_nvidia_driver(), str)
