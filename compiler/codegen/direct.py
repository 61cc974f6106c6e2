"""Inductor on an exported program's graph without Dynamo in front of it.

`torch.compile` would trace the GraphModule's Python code with Dynamo before Inductor
sees it: for a program torch.export already traced, that bytecode tracing, its fake
tensor propagation and its guards are most of a load's time to the first token, even
when every kernel comes from the artifact's kernel cache (benchmarks/NOTES.md). This
hands the graph to Inductor's `compile_fx` directly: AOTAutograd lifts the parameters
and keeps the in-place KV-cache writes in the graph, exactly as after Dynamo, and the
FX graph and AOTAutograd caches key on the graph and the inputs' shapes.

`dynamic=False` semantics, as the torch.compile call this replaces: one compiled
function per signature of the inputs (shape, stride, dtype, device of each tensor, the
value of anything else), compiled at the first call that brings it.
"""

from __future__ import annotations

import functools
import threading

import torch
import torch.fx
from torch.fx._pytree import tree_flatten_spec
from torch.utils import _pytree as pytree


class DirectLowering(torch.nn.Module):
    """`gm` (an unlifted exported program, `ep.module()`) lowered by Inductor with
    `options` (the config patches torch.compile's `options=` takes)."""

    def __init__(self, gm: torch.fx.GraphModule, options: dict):
        super().__init__()
        self.gm = gm  # registered: .to(), parameters() and buffers() reach the program's state
        self.options = dict(options)
        info = getattr(gm.graph._codegen, "pytree_info", None)
        self._in_spec = info.in_spec if info is not None else None
        self._out_spec = info.out_spec if info is not None else None
        # Not a submodule: it holds gm's own tensors, which state_dict() would list twice.
        object.__setattr__(self, "_flat_gm", _flat_copy(gm))
        self._compiled: dict[tuple, object] = {}
        self._lock = threading.Lock()

    def forward(self, *args, **kwargs):
        flat = self._flatten(args, kwargs)
        key = tuple(_signature(x) for x in flat)
        fn = self._compiled.get(key)
        if fn is None:
            with self._lock:
                fn = self._compiled.get(key) or self._compile(key, flat)
        out = fn(*flat)
        return pytree.tree_unflatten(list(out), self._out_spec) if self._out_spec is not None else out

    def _flatten(self, args, kwargs) -> list:
        if self._in_spec is None:
            if kwargs:
                raise TypeError("this program takes positional inputs only")
            return list(args)
        return list(tree_flatten_spec((args, kwargs), self._in_spec))

    def _compile(self, key: tuple, flat: list):
        from torch._inductor.compile_fx import compile_fx
        from torch._subclasses import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        # As torch.inductor.standalone_compile's "from_example_inputs": the caches key
        # on a shape environment (without one they are bypassed), and every input is
        # static, as under torch.compile(dynamic=False).
        guards = getattr(self.gm, GUARDS_MODULE, None)
        if guards is not None:
            guards(*flat)  # the program's own input checks: raises on inputs it was not exported for
        context = torch._guards.TracingContext(FakeTensorMode(shape_env=ShapeEnv()))
        with torch._guards.tracing(context):
            fn = compile_fx(self._flat_gm, flat, config_patches=self.options, **_static_inputs_argument())
        self._compiled[key] = fn
        return fn


# The input checks `ep.module()` calls first (torch.export's unlifted module): a Dynamo
# wrapper that AOTAutograd's cache cannot key on, so it runs eagerly instead, once per
# input signature (DirectLowering._compile).
GUARDS_MODULE = "_guards_fn"


@functools.cache
def _static_inputs_argument() -> dict:
    """compile_fx's word for "fakify the inputs with static shapes" where it has one."""
    import inspect

    from torch._inductor.compile_fx import compile_fx

    return {"ignore_shape_env": True} if "ignore_shape_env" in inspect.signature(compile_fx).parameters else {}


def _flat_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """`gm` with flat inputs and outputs (no pytree code) and without its input-check
    call, sharing its parameters, buffers and submodules; node metadata kept."""
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == GUARDS_MODULE and not node.users:
            graph.erase_node(node)
    flat = torch.fx.GraphModule(gm, graph)
    flat.meta.update(getattr(gm, "meta", {}))
    return flat


def _signature(x):
    if isinstance(x, torch.Tensor):
        return ("t", tuple(x.shape), tuple(x.stride()), x.dtype, x.device, x.requires_grad)
    return ("v", type(x).__name__, x if isinstance(x, (int, float, bool, str, type(None))) else id(x))
