"""AOTInductor packages: each program compiled ahead of time for the target, so that a
load on the same target and versions runs the code that was verified here instead of
running Inductor (and, on a GPU, autotuning) again.

How a program becomes a package:
  * The decoder's KV cache is state the program writes in place through GraphModule
    constants (runtime/cache.py). An AOTInductor model owns its constants, so prefill and
    decode packages would each write a private cache. The state is therefore turned into
    trailing inputs (`StateAsInputs`): the package writes whatever tensors it is handed,
    and the runtime hands both programs the one tied cache.
  * Weights are left out of the shared library (`package_constants_in_so=False`): the
    portable torch.export program in the same file already carries them, and the runtime
    hands the package those tensors (`load_constants(user_managed=True)`), so the file
    does not hold the model a third and fourth time and prefill and decode keep sharing
    one copy on the device.
  * Activation thresholds are trailing inputs too, read from the program on every call
    (baked into the code, they could not be set for the verification's regimes).
  * The package is compiled from the graph the target lowers (`lowering.target_graph`:
    its rewrites included), with the Inductor options a load would lower with
    (`load_lowering`), and checked against the uncompiled program like any lowering. A
    rewrite that makes weights of its own (merged GEMMs) makes them again at a load, from
    the program's: the package reads them from there like every other weight.

Nothing here touches the global Inductor config; options go through `inductor_configs`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import warnings

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from optc.compiler.capture import DECODE, graph_module
from optc.compiler.codegen.aoti_probe import environment, load_failure
from optc.compiler.codegen.check_inputs import decode_start
from optc.compiler.codegen.sources_tag import tag_cache_keys
from optc.compiler.rewrite import attr_value, mutated_attr_names
from optc.compiler.targets import Target, available
from optc.compiler.torch_private import (aoti_compile_and_package, aoti_load_package, graph_module_in_spec,
                                         set_tensor_attr, tree_flatten, tree_flatten_spec,
                                         tree_unflatten)
from optc.progress import working

FORMAT = "aoti"
MEMBER_DIR = "packages/"
# Prefix the wrapper puts before every attribute of the wrapped program; the runtime
# strips it to find the tensor a package constant names.
WRAPPED = "gm."


def member(name: str) -> str:
    return f"{MEMBER_DIR}{name}.pt2"


class StateAsInputs(nn.Module):
    """A program whose in-place state (attributes its graph writes) comes in as trailing
    positional inputs: forward(*flat_user_inputs, *state). Export (non-strict) sees the
    state attributes bound to the inputs, so the writes land on inputs."""

    def __init__(self, gm: torch.fx.GraphModule, in_spec, state: list[str]):
        super().__init__()
        self.gm = gm
        self.in_spec = in_spec
        self.state = list(state)

    def forward(self, *flat):
        n = len(flat) - len(self.state)
        for name, t in zip(self.state, flat[n:]):
            _set_attr(self.gm, name, t)
        args, kwargs = tree_unflatten(list(flat[:n]), self.in_spec)
        return self.gm(*args, **kwargs)


def _set_attr(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    set_tensor_attr(owner, leaf, value)  # a buffer keeps its slot; a GraphModule constant is a plain attribute


class PackagedProgram(nn.Module):
    """A package as a module called like its program: (input_ids=..., cache_position=...)
    or the forward program's positional inputs. It holds the program's GraphModule (not
    run: it owns the weights the package reads and the state it writes), so the decoder
    finds and ties the KV cache on it exactly as on an uncompiled program; the state is
    read from those attributes on every call, so a tie takes effect."""

    def __init__(self, runner, gm: torch.fx.GraphModule, state: list[str], constants: torch.nn.Module | None = None):
        super().__init__()
        self.gm = gm
        self.state = list(state)
        # Not modules: kept out of nn.Module's registries. `constants` (constants_module)
        # holds the weights a lowering rewrite made (merged GEMMs), which the package
        # reads without owning them.
        object.__setattr__(self, "runner", runner)
        object.__setattr__(self, "constants", constants)

    def forward(self, *args, **kwargs):
        flat = tree_flatten_spec((args, kwargs), graph_module_in_spec(self.gm))
        return self.runner(*flat, *(attr_value(self.gm, n) for n in self.state))


def _flat_inputs(ep: ExportedProgram, inputs: tuple[tuple, dict]):
    args, kwargs = inputs
    flat, spec = tree_flatten((tuple(args), dict(kwargs)))
    return flat, ep.call_spec.in_spec or spec


def _dynamic_dims(ep: ExportedProgram) -> list[dict]:
    """Per flat user input, the dims the program keeps symbolic (Dim.AUTO lets export
    take the range the original program had)."""
    dims = []
    for node in ep.graph.find_nodes(op="placeholder"):
        if node.name not in ep.graph_signature.user_inputs:
            continue
        val = node.meta.get("val")
        shape = getattr(val, "shape", ())
        dims.append({i: Dim.AUTO for i, s in enumerate(shape) if not isinstance(s, int)})
    return dims


def lowered_graph(gm: torch.nn.Module, target: Target, program: str) -> torch.nn.Module:
    """The graph `target` lowers for `program` (lowering.target_graph: its rewrites
    included): what a package is compiled from, and where its constants are read."""
    from optc.compiler.codegen.lowering import DECODER_PROGRAMS, target_graph

    return target_graph(gm, target, forward=program not in DECODER_PROGRAMS)


def constants_module(gm: torch.nn.Module, runner) -> torch.nn.Module:
    """Where a package reads its constants: `gm` itself, or, for a package compiled from a
    graph with merged GEMMs (codegen/merge_gemms: constants it names MERGED_PREFIX...),
    a copy of `gm` with those weights made again from its own. Read off the package, not
    the target's settings today, so a package loads whatever the target now says."""
    from optc.compiler.codegen.merge_gemms import MERGED_PREFIX, use_merged_gemms

    if not any(fqn.removeprefix(WRAPPED).startswith(MERGED_PREFIX) for fqn in runner.get_constant_fqns()):
        return gm
    from optc.compiler.codegen.lowering import TOLERANCE

    return use_merged_gemms(gm, TOLERANCE)[0]


def export_with_state_inputs(ep: ExportedProgram, inputs: tuple[tuple, dict], target: Target, program: str):
    """(ExportedProgram taking the state as inputs, the state's attribute names), of the
    graph `target` lowers for `program` (lowered_graph)."""
    from optc.compiler.codegen.lowering import threshold_buffer_names

    gm = lowered_graph(graph_module(ep), target, program)
    state = mutated_attr_names(gm)
    # Activation thresholds come in as inputs too: AOTInductor bakes them into the code
    # (they are not among the package's constants), so a threshold set in place, as the
    # verification's all-kept / all-dropped regimes do, would never reach the package.
    state += [name for name in threshold_buffer_names(gm) if name not in state]
    flat, in_spec = _flat_inputs(ep, inputs)
    example = [*flat, *(attr_value(gm, n).detach().clone() for n in state)]
    dims = _dynamic_dims(ep)
    dynamic = None
    if any(dims) and len(dims) == len(flat):
        dynamic = ((*dims, *({} for _ in state)),)
    with torch.no_grad(), warnings.catch_warnings():
        # Binding the state attributes to inputs is the point; export warns about it.
        warnings.filterwarnings("ignore", message=".*were assigned during export.*")
        wrapped = torch.export.export(StateAsInputs(gm, in_spec, state), tuple(example),
                                      dynamic_shapes=dynamic, strict=False)
    return wrapped, state


def package_options(target: Target, program: str, graph=None) -> dict:
    """The Inductor options of the package: those a load would lower `program` with
    (lowering.load_lowering), without Inductor's CUDA graphs (not an AOTInductor
    feature: optc's decode loop captures the step itself), weights outside the .so."""
    from optc.compiler.codegen.lowering import inductor_options, load_lowering

    lowering = load_lowering(target, program, graph)
    options = inductor_options(target, autotune=lowering["autotune"], cudagraphs=False,
                               shape_tuning=lowering.get("shape_tuning", True), decoder=lowering.get("decoder", False))
    options.pop("triton.cudagraphs", None)
    options["aot_inductor.package_constants_in_so"] = False
    return options


def load_package(data: bytes, device_index: int = -1):
    """An AOTICompiledModel from package bytes (the loader wants a file path)."""
    with tempfile.TemporaryDirectory(prefix="optc-aoti-") as tmp:
        path = os.path.join(tmp, "package.pt2")
        with open(path, "wb") as fh:
            fh.write(data)
        return aoti_load_package(path, device_index=device_index)


def bind_constants(runner, gm: torch.nn.Module) -> None:
    """Hand the package the program's own weights (no copy: they stay shared)."""
    consts = {fqn: attr_value(gm, fqn[len(WRAPPED):] if fqn.startswith(WRAPPED) else fqn)
              for fqn in runner.get_constant_fqns()}
    runner.load_constants(consts, check_full_update=True, user_managed=True)


def custom_ops(program) -> list[str]:
    """optc's own ops in a program or graph module (Triton kernels on a GPU)."""
    return sorted({str(n.target) for n in program.graph.nodes
                   if n.op == "call_function" and str(n.target).startswith("optc.")})


def build_package(ep: ExportedProgram, inputs: tuple[tuple, dict], target: Target, program: str) -> tuple[bytes, dict]:
    """Compile one program into an AOTInductor package; returns (bytes, record)."""
    start = time.perf_counter()
    with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="optc-aoti-") as tmp:
        # Copying the program's input spec trips a torch FutureWarning (pytree's LeafSpec)
        # that says nothing to a user, once per program.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        wrapped, state = export_with_state_inputs(ep, inputs, target, program)
        options = package_options(target, program, ep.graph)
        tag_cache_keys()  # sources_tag: a cached graph is rebuilt when optc's ops change
        path = aoti_compile_and_package(
            wrapped, package_path=os.path.join(tmp, f"{program}.pt2"), inductor_configs=options)
        with open(path, "rb") as fh:
            data = fh.read()
    record = {"member": member(program), "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
              "state": state, "inductor_options": options, "custom_ops": custom_ops(wrapped),
              "seconds": round(time.perf_counter() - start, 2)}
    return data, record


def package_programs(programs: dict, example_inputs: dict, target: Target, *, verify: bool = True,
                     log=lambda m: None) -> tuple[dict, dict]:
    """Packages for every program that compiles (and, with `verify`, matches its
    uncompiled program): ({member: bytes}, the manifest's "packages" record). A program
    that cannot be packaged is skipped with the reason; the portable program then runs."""
    record = {"format": FORMAT, "environment": environment(target), "programs": {}}
    files: dict[str, bytes] = {}
    if not available(target):
        reason = f"no {target.name} device here: the code is compiled on the target"
        record["programs"] = {name: {"skipped": reason} for name in programs}
        return files, record
    failure = load_failure(target, log)
    if failure is not None:
        record["programs"] = {name: {"skipped": failure} for name in programs}
        log(f"[optc] not packaging: {failure}")
        return files, record
    for name, ep in programs.items():
        log(f"[optc] packaging {name} with AOTInductor for {target.name} ...")
        try:
            with working(f"packaging {name}"):
                data, rec = build_package(ep, example_inputs[name], target, name)
                if verify:
                    rec["verification"] = _verify(ep, data, rec, example_inputs[name], target,
                                                  decode_start(programs, example_inputs) if name == DECODE else None)
        except Exception as exc:  # noqa: BLE001 - any failure: ship the portable program
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            record["programs"][name] = {"skipped": f"AOTInductor failed: {type(exc).__name__}: {first}",
                                        "custom_ops": _custom_ops_lowered(ep, target, name)}
            log(f"[optc] {name} not packaged: {record['programs'][name]['skipped']}")
            continue
        files[rec["member"]] = data
        record["programs"][name] = rec
    return files, record


def _custom_ops_lowered(ep: ExportedProgram, target: Target, program: str) -> list[str]:
    """optc's ops in the graph `target` lowers for `program`, or in the program itself
    where making that graph is what failed."""
    try:
        return custom_ops(lowered_graph(graph_module(ep), target, program))
    except Exception:  # noqa: BLE001 - the failure is already the package's reason
        return custom_ops(ep)


def _verify(ep: ExportedProgram, data: bytes, rec: dict, inputs, target: Target, start_state=None) -> dict:
    """The package against the uncompiled program, with lowering.verify's tolerances, from
    `start_state` (a decode program: check_inputs.decode_start) (raises CompileError when it
    changed the function)."""
    from optc.compiler.codegen.lowering import verify

    gm = graph_module(ep)
    runner = load_package(data)
    constants = constants_module(gm, runner)
    bind_constants(runner, constants)
    return verify(ep, PackagedProgram(runner, gm, rec["state"], constants), gm, inputs, start_state=start_state)
