"""MLIR emission through torch-mlir's FX importer (`optc export --format ...`).

    mlir-torch   torch dialect in backend form (`torch.aten.*` ops)
    mlir-linalg  linalg-on-tensors (+ arith, tensor, math)
    stablehlo    StableHLO

What the function `@main` computes: the program, from its inputs. A program that writes
state in place (a decoder LM's prefill and decode steps, which write the static KV cache)
takes that state as arguments after its own inputs and returns it, updated, before its
outputs: `main(input_ids, cache_position, cumulative_length_0.., key_cache_0,
value_cache_0, ..) -> (the same state after the step.., logits)` (mlir_state.py; `optc
export --json` lists the state in order). A prefill of a fresh prompt passes zeros;
a decode step passes what the previous step returned. The prefill keeps its dynamic
length (`?`).

Weights are frozen into the module as `dense_resource` blobs, so the text file is
roughly twice the size of the fp32 weights (hex). torch-mlir ships CPU-only wheels for
Linux x86_64 (manylinux) and is an optional dependency (`pip install optc[mlir]`); it
is imported only when this function runs.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from importlib import metadata
from pathlib import Path

import torch

from optc.compiler.codegen.mlir_state import export_call
from optc.compiler.torch_private import OpOverload, buffer_slots, non_persistent_buffer_names, op_schema
from optc.errors import CaptureError, CompileError, UsageError
from optc.fileio import atomic_open

FORMATS = {
    "mlir-torch": "torch",
    "mlir-linalg": "linalg-on-tensors",
    "stablehlo": "stablehlo",
}


def export_mlir(ep_or_module, example_inputs, format: str, path) -> Path:
    """Lower a module or ExportedProgram to MLIR text in `format` and write it to `path`.

    `example_inputs` is a tuple of positional inputs, a single tensor, a dict of
    keyword inputs, or an (args, kwargs) pair as in `ExportedProgram.example_inputs`;
    for an ExportedProgram it may be None (its own example inputs are used).
    Raises UsageError for an unknown format or a missing torch-mlir, CaptureError if
    torch.export cannot capture the module, CompileError if torch-mlir cannot lower it.
    """
    if format not in FORMATS:
        raise UsageError(f"unknown MLIR format {format!r}; choose one of: {', '.join(FORMATS)}")
    fx, make_importer = _import_torch_mlir()
    path = Path(path)
    if not path.parent.is_dir():  # checked before minutes of lowering, not after
        raise UsageError(f"cannot write {path}: folder {path.parent} does not exist")

    ep = _persistent_program(ep_or_module, example_inputs)

    diagnostics: list = []
    importer = make_importer(diagnostics)
    try:
        with warnings.catch_warnings():
            # torch-mlir's pytree use trips a torch FutureWarning on every call.
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            kwargs = {"fx_importer": importer} if importer is not None else {}
            module = fx.export_and_import(ep, output_type=FORMATS[format], **kwargs)
    except Exception as e:  # noqa: BLE001 - every torch-mlir failure becomes one summary
        raise CompileError(_summarise(e, diagnostics, format)) from e

    _write_atomic(path, module)
    return path


# --------------------------------------------------------------------------- torch-mlir


def _import_torch_mlir():
    try:
        from torch_mlir import fx
    except ImportError as e:
        raise UsageError(
            "MLIR export needs torch-mlir, which is not installed: run `pip install "
            "torch-mlir` (or `pip install optc[mlir]`). It ships CPU-only wheels for Linux "
            f"x86_64 (manylinux, CPython) and runs on the CPU; ({e})") from e

    def make_importer(diagnostics: list):
        # Our own MLIR context with a diagnostic handler: torch-mlir otherwise prints
        # pass errors straight to the process's stderr (C++), and the exception it
        # raises says only "Failure while executing pass pipeline".
        try:
            from torch_mlir import ir
            from torch_mlir.dialects import torch as torch_d
            from torch_mlir.extras.fx_importer import FxImporter
        except ImportError:
            return None
        context = ir.Context()
        torch_d.register_dialect(context)

        def handler(diag):
            diagnostics.append((str(diag.severity), str(diag.location), str(diag.message)))
            return True  # handled: do not also print it

        context.attach_diagnostic_handler(handler)
        return FxImporter(context=context)

    return fx, make_importer


def _version() -> str:
    try:
        return metadata.version("torch-mlir")
    except metadata.PackageNotFoundError:
        return "(unknown version)"


def _summarise(exc: BaseException, diagnostics: list, format: str) -> str:
    """One paragraph: what failed, the first real error, where, and what to try."""
    text = str(exc)
    stage = re.search(r"^\s*(Lowering .+?) failed", text, re.M)
    errors = [d for d in diagnostics if "ERROR" in d[0].upper()]
    if errors:
        _, loc, msg = errors[0]
        op = re.search(r'name = "([^"]+)"', msg)  # an op with no lowering at all
        msg = msg.split(": %", 1)[0]  # drop the printed op, often hundreds of chars
        if op:
            msg += f" ({op.group(1)})"
        where = re.match(r'loc\("([^"]+)":(\d+)', loc)
        first = msg + (f" at {where.group(1)}:{where.group(2)}" if where else "")
    else:
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
        cause = exc.__cause__
        if cause is not None:  # e.g. "Could not find state mapping for buffer" <- KeyError
            first += f" ({type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''})"
        first = f"{type(exc).__name__}: {first}"
    if len(first) > 400:
        first = first[:400] + "..."
    repro = re.search(r"'\s+(\S+\.mlir)\s*$", text, re.M)
    if stage and stage.group(1).endswith("-> Torch Backend IR"):
        hint = ("This happens before any format-specific lowering, so no --format will "
                "work; change the model around the op named above")
    elif stage:
        hint = ("torch-mlir lowers a subset of aten ops; --format mlir-torch stops before "
                "this lowering, or change the model around the op named above")
    else:
        hint = "torch-mlir could not import the exported program"  # e.g. a missing mapping
    return (
        f"torch-mlir {_version()} could not convert the model to {format}"
        f"{' (' + stage.group(1) + ')' if stage else ''}: {first}. {hint}"
        f"{'; torch-mlir left a reproducer at ' + repro.group(1) if repro else ''}."
    )


# --------------------------------------------------------------------------- capture


def _split_inputs(example_inputs) -> tuple[tuple, dict]:
    if example_inputs is None:
        return (), {}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if (isinstance(example_inputs, tuple) and len(example_inputs) == 2
            and isinstance(example_inputs[0], tuple) and isinstance(example_inputs[1], dict)):
        return example_inputs[0], dict(example_inputs[1])  # ExportedProgram.example_inputs
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise UsageError("example_inputs must be a tensor, a tuple of inputs, a dict of keyword "
                     f"inputs or an (args, kwargs) pair, got {type(example_inputs).__name__}")


@contextlib.contextmanager
def _buffers_made_persistent(module: torch.nn.Module):
    """Temporarily re-register every non-persistent buffer as persistent.

    Why: torch.export keeps non-persistent buffers (e.g. Hugging Face's rotary
    `inv_freq`) out of `ExportedProgram.state_dict`, in `constants`, and torch-mlir's
    frozen import looks buffers up only in `state_dict`, failing with "Could not find
    state mapping for buffer". Registered as persistent, they land in state_dict and
    are frozen like any weight. The module is changed in place (the buffers live on
    submodules, so a shallow copy of the top module would not isolate it) and
    restored on exit; do not run the module concurrently meanwhile.
    """
    changed = []
    for sub in module.modules():
        for name in list(non_persistent_buffer_names(sub)):
            buf = buffer_slots(sub).get(name)
            if buf is not None:
                sub.register_buffer(name, buf, persistent=True)
                changed.append((sub, name))
    try:
        yield
    finally:
        for sub, name in changed:
            sub.register_buffer(name, buffer_slots(sub)[name], persistent=False)


def _persistent_program(ep_or_module, example_inputs):
    """An ExportedProgram whose buffers are all in its state_dict and that writes no
    tensor in place (what it writes becomes arguments and results: mlir_state)."""
    if isinstance(ep_or_module, torch.export.ExportedProgram):
        ep = ep_or_module
        non_persistent = [
            s for s in ep.graph_signature.input_specs
            if s.kind == torch.export.graph_signature.InputKind.BUFFER and not s.persistent
        ]
        if not non_persistent and not _writes_in_place(ep):
            return ep
        # Re-export the program's own module (which takes exactly the inputs the
        # program was exported with, and keeps its dynamic dimensions).
        if example_inputs is None:
            example_inputs = getattr(ep, "example_inputs", None)
            if example_inputs is None:
                raise UsageError("this ExportedProgram has non-persistent buffers or in-place state and no "
                                 "stored example inputs; pass example_inputs to re-export it")
        call = export_call(ep, _split_inputs(example_inputs))
        module, args, kwargs, shapes = call.module, call.args, {}, call.dynamic_shapes
    elif isinstance(ep_or_module, torch.nn.Module):
        module, shapes = ep_or_module, None
        if example_inputs is None:
            raise UsageError("export_mlir needs example_inputs to capture an nn.Module")
        args, kwargs = _split_inputs(example_inputs)
    else:
        raise UsageError("export_mlir takes an nn.Module or a torch.export.ExportedProgram, "
                         f"got {type(ep_or_module).__name__}")

    with _buffers_made_persistent(module):
        try:
            return torch.export.export(module, args, kwargs, dynamic_shapes=shapes, strict=False)
        except Exception as e:  # noqa: BLE001
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
            raise CaptureError(f"torch.export could not capture the model for MLIR export: "
                               f"{type(e).__name__}: {first[:400]}") from e


def _writes_in_place(ep) -> bool:
    """Whether the program mutates anything (a decoder's KV cache, a buffer)."""
    sig = ep.graph_signature
    if sig.buffers_to_mutate or sig.user_inputs_to_mutate:
        return True
    return any(n.op == "call_function" and isinstance(n.target, OpOverload)
               and op_schema(n.target).is_mutable for n in ep.graph.nodes)


# --------------------------------------------------------------------------- output


def _write_atomic(path: Path, module) -> None:
    with atomic_open(path, "w", encoding="utf-8") as fh:
        # Streams to the file instead of building one string holding all the weights.
        module.operation.print(file=fh)
