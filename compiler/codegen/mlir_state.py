"""The module torch-mlir is handed for an ExportedProgram: the program's own module,
with every tensor the program writes in place taken as an argument.

Why: a decoder LM's prefill and decode programs write their static KV cache in place.
torch.export holds that cache as lifted constants (`lifted_tensor_N`, aliasing the
`key_cache_i` / `value_cache_i` / `cumulative_length_i` buffers) mutated by `copy_` and
`index_copy_`; `ExportedProgram.run_decompositions`, which torch-mlir runs first, cannot
functionalise a write to a constant and fails ("expected compiled_fn to be GraphModule,
got function"). Registering the constants as buffers would get past that, but the frozen
import would then bake the cache into the MLIR as a literal: the decode program would
always attend over an empty cache. Taken as arguments instead, the writes become input
mutations that functionalisation returns as results, so the MLIR function is the step
the runtime runs, with its state explicit:

    main(<program inputs>, <state 0>, ..., <state k-1>)
        -> (<state 0 after the step>, ..., <state k-1 after the step>, <program outputs>)

(for a decoder: input_ids, cache_position, then the cache tensors in the program's
order; see `state_names`). A program that writes nothing keeps its own signature.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind

from optc.compiler.rewrite import attr_value, mutated_attr_names


@dataclass
class ExportCall:
    """What to torch.export: a module, its flat positional inputs, their dynamic shapes,
    and the names of the state tensors among the inputs (the last len(state) ones)."""

    module: torch.nn.Module
    args: tuple
    dynamic_shapes: tuple | None
    state: list[str] = field(default_factory=list)  # display names (the buffers they alias)


class _FlatInputs(torch.nn.Module):
    """Calls `program` with positional inputs only: its own arguments, its keyword
    arguments in order, then a tensor for each state attribute, bound in place of that
    attribute (torch.func.functional_call), so the program's in-place writes land on
    the inputs."""

    def __init__(self, program: torch.nn.Module, n_args: int, kw_names: list[str], attrs: list[str]):
        super().__init__()
        self.program = program
        self.n_args, self.kw_names, self.attrs = n_args, list(kw_names), list(attrs)

    def forward(self, *flat):
        n, k = self.n_args, len(self.kw_names)
        args, kwargs = flat[:n], dict(zip(self.kw_names, flat[n:n + k]))
        if not self.attrs:
            return self.program(*args, **kwargs)
        state = dict(zip(self.attrs, flat[n + k:]))
        return torch.func.functional_call(self.program, state, args, kwargs, strict=False)


def export_call(ep: ExportedProgram, example_inputs: tuple[tuple, dict]) -> ExportCall:
    """The re-export of `ep` for torch-mlir (see the module docstring)."""
    module = ep.module()
    attrs = _state_attrs(ep, module)
    args, kwargs = example_inputs
    state = tuple(attr_value(module, a).detach().clone() for a in attrs)
    flat = (*args, *kwargs.values(), *state)
    shapes = _dynamic_shapes(ep, len(state))
    return ExportCall(_FlatInputs(module, len(args), list(kwargs), attrs), flat, shapes,
                      _display_names(module, attrs))


def state_names(ep: ExportedProgram) -> list[str]:
    """The tensors `ep` writes in place, in the order the MLIR function takes them."""
    module = ep.module()
    return _display_names(module, _state_attrs(ep, module))


def _state_attrs(ep: ExportedProgram, module: torch.nn.Module) -> list[str]:
    written = set(mutated_attr_names(module))
    # In the program's order (layer 2 before layer 10), not sorted by name.
    attrs = [s.target for s in ep.graph_signature.input_specs
             if s.kind in (InputKind.CONSTANT_TENSOR, InputKind.BUFFER) and s.target in written]
    return attrs + sorted(written - set(attrs))


def _dynamic_shapes(ep: ExportedProgram, n_state: int) -> tuple | None:
    """The program's dynamic dimensions as torch.export Dims with the ranges it was
    exported with (one Dim per symbol, so equal dimensions stay equal); None if static.
    A dimension whose size is an expression of symbols is left to torch.export (AUTO)."""
    user = set(ep.graph_signature.user_inputs)
    dims: dict = {}
    specs = []
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in user:
            continue
        val, spec = node.meta.get("val"), {}
        for i, size in enumerate(getattr(val, "shape", ())):
            if not isinstance(size, torch.SymInt):
                continue
            expr = size.node.expr
            rng = ep.range_constraints.get(expr)
            if rng is None or not expr.is_Symbol:
                spec[i] = Dim.AUTO
                continue
            if expr not in dims:
                upper = rng.upper
                dims[expr] = Dim(f"d{len(dims)}", min=int(rng.lower),
                                 max=int(upper) if getattr(upper, "is_finite", True) else None)
            spec[i] = dims[expr]
        specs.append(spec or None)
    if not any(specs):
        return None
    return (tuple(specs) + (None,) * n_state,)  # one entry: _FlatInputs' *flat


def _display_names(module: torch.nn.Module, attrs: list[str]) -> list[str]:
    """Each state attribute by the buffer it aliases (key_cache_0), else its own name."""
    buffers = {}
    for name, buf in module.named_buffers():
        buffers.setdefault((buf.untyped_storage().data_ptr(), tuple(buf.shape)), name)
    names = []
    for a in attrs:
        t = attr_value(module, a)
        names.append(buffers.get((t.untyped_storage().data_ptr(), tuple(t.shape)), a))
    return names
