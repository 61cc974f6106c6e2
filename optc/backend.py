"""`torch.compile(model, backend="optc", options={...})`.

Registered through the `torch_dynamo_backends` entry point, so it works without
`import optc`. Options are the `--set` keys (`"skip_layers.count": 2`) plus:
`strict` (raise instead of falling back), `target` (default "auto": the target of the
GPU the inputs are on, or cpu), and `calibration` (a list of input tuples for the
compiled function: Dynamo hands the backend fake or example inputs, never data, so a
lossy pass that must measure something needs them here).

The Dynamo graph is re-exported with its parameters as attributes and its module-stack
metadata kept; with a lossy pass on, anatomy reads it and the passes rewrite it. Then it
is lowered as `optc compile` lowers a forward program for the target (the target's
rewrites, codegen/lowering.target_graph, and its Inductor options), and the compiled
function is checked against the graph before lowering on fresh random inputs. When that
fails the backend warns and falls back to plain Inductor, or raises with `strict=True`.
Block indices (`skip_layers.layers`) count the blocks inside the graph Dynamo captured,
which is the whole model when there is no graph break. Shapes are static: a graph Dynamo
made dynamic falls back.
"""

from __future__ import annotations

import re
import warnings

import torch
import torch.fx as fx
from torch.fx import traceback as fx_traceback

from optc.errors import CompileError, OptcError, UsageError

_OWN_OPTIONS = ("strict", "target", "calibration")


def optc_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, **_ignored):
    from optc.compiler import passes as pass_registry
    from optc.compiler import pipeline
    from optc.compiler.codegen.sources_tag import tag_cache_keys
    from optc.compiler.config import flat_to_nested
    from optc.compiler.torch_private import compile_fx

    tag_cache_keys()  # a cached graph is rebuilt when optc's ops change (sources_tag)
    options = dict(options or {})
    strict = bool(options.get("strict", False))
    calibration = options.get("calibration")
    target = _target(options.get("target", "auto"), example_inputs)
    sets = flat_to_nested({k: v for k, v in options.items() if k not in _OWN_OPTIONS})
    config = pipeline.resolve("default", sets)  # unknown keys are usage errors, always raised
    lossy = [
        name for name, values in config["passes"].items()
        if pass_registry.get(name).lossy and pipeline.pass_config(name, values).active()
    ]
    if not lossy and not _lowers_its_own_way(target):
        return compile_fx(gm, example_inputs)
    try:
        return _compile_through_optc(gm, example_inputs, config, calibration, target, passes=bool(lossy))
    except (OptcError, Exception) as exc:
        if strict:
            raise
        what = f"passes {lossy} and the {target.name} lowering" if lossy else f"the {target.name} lowering"
        warnings.warn(f"optc: {what} not applied ({exc}); falling back to Inductor", stacklevel=2)
        return compile_fx(gm, example_inputs)


def _target(name: str, example_inputs):
    """The target named, or for "auto" the one of the device the inputs are on (a model
    left on the CPU of a GPU machine compiles for the CPU)."""
    from optc.compiler import targets

    if name in (None, "auto"):
        on_gpu = any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs)
        return targets.get("auto" if on_gpu else "cpu")
    target = targets.get(name)
    devices = {x.device.type for x in example_inputs if isinstance(x, torch.Tensor)}
    if devices and devices != {target.device}:
        raise UsageError(f"target {name!r} compiles for {target.device}, and the model's inputs are on "
                         f"{', '.join(sorted(devices))}: move the model and inputs there, or name another target")
    return target


def _lowers_its_own_way(target) -> bool:
    """Whether `target` lowers a forward graph otherwise than plain Inductor: a rewrite of
    codegen/lowering.target_graph that applies to forward programs, or Inductor options."""
    from optc.compiler.targets import LOWERING_FIELDS

    return bool(target.inductor) or any(getattr(target, f) is True for f in LOWERING_FIELDS)


def _compile_through_optc(gm, example_inputs, config, calibration, target, *, passes: bool):
    """The Dynamo graph exported, rewritten by the passes (`passes`), lowered as `optc
    compile` lowers a forward program for `target` (its rewrites and Inductor options), and
    checked against the program before its lowering on fresh random inputs."""
    from optc.compiler import pipeline
    from optc.compiler.calibration import CalibrationContext
    from optc.compiler.codegen import lowering
    from optc.compiler.codegen.direct import flat_copy
    from optc.compiler.torch_private import compile_fx, input_checks

    if any(isinstance(x, torch.SymInt) or isinstance(x, torch.Tensor) and not all(isinstance(d, int) for d in x.shape)
           for x in example_inputs):
        raise CompileError("optc lowers static shapes, and Dynamo made some dynamic: compile with dynamic=False")
    holder, user_positions = _params_as_attributes(gm, example_inputs)
    user_inputs = tuple(example_inputs[i] for i in user_positions)
    real_inputs = tuple(_real(x) for x in user_inputs)
    with fx_traceback.preserve_node_meta(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(holder, real_inputs, strict=False)
        rewritten = ep.module()

    def make_context(program):
        if not calibration:
            raise UsageError(
                "the lossy passes need calibration data, and torch.compile gives the backend none: "
                "pass options={'calibration': [inputs, ...]} or use `optc compile`"
            )
        batches = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in calibration]
        return CalibrationContext("forward", program, [(b, {}) for b in batches])

    if passes:
        report = pipeline.run({"forward": rewritten}, "forward", config, make_context, log=lambda m: None)
        not_applied = [p for p in report
                       if p["lossy"] and p["reason"] and "not configured" not in p["reason"] and not p["applied"]]
        if not_applied:
            raise CompileError("; ".join(f"{p['name']}: {p['reason']}" for p in not_applied))
    # The graph without `ep.module()`'s hooks and input-check submodule, whose local functions
    # Inductor's FX graph cache cannot pickle into its key (it warns and does not cache). The
    # checks run once here, on the shapes Dynamo's guards hold every later call to.
    checks = input_checks(rewritten)
    if checks is not None:
        getattr(rewritten, checks)(*real_inputs)
    lowered = lowering.target_graph(rewritten, target, forward=True)
    inductor_options = lowering.inductor_options(target)
    lowering.prepare_inductor(inductor_options)
    compiled = compile_fx(flat_copy(lowered, input_checks(lowered)), list(real_inputs), inductor_options)
    _check_lowering(rewritten, compiled, real_inputs, lowering)

    def run(*all_inputs):
        return compiled(*[all_inputs[i] for i in user_positions])

    return run


def _check_lowering(program, compiled, inputs: tuple, lowering) -> None:
    """Every floating output of `compiled` against `program`'s on two fresh random inputs
    shaped like `inputs`, judged as `optc compile` judges a lowering (docs/design.md): the
    dtype's floor (lowering.TOLERANCE), or for a half-precision output the program's own
    rounding noise where larger (its half-precision weights and op results moved by one ulp:
    lowering.flippable_weights, noisy_twin), capped at lowering.NOISE_TOLERANCE_CAP. Every run
    starts from the program's buffers as they were, and they are left so: a buffer the graph
    writes in place (a static KV cache) is the model's own."""
    from optc.compiler.codegen.check_inputs import random_like_inputs, vocab_size
    from optc.compiler.codegen.noisy_twin import HALF, noisy_twin

    buffers = list(program.buffers())
    saved = [b.clone() for b in buffers]

    def run(fn, args) -> list:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)
            out = fn(*args)  # a Dynamo graph returns a flat tuple
        return list(out) if isinstance(out, (tuple, list)) else [out]

    vocab, weights, twin = vocab_size(program), None, None
    try:
        for seed in (1234, 1235):
            args, _ = random_like_inputs((inputs, {}), vocab, seed)
            args = [_with_strides_of(x, a) for x, a in zip(inputs, args)]
            expected, got = run(program, args), run(compiled, args)
            floats = [(i, ref) for i, ref in enumerate(expected)
                      if isinstance(ref, torch.Tensor) and ref.is_floating_point()]
            noisy = None
            if any(ref.dtype in HALF for _, ref in floats):
                if weights is None:  # the parameters: each run sets the buffers back
                    weights = [t for t in lowering.flippable_weights(program) if all(t is not b for b in buffers)]
                    twin = noisy_twin(program)
                with lowering.moved_by_one_ulp(weights):
                    noisy = run(twin or program, args)
            for i, ref in floats:
                tol = lowering.TOLERANCE.get(ref.dtype, 1e-2)
                if noisy is not None and ref.dtype in HALF:
                    tol = max(tol, min(lowering.rel_err(noisy[i], ref), lowering.NOISE_TOLERANCE_CAP))
                err = lowering.rel_err(got[i], ref)
                if err > tol:
                    raise CompileError(f"the lowering changed the function: relative error {err:.3g} > {tol:.3g} "
                                       "on fresh random inputs")
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)


def _with_strides_of(example, fresh):
    """`fresh` laid out with `example`'s strides (the compiled code asserts them)."""
    if not isinstance(example, torch.Tensor):
        return fresh
    return torch.empty_strided(example.shape, example.stride(), dtype=example.dtype, device=example.device).copy_(fresh)


def _real(x):
    """A real tensor with the example's shape, strides and dtype (the export traces with it,
    and Inductor's code asserts the strides it was compiled for: a KV cache's views are not
    contiguous)."""
    if not isinstance(x, torch.Tensor):
        return x
    real = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    return real.normal_() if x.is_floating_point() else real.fill_(1)  # a mask of ones keeps every score


_SOURCE_PARTS = re.compile(r"_(modules|parameters|buffers)_")


def _params_as_attributes(gm: fx.GraphModule, example_inputs):
    """Dynamo passes parameters and buffers as graph inputs; anatomy and the passes
    expect them as attributes (as torch.export gives them). Returns the rewritten
    module and the positions of the real user inputs."""
    holder = torch.nn.Module()
    graph = fx.Graph()
    mapping: dict = {}
    graph.output(graph.graph_copy(gm.graph, mapping))
    user_positions = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for position, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if not _SOURCE_PARTS.search(node.name) or not isinstance(value, torch.Tensor):
            user_positions.append(position)
            continue
        attr = _SOURCE_PARTS.sub("__", re.sub(r"^l_self_", "", node.name)).strip("_")
        if isinstance(value, torch.nn.Parameter):
            holder.register_parameter(attr, value)
        else:
            holder.register_buffer(attr, value)
        new = mapping[node]
        with graph.inserting_before(new):
            attr_node = graph.get_attr(attr)
        attr_node.meta = dict(new.meta)
        new.replace_all_uses_with(attr_node)
        graph.erase_node(new)
    return fx.GraphModule(holder, graph), user_positions
