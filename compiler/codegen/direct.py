"""Inductor on an exported program's graph without Dynamo in front of it.

`torch.compile` would trace the GraphModule's Python code with Dynamo before Inductor
sees it: for a program torch.export already traced, that bytecode tracing, its fake
tensor propagation and its guards are most of a load's time to the first token, even
when every kernel comes from the artifact's kernel cache (benchmarks/NOTES.md). This
hands the graph to Inductor's `compile_fx` directly: AOTAutograd lifts the parameters
and keeps the in-place KV-cache writes in the graph, exactly as after Dynamo, and the
FX graph and AOTAutograd caches key on the graph and the inputs' shapes.

`dynamic=False` semantics, as the torch.compile call this replaces: one compiled
function per signature of a call (its structure, grad mode, the type, shape, stride,
dtype, device of each tensor, the value of anything else), compiled at the first call
that brings it.
"""

from __future__ import annotations

import threading

import torch
import torch.fx

from optc.compiler.torch_private import (check_call_structure, compile_fx_static, flat_graph_inputs, graph_out_spec,
                                        input_checks, tree_unflatten)


class DirectLowering(torch.nn.Module):
    """`gm` (an unlifted exported program, `ep.module()`) lowered by Inductor with
    `options` (the config patches torch.compile's `options=` takes).

    A compiled function holds the tensors the program held when it was compiled, as an
    AOTInductor package does: move the module (`.to()`, which drops the compiled
    functions) or tie its buffers before its first call, not between calls."""

    def __init__(self, gm: torch.fx.GraphModule, options: dict):
        super().__init__()
        self.gm = gm  # registered: parameters(), buffers() and .to() reach the program's state
        self.options = dict(options)
        self._out_spec = graph_out_spec(gm)
        self._checks = input_checks(gm)
        self._compiled: dict[tuple, object] = {}
        self._lock = threading.Lock()

    def forward(self, *args, **kwargs):
        try:
            flat = flat_graph_inputs(self.gm, args, kwargs)
        except Exception:
            check_call_structure(self.gm, args, kwargs)  # a missing input: the module's own, clear error
            raise
        # The keywords' names are in the key: an unknown one, which flattening ignores, is a
        # new signature and meets the module's check in _compile.
        key = (len(args), tuple(kwargs), torch.is_grad_enabled(), *(_signature(x) for x in flat))
        fn = self._compiled.get(key)
        if fn is None:
            with self._lock:
                fn = self._compiled.get(key) or self._compile(key, args, kwargs, flat)
        out = fn(*flat)
        return tree_unflatten(list(out), self._out_spec) if self._out_spec is not None else out

    def _compile(self, key: tuple, args: tuple, kwargs: dict, flat: list):
        # The checks the module would run before its graph, once per signature: its pre-hook
        # (the call's structure; the shape constraints where it has no input-check
        # submodule), then that submodule.
        check_call_structure(self.gm, args, kwargs)
        if self._checks is not None:
            getattr(self.gm, self._checks)(*flat)
        # The flat copy is made here, so that it holds the tensors the program holds now.
        fn = compile_fx_static(flat_copy(self.gm, self._checks), flat, self.options)
        self._compiled[key] = fn
        return fn

    def _apply(self, fn, *rest, **kw):
        # Moved or cast tensors are new objects the compiled functions do not hold.
        self._compiled.clear()
        return super()._apply(fn, *rest, **kw)


def flat_copy(gm: torch.fx.GraphModule, checks: str | None) -> torch.fx.GraphModule:
    """`gm` with flat inputs and outputs (no pytree code) and without the call of its
    input-check submodule `checks`, sharing its parameters, buffers and submodules;
    node metadata kept."""
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    for node in list(graph.nodes):
        if checks is not None and node.op == "call_module" and node.target == checks and not node.users:
            graph.erase_node(node)
    flat = torch.fx.GraphModule(gm, graph)
    flat.meta.update(getattr(gm, "meta", {}))
    return flat


def _signature(x):
    if isinstance(x, torch.Tensor):
        return ("t", type(x), tuple(x.shape), tuple(x.stride()), x.dtype, x.device, x.requires_grad)
    try:
        hash(x)
    except TypeError:
        return ("v", type(x), id(x))  # an unhashable value: this very object
    return ("v", type(x), x)
