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

import threading

import torch
import torch.fx

from optc.compiler.torch_private import (compile_fx_static, flat_graph_inputs, graph_out_spec, input_checks,
                                        tree_unflatten)


class DirectLowering(torch.nn.Module):
    """`gm` (an unlifted exported program, `ep.module()`) lowered by Inductor with
    `options` (the config patches torch.compile's `options=` takes)."""

    def __init__(self, gm: torch.fx.GraphModule, options: dict):
        super().__init__()
        self.gm = gm  # registered: .to(), parameters() and buffers() reach the program's state
        self.options = dict(options)
        self._out_spec = graph_out_spec(gm)
        self._checks = input_checks(gm)
        # Not a submodule: it holds gm's own tensors, which state_dict() would list twice.
        object.__setattr__(self, "_flat_gm", _flat_copy(gm, self._checks))
        self._compiled: dict[tuple, object] = {}
        self._lock = threading.Lock()

    def forward(self, *args, **kwargs):
        flat = flat_graph_inputs(self.gm, args, kwargs)
        key = tuple(_signature(x) for x in flat)
        fn = self._compiled.get(key)
        if fn is None:
            with self._lock:
                fn = self._compiled.get(key) or self._compile(key, flat)
        out = fn(*flat)
        return tree_unflatten(list(out), self._out_spec) if self._out_spec is not None else out

    def _compile(self, key: tuple, flat: list):
        if self._checks is not None:
            # The program's own input checks, outside the graph (torch_private.input_checks):
            # they raise on inputs it was not exported for.
            getattr(self.gm, self._checks)(*flat)
        fn = compile_fx_static(self._flat_gm, flat, self.options)
        self._compiled[key] = fn
        return fn


def _flat_copy(gm: torch.fx.GraphModule, checks: str | None) -> torch.fx.GraphModule:
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
        return ("t", tuple(x.shape), tuple(x.stride()), x.dtype, x.device, x.requires_grad)
    return ("v", type(x).__name__, x if isinstance(x, (int, float, bool, str, type(None))) else id(x))
