"""Every private torch API optc relies on, and nothing else.

Underscored torch modules and attributes change between releases without a
deprecation. optc's code reaches them only through this module, so a torch upgrade
that moves or changes one fails here first: tests/compiler/test_torch_private.py
runs one cheap smoke test per name below (test_torch_fixes.py for the workarounds
re-exported from torch_fixes), and test_torch_private_rule.py fails when
package code (optc/, compiler/, runtime/, models/) uses a private torch API anywhere else. `torch._check`
(documented for export) and `torch.__version__` are public and not listed.

Each name says why optc needs it and the torch releases it was checked on: 2.13
(CPU, where these smoke tests run) and 2.11 (the GPU machine, where the same calls ran
before they moved here). When an upgrade breaks one, fix it here (a version branch if
need be) and update its line; a new private use gets a name here and a test there.

torch._inductor and torch._dynamo are imported inside the functions that need them:
they take seconds to import, and `import optc` (or loading any compiler module) must
not pay for that. The modules imported at the top are already loaded by `import torch`.

The workarounds for torch bugs live in compiler/torch_fixes.py and are re-exported here,
under the same rules.

Lives in the compiler (optc.compiler.torch_private) and imports nothing from optc but
torch_fixes, so the compiler, the runtime, the models and the CLI can all use it
(tests/test_layering.py).
"""

from __future__ import annotations

import contextlib

import torch
import torch.fx as fx
from torch import nn

__all__ = [
    "detect_fake_mode", "FakeTensor",
    "OpOverload", "op_schema",
    "tree_flatten", "tree_unflatten", "tree_flatten_spec", "graph_module_in_spec",
    "graph_codegen", "set_graph_codegen", "codegen_without_out_spec", "flat_graph_inputs",
    "buffer_slots", "non_persistent_buffer_names", "set_tensor_attr",
    "compile_fx", "compile_fx_static", "graph_out_spec", "input_checks", "check_call_structure",
    "pick_vec_isa", "inductor_config_patch", "aoti_compile_and_package", "aoti_load_package",
    "inductor_realize_op", "fresh_cache_artifacts", "autotune_cache_artifacts", "inductor_triton_cache_dir",
    "warm_compile_workers",
    "use_inductors_ptxas",
    "export_load_type_hints_cached", "export_load_sympify_cached", "export_load_schema_converters",
    "export_load_stand_ins_quiet", "static_autotuner_keeps_coordesc", "config_pickles_keep_coordesc",
    "cached_choice_not_tuned_again",
    "import_export_deserialiser",
    "dynamo_counters", "python_dispatcher",
    "cuda_driver_api_version",
]

# --------------------------------------------------------------------------- fake tensors

# The FakeTensorMode an exported graph's `meta["val"]` tensors belong to, to compute new
# nodes' shape metadata in the same mode (head_narrow, token_region). torch 2.11-2.13.
from torch._guards import detect_fake_mode  # noqa: E402

# The type of an exported node's `meta["val"]`, to tell shape metadata from other
# values (passes/share_kv_heads). torch 2.11-2.13.
from torch._subclasses.fake_tensor import FakeTensor  # noqa: E402

# --------------------------------------------------------------------------- operators

# The type of an aten/custom op call target in an exported graph (`aten.mm.default`), to
# read its schema's aliasing (rewrite.mutated_attr_names, codegen/mlir). torch 2.11-2.13.
from torch._ops import OpOverload  # noqa: E402


def op_schema(target):
    """The `torch._C.FunctionSchema` of an op overload (arguments, returns, alias info,
    `is_mutable`), or None for any other call target (a Python function, an
    OpOverloadPacket, a higher-order op). optc reads which arguments an op writes in
    place (KV-cache state, cost model). `OpOverload._schema`, torch 2.11-2.13."""
    return getattr(target, "_schema", None)


# --------------------------------------------------------------------------- pytrees

# Flatten and rebuild (args, kwargs) with the TreeSpec types torch.export records in
# `ep.call_spec.in_spec` (codegen/aoti feeds packages flat inputs). torch 2.11-2.13.
from torch.utils._pytree import tree_flatten, tree_unflatten  # noqa: E402

# Flatten (args, kwargs) by an existing TreeSpec, as `ep.module()` does for its own
# inputs (codegen/aoti.PackagedProgram). torch 2.11-2.13.
from torch.fx._pytree import tree_flatten_spec  # noqa: E402


def graph_module_in_spec(gm: fx.GraphModule):
    """The input TreeSpec of a GraphModule made by `ExportedProgram.module()`, to flatten
    a call's (args, kwargs) exactly as that module would (codegen/aoti).
    `GraphModule._in_spec`, set by torch.export's unlifting, torch 2.11-2.13."""
    return gm._in_spec


# --------------------------------------------------------------------------- fx codegen


def graph_codegen(graph: fx.Graph):
    """The graph's CodeGen: for an exported program a `_PyTreeCodeGen` that gives the
    generated forward the program's keyword signature and output structure.
    `Graph._codegen`, torch 2.11-2.13."""
    return graph._codegen


def set_graph_codegen(graph: fx.Graph, codegen) -> None:
    """Give a copied graph the original's CodeGen (rewrite.rebuild keeps the program's
    signature). `Graph._codegen`, torch 2.11-2.13."""
    graph._codegen = codegen


def codegen_without_out_spec(codegen):
    """A copy of a pytree CodeGen that returns its graph's outputs unflattened (its input
    signature kept), so that a copy of a program can return extra values (calibration
    reads the residual stream this way); any other CodeGen as it is.
    `torch.fx.graph._PyTreeCodeGen` and its `pytree_info.out_spec`, torch 2.11-2.13."""
    import copy

    from torch.fx.graph import _PyTreeCodeGen

    if isinstance(codegen, _PyTreeCodeGen):
        plain = copy.copy(codegen)
        plain.pytree_info = codegen.pytree_info._replace(out_spec=None)
        return plain
    return codegen


def flat_graph_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """A call's (args, kwargs) as the values of `gm`'s placeholders, in order, as its
    generated forward binds them (calibration's sequential run interprets the graph
    node by node). The pytree CodeGen's `pytree_info.in_spec`, torch 2.11-2.13; a
    graph without one takes its arguments positionally."""
    info = getattr(graph_codegen(gm.graph), "pytree_info", None)
    if info is not None and info.in_spec is not None:
        return list(tree_flatten_spec((args, kwargs), info.in_spec))
    return [*args, *kwargs.values()]


# --------------------------------------------------------------------------- module internals


def buffer_slots(module: nn.Module) -> dict:
    """A module's own buffer slots, the live dict (entries may be None). Writing into it
    swaps a buffer's tensor without registering it again, so it stays (non-)persistent
    and no check runs (KV-cache ties, dtype casts, buffers of a program being rewritten).
    `nn.Module._buffers`, torch 2.11-2.13."""
    return module._buffers


def non_persistent_buffer_names(module: nn.Module) -> set:
    """Names of a module's own buffers registered with persistent=False (Hugging Face's
    rotary `inv_freq`), the live set: `state_dict` leaves them out, which decides how
    export and dtype casts treat them (codegen/mlir, models/builders).
    `nn.Module._non_persistent_buffers_set`, torch 2.11-2.13."""
    return module._non_persistent_buffers_set


def set_tensor_attr(owner: nn.Module, leaf: str, value: torch.Tensor) -> None:
    """Rebind `owner.<leaf>` to `value` without nn.Module's checks: a buffer keeps its
    slot and persistence, a GraphModule constant (a plain attribute) is set directly.
    How the KV cache is tied between programs and handed to packages, and how pruned
    buffers are swapped in. `nn.Module._buffers`, torch 2.11-2.13."""
    if leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:  # a GraphModule constant (lifted tensor) is a plain attribute
        object.__setattr__(owner, leaf, value)


# --------------------------------------------------------------------------- Inductor (lazy)


def compile_fx(gm: fx.GraphModule, example_inputs, config_patches: dict | None = None):
    """Inductor's compiler entry for a Dynamo graph: what the `optc` torch.compile
    backend hands graphs to (optc/backend.py), with Inductor options `config_patches`.
    `torch._inductor.compile_fx.compile_fx`, torch 2.11-2.13."""
    from torch._inductor.compile_fx import compile_fx as _compile_fx

    use_inductors_ptxas()
    return _compile_fx(gm, example_inputs, config_patches=config_patches)


def compile_fx_static(gm: fx.GraphModule, example_inputs: list, config_patches: dict):
    """Inductor on a flat graph without Dynamo (codegen/direct.py), every input static as
    under `torch.compile(dynamic=False)`, with the FX graph and AOTAutograd caches on:
    they bypass a graph compiled without a shape environment, so a tracing context
    supplies one, as `torch._inductor.standalone_compile(dynamic_shapes=
    "from_example_inputs")` does. `compile_fx(..., ignore_shape_env=)` (static fake
    inputs; absent before it existed), `torch._guards.TracingContext`, torch 2.13 and 2.11
    (the GPU tests and a Llama-1B compile and load ran through it there)."""
    import inspect

    from torch._guards import TracingContext, tracing
    from torch._inductor.compile_fx import compile_fx as _compile_fx
    from torch._subclasses import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    if "ignore_shape_env" not in inspect.signature(_compile_fx).parameters:
        # Without it the shape environment would make the inputs' sizes symbolic.
        raise RuntimeError(f"torch {torch.__version__}'s Inductor cannot compile a graph with static inputs "
                           "outside Dynamo (compile_fx has no ignore_shape_env); optc needs torch 2.8 or later")
    use_inductors_ptxas()
    with tracing(TracingContext(FakeTensorMode(shape_env=ShapeEnv()))):
        return _compile_fx(gm, example_inputs, config_patches=config_patches, ignore_shape_env=True)


def graph_out_spec(gm: fx.GraphModule):
    """The output TreeSpec of a program's pytree CodeGen (None: the graph returns its
    outputs flat), to rebuild what `ep.module()` returns from a flat compiled call
    (codegen/direct). `pytree_info.out_spec`, torch 2.11-2.13."""
    info = getattr(graph_codegen(gm.graph), "pytree_info", None)
    return info.out_spec if info is not None else None


def input_checks(gm: fx.GraphModule) -> str | None:
    """The name of the submodule through which a module made by `ep.module()` checks its
    inputs before anything runs (`_guards_fn`: a Dynamo-wrapped function, which
    AOTAutograd's cache cannot key on, so codegen/direct calls it eagerly instead of in
    the graph); None where the module has none. torch 2.13 and 2.11 (as compile_fx_static)."""
    return "_guards_fn" if isinstance(getattr(gm, "_guards_fn", None), nn.Module) else None


def check_call_structure(gm: fx.GraphModule, args: tuple, kwargs: dict) -> None:
    """What a module made by `ep.module()` checks in its forward pre-hook before running:
    the call's (args, kwargs) have the structure the program was exported with (a clear
    error for an unknown keyword or a missing input), and, where the module carries no
    input-check submodule (input_checks), the exported shape constraints. The hook is
    called directly, as the module would (codegen/direct never calls the module itself).
    `torch.export._unlift._check_input_constraints_pre_hook`, torch 2.13 and 2.11 (as compile_fx_static)."""
    from torch.export import _unlift

    hook = getattr(_unlift, "_check_input_constraints_pre_hook", None)
    if hook is not None and any(h is hook for h in gm._forward_pre_hooks.values()):
        hook(gm, args, kwargs)


def pick_vec_isa():
    """The CPU vector instruction set Inductor generates code for (avx512, avx2, ...;
    falsy when none), recorded in a package's environment so it loads only where that
    code runs (codegen/aoti). `torch._inductor.cpu_vec_isa.pick_vec_isa`, torch 2.11-2.13."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa as _pick_vec_isa

    return _pick_vec_isa()


def inductor_config_patch(**changes):
    """A context manager (and decorator) that sets global Inductor config keys and
    restores them on exit; the benchmarks compile baselines with
    `fx_graph_cache=False` (runtime/bench). `torch._inductor.config.patch`,
    torch 2.11-2.13."""
    import torch._inductor.config as inductor_config

    return inductor_config.patch(**changes)


def aoti_compile_and_package(ep, **kwargs) -> str:
    """Compile an ExportedProgram ahead of time into a .pt2 package; returns its path
    (codegen/aoti.build_package; kwargs: package_path, inductor_configs).
    `torch._inductor.aoti_compile_and_package`, torch 2.11-2.13."""
    import torch._inductor

    return torch._inductor.aoti_compile_and_package(ep, **kwargs)


def aoti_load_package(path: str, **kwargs):
    """Load a .pt2 package as a runner (get_constant_fqns, load_constants, __call__)
    (codegen/aoti.load_package; kwargs: device_index).
    `torch._inductor.aoti_load_package`, torch 2.11-2.13."""
    import torch._inductor

    return torch._inductor.aoti_load_package(path, **kwargs)


def inductor_realize_op():
    """An identity op that Inductor lowers by writing its input to a buffer of its own
    (`ExternKernel.require_stride_order` realizes a computed value), and that runs as
    the identity (or a copy into that stride) outside Inductor: codegen/gemv_inputs
    puts it before a decode GEMV so Inductor does not recompute the GEMV's input in
    every block of output rows. `torch.ops.prims.inductor_force_stride_order`,
    registered by `torch._inductor.inductor_prims`, torch 2.11-2.13."""
    import torch._inductor.inductor_prims  # noqa: F401  (registers the prim)

    return torch.ops.prims.inductor_force_stride_order.default


def fresh_cache_artifacts():
    """A context inside which Inductor's record of cache artifacts (what the public
    `torch.compiler.save_cache_artifacts()` serialises: FX graph, AOTAutograd and
    autotune cache entries, written or read) starts empty, and after which the
    process's own record is restored: codegen/kernel_cache records one compile's
    lowering and nothing else. `torch.compiler._cache.CacheArtifactManager
    .with_fresh_cache`, torch 2.11-2.13."""
    from torch.compiler._cache import CacheArtifactManager

    return CacheArtifactManager.with_fresh_cache()


def autotune_cache_artifacts(data: bytes) -> list:
    """The autotune cache entries (each kernel's chosen configuration) among serialised
    cache artifacts (what `torch.compiler.save_cache_artifacts()` returned), each with
    `populate_cache()` to write it into this machine's cache; None where torch cannot
    read the bytes. codegen/tuned_configs carries them without the compiled graphs.
    `torch.compiler._cache.CacheArtifactManager.deserialize`, torch 2.11-2.13."""
    from torch.compiler._cache import CacheArtifactManager

    artifacts = CacheArtifactManager.deserialize(data)
    return None if artifacts is None else list(artifacts.get("autotune", []))


def warm_compile_workers() -> None:
    """Start Inductor's pool of compile worker processes now. A lowering hands its Triton
    kernels to the pool only once the pool's workers are up, and until then compiles them
    one after another in this process: a load that lowers from the kernel cache asks for
    its kernels within a second of its first lowering, long before a pool started there
    is ready (benchmarks/NOTES.md, "the load since PDL"). torch's own
    `torch._inductor.async_compile.maybe_warm_pool` (which leaves the pool alone under
    TORCH_WARM_POOL=0, without Triton, or with one compile thread), torch 2.11-2.13."""
    from torch._inductor.async_compile import maybe_warm_pool

    maybe_warm_pool()


def use_inductors_ptxas() -> None:
    """Point Triton at the ptxas Inductor compiles with (the one torch's build ships, through
    TRITON_PTXAS_PATH) before this process compiles its first Triton kernel. Inductor sets
    it in its compile workers and before a compile of its own in this process, but a kernel
    compiled here before that (coordinate descent's candidates, optc's kernels run eagerly)
    used Triton's bundled ptxas; Triton caches the first ptxas version it reads as part of
    every cache key of the process, so the same kernel compiled at compile time and at load
    had two keys and missed the artifact's Triton pack (benchmarks/NOTES.md, "one ptxas").
    `torch._inductor.runtime.compile_tasks._set_triton_ptxas_path`, torch 2.11-2.13."""
    from torch._inductor.runtime.compile_tasks import _set_triton_ptxas_path

    _set_triton_ptxas_path()


def inductor_triton_cache_dir(device_index: int) -> str:
    """The Triton cache directory Inductor compiles into for a CUDA device: TRITON_CACHE_DIR
    where set, else `<Inductor's cache>/triton/<device>`, which Inductor's first autotuner
    of the process then writes into TRITON_CACHE_DIR (`CachingAutotuner.__init__`).
    `torch._inductor.runtime.cache_dir_utils.triton_cache_dir`, torch 2.11-2.13."""
    from torch._inductor.runtime.cache_dir_utils import triton_cache_dir

    return triton_cache_dir(device_index)


# --------------------------------------------------------------------------- torch bugs

# Workarounds for torch bugs, applied only where the installed release has them:
# torch.export.load's repeated parsing, Inductor's re-tuning of cached kernels.
from optc.compiler.torch_fixes import (  # noqa: E402
    cached_choice_not_tuned_again, config_pickles_keep_coordesc, export_load_schema_converters,
    export_load_stand_ins_quiet, export_load_sympify_cached, export_load_type_hints_cached,
    static_autotuner_keeps_coordesc)


# --------------------------------------------------------------------------- torch.export (lazy)

def import_export_deserialiser() -> None:
    """Import what torch.export.load deserialises programs with (and Dynamo with it),
    which the public `torch.export` leaves to the first load (runtime/artifact imports it
    while an artifact's members are read). torch 2.11-2.13."""
    import torch._export.serde.serialize  # noqa: F401


# --------------------------------------------------------------------------- Dynamo (lazy)


@contextlib.contextmanager
def python_dispatcher():
    """torch's Python dispatcher, under which torch.export (and fx's ShapeProp) run ops on
    fake tensors: with it, ops such as linear and matmul decompose in Python and read a
    symbolic size symbolically. Without it torch 2.11's C++ matmul asks a tensor with a
    symbolic size for its numel and raises. Checked on 2.13; the failure it avoids is 2.11's."""
    from torch._dispatch.python import enable_python_dispatcher

    with enable_python_dispatcher():
        yield


def dynamo_counters():
    """Dynamo's global event counters (a dict of Counters): `["stats"]["unique_graphs"]`
    says how many graphs were compiled, `["inductor"]["cudagraph_skips"]` how often
    Inductor's CUDA graphs were skipped; the baselines report both (runtime/baselines).
    `torch._dynamo.utils.counters`, torch 2.11-2.13."""
    from torch._dynamo.utils import counters

    return counters


# --------------------------------------------------------------------------- CUDA


def cuda_driver_api_version() -> int:
    """The CUDA driver API version (12080 for 12.8), keying a device's cost-model
    calibration where /proc/driver/nvidia is missing (search/device_db). Raises where
    there is no CUDA driver. `torch._C._cuda_getDriverVersion`, torch 2.11-2.13
    (CUDA builds; a CPU build lacks it and raises AttributeError)."""
    return torch._C._cuda_getDriverVersion()
