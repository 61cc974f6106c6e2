"""Capture a model with torch.export (non-strict) into programs optc can rewrite.

Decoder LMs become two programs over one static KV cache: `prefill` (a prompt of any
length, dynamic) and `decode` (one token). Everything else becomes one `forward`
program. A model that cannot be captured is refused with the export error summarised
in one paragraph and what to try (CaptureError, exit 2).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.export import Dim, ExportedProgram

from optc.errors import CaptureError, UsageError

# A decoder's state as its captured programs name it: the static KV cache's buffers
# (key_cache_i, value_cache_i, cumulative_length_i), which both programs write in place,
# under whatever prefix a wrapper adds. The one definition the compiler (lowering checks
# reset it) and the runtime (the decode loop ties and resets it) share.
STATE_BUFFER = re.compile(r"(^|\.)(key_cache|value_cache|cumulative_length)_\d+$")
KEY_CACHE_BUFFER = re.compile(r"(^|\.)key_cache_\d+$")
# Where a static-cache layer writes next (transformers' StaticLayer.update).
LENGTH_BUFFER = re.compile(r"(^|\.)cumulative_length_\d+$")


def is_state_buffer(name: str) -> bool:
    """Whether a buffer name is a decoder's state (see STATE_BUFFER)."""
    return STATE_BUFFER.search(name) is not None

PREFILL, DECODE, FORWARD = "prefill", "decode", "forward"
# Tokens a decoder's prefill program is traced, checked and lowered at; a loaded decoder
# runs every prompt through it in chunks of this length (runtime/prefill.py). Longer
# chunks fill the GPU better on long prompts and waste more on short ones.
PREFILL_LEN = 16


@dataclass
class Captured:
    """The exported programs of one model and the inputs they were traced with."""

    task: str  # "causal-lm" or "forward"
    programs: dict[str, ExportedProgram]
    example_inputs: dict[str, tuple[tuple, dict]]  # program name -> (args, kwargs)
    dynamic_shapes: dict[str, dict | None] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)  # batch_size, max_cache_len, ...


def is_causal_lm(module: torch.nn.Module) -> bool:
    """A decoder LM optc captures as prefill + decode: a *ForCausalLM class, or one
    transformers lists as a causal LM under another name (GPT2LMHeadModel)."""
    if not hasattr(module, "generate"):
        return False
    name = type(module).__name__
    if name.endswith("ForCausalLM"):
        return True
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return False
    return name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def capture(
    module: torch.nn.Module,
    example_inputs: tuple,
    *,
    max_cache_len: int = 256,
    dynamic: tuple[str, ...] = (),
    prefill_len: int = PREFILL_LEN,
) -> Captured:
    """Export `module`. Causal LMs get prefill+decode programs over a static cache of
    `max_cache_len` positions, the prefill traced (and later checked and lowered) at
    `prefill_len` tokens; `dynamic` may name "batch" (forward programs only) and "seq"
    (a dynamic sequence length; the LM prefill program always has one)."""
    unknown = set(dynamic) - {"batch", "seq"}
    if unknown:
        raise UsageError(f"unknown dynamic dimension(s) {sorted(unknown)}; use 'batch' and/or 'seq'")
    module.eval().requires_grad_(False)
    if is_causal_lm(module):
        input_ids = example_inputs[0]
        if "batch" in dynamic:
            raise UsageError("a decoder LM's batch size is fixed by its static KV cache; drop 'batch' from --dynamic")
        return capture_causal_lm(module, batch_size=input_ids.shape[0], max_cache_len=max_cache_len,
                                 prompt_len=prefill_len)
    return capture_forward(module, example_inputs, dynamic=dynamic)


def capture_forward(module, example_inputs: tuple, *, dynamic=()) -> Captured:
    args = tuple(example_inputs)
    shapes = _dynamic_forward_shapes(args, dynamic)
    ep = export_program(_FirstTensor(module), args, {}, shapes, what="the model")
    return Captured(FORWARD, {FORWARD: ep}, {FORWARD: (args, {})}, {FORWARD: shapes})


class _FirstTensor(torch.nn.Module):
    """Returns the main tensor of a Hugging Face ModelOutput (logits or last hidden
    state), so every forward program has one tensor output."""

    def __init__(self, module):
        super().__init__()
        self.model = module

    def forward(self, *args):
        out = self.model(*args)
        if isinstance(out, torch.Tensor):
            return out
        for key in ("logits", "last_hidden_state"):
            if getattr(out, key, None) is not None:
                return getattr(out, key)
        return out[0]


def _dynamic_forward_shapes(args, dynamic):
    if not dynamic:
        return None
    # AUTO lets export find the range the model supports (BERT: 512 positions)
    # instead of failing on a bound we guessed.
    specs = []
    for t in args:
        spec = {}
        if "batch" in dynamic and t.dim() >= 1:
            spec[0] = Dim.AUTO
        if "seq" in dynamic and t.dim() == 2 and not t.is_floating_point():
            spec[1] = Dim.AUTO
        specs.append(spec)
    return (tuple(specs),)  # one entry: the wrapper's *args


def capture_causal_lm(model, *, batch_size: int = 1, max_cache_len: int = 256,
                      prompt_len: int = PREFILL_LEN) -> Captured:
    from transformers import GenerationConfig
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    if prompt_len < 2:
        raise UsageError(f"prefill length {prompt_len} is too small; it must be at least 2")
    if max_cache_len < prompt_len + 2:
        raise UsageError(f"max_cache_len={max_cache_len} is too small; it must exceed the prompt length {prompt_len} + 1")
    model.generation_config = GenerationConfig(
        use_cache=True,
        cache_implementation="static",
        max_length=max_cache_len,
        cache_config={"batch_size": batch_size, "max_cache_len": max_cache_len},
    )
    try:
        step = TorchExportableModuleForDecoderOnlyLM(model, batch_size=batch_size, max_cache_len=max_cache_len).model
    except Exception as exc:  # the wrapper validates the model's config
        raise CaptureError(_summarise(exc, "the static-cache wrapper of the decoder", _model_frame(exc))) from None
    step.requires_grad_(False)
    device = next(model.parameters()).device
    ids = torch.zeros(batch_size, prompt_len, dtype=torch.long, device=device)
    prefill_kwargs = {"input_ids": ids, "cache_position": torch.arange(prompt_len, device=device)}
    seq = Dim("seq", min=2, max=max_cache_len - 1)
    prefill_shapes = {"input_ids": {1: seq}, "cache_position": {0: seq}}
    decode_kwargs = {"input_ids": ids[:, :1], "cache_position": torch.tensor([prompt_len], device=device)}
    try:
        prefill = export_program(step, (), prefill_kwargs, prefill_shapes, what="the prefill step")
    except CaptureError as first:
        if not (getattr(first, "origin", None) or "").startswith("transformers/"):
            raise
        # The model derives its positions from the cache's length in Python (OPT), which
        # the wrapper leaves it to do; given them explicitly it exports.
        step = _ExplicitPositions(step, max_cache_len)
        try:
            prefill = export_program(step, (), prefill_kwargs, prefill_shapes, what="the prefill step")
        except CaptureError:
            raise first from None
    decode = export_program(step, (), decode_kwargs, None, what="the decode step")
    return Captured(
        "causal-lm",
        {PREFILL: prefill, DECODE: decode},
        {PREFILL: ((), prefill_kwargs), DECODE: ((), decode_kwargs)},
        {PREFILL: prefill_shapes, DECODE: None},
        meta={"batch_size": batch_size, "max_cache_len": max_cache_len},
    )


class _ExplicitPositions(torch.nn.Module):
    """transformers' static-cache step (TorchExportableModuleWithStaticCache), calling the
    model with its positions, `cache_position` and a full attention mask given. The
    wrapper leaves positions to the model, and some architectures (OPT in transformers
    5.x) compute them from the cache's length tensor in Python, which torch.export cannot
    trace. Used only where the wrapper's own forward fails to export: the mask makes
    every attention read one (SDPA as before, with a mask argument). Its buffers keep
    their names under `step.` (STATE_BUFFER takes any prefix)."""

    def __init__(self, step: torch.nn.Module, max_cache_len: int):
        super().__init__()
        self.step = step
        self.max_cache_len = int(max_cache_len)

    def forward(self, input_ids, cache_position):
        for layer in self.step.static_cache.layers:  # as the wrapper does: writes start at the position
            layer.cumulative_length.copy_(cache_position[0])
        batch = input_ids.shape[0]
        mask = torch.ones(batch, self.max_cache_len, dtype=torch.long, device=input_ids.device)
        out = self.step.model(input_ids=input_ids, attention_mask=mask, cache_position=cache_position,
                              position_ids=cache_position.unsqueeze(0).expand(batch, -1),
                              past_key_values=self.step.static_cache, use_cache=True)
        return out.logits


def export_program(module, args: tuple, kwargs: dict, dynamic_shapes, *, what: str) -> ExportedProgram:
    """torch.export (non-strict) with a one-paragraph summary of any failure. GPT-2-style
    Conv1D projections come out as ordinary linears (compiler/conv1d_linear.py)."""
    from optc.compiler.conv1d_linear import conv1d_as_linear

    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            ep = torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
            if not ep.graph.find_nodes(op="call_function", target=torch.ops.aten.addmm.default):
                return ep
            gm = graph_module(ep)
            if not conv1d_as_linear(gm):
                return ep
            return torch.export.export(gm, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:
        origin = _model_frame(exc)
        error = CaptureError(_summarise(exc, what, origin))
        error.origin = origin  # where in the model's code: capture_causal_lm retries on it
        raise error from None


def _summarise(exc: Exception, what: str, origin: str | None) -> str:
    """One paragraph: what failed, torch's first words on why, where in the model's
    code (`origin`, from _model_frame), and what to do."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    head = lines[0] if lines else type(exc).__name__
    detail = next((ln for ln in lines[1:6] if not ln.startswith(("File ", "Traceback"))), "")
    return (
        f"torch.export could not capture {what}: {type(exc).__name__}: {head[:300]}"
        + (f" ({detail[:200]})" if detail else "")
        + (f"; raised at {origin}" if origin else "")
        + f". {_hint(str(exc), origin)}"
    )


def _model_frame(exc: BaseException) -> str | None:
    """Where in the model's own code the capture failed, as path:line (from
    `transformers/` on for the library's files): the innermost place outside torch among
    the frames the traceback has below this module's export call and those torch.export
    names in its message ("The following call raised this error: File ...", where it
    cuts the traceback short)."""
    import traceback

    frames = [(f.filename, f.lineno) for f in traceback.extract_tb(exc.__traceback__)]
    ours = [i for i, (filename, _) in enumerate(frames) if Path(filename).resolve() == Path(__file__).resolve()]
    below = frames[ours[-1] + 1:] if ours else frames
    named = [(f, int(n)) for f, n in re.findall(r'File "([^"]+)", line (\d+)', str(exc))]
    torch_dir = Path(torch.__file__).parent
    for filename, line in reversed(below + named):
        path = Path(filename).resolve()
        if filename.startswith("<") or path.is_relative_to(torch_dir):
            continue
        parts = path.parts
        shown = "/".join(parts[parts.index("transformers"):]) if "transformers" in parts else str(path)
        return f"{shown}:{line}"
    return None


def _hint(message: str, origin: str | None = None) -> str:
    if origin and origin.startswith("transformers/"):
        import transformers

        return (
            f"That line is in the Hugging Face model's own code (transformers {transformers.__version__}), "
            "which optc does not change: this architecture cannot be captured with a static KV cache by "
            "this transformers version. The README lists the architectures optc reads."
        )
    if "data-dependent" in message or "GuardOnDataDependent" in message:
        return (
            "The model branches on tensor values; rewrite that branch with torch.cond or "
            "make it depend on shapes only, then try again."
        )
    if "Constraints violated" in message or "specialized" in message:
        return "A dimension you asked to be dynamic is fixed by the model; drop it from --dynamic."
    return (
        "Check that the model runs eagerly on the example inputs, that it is in eval mode, "
        "and that the inputs are tensors; see the torch.export troubleshooting guide."
    )


def graph_module(ep: ExportedProgram) -> torch.fx.GraphModule:
    """The program as a GraphModule with parameters as attributes and node.meta kept."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return ep.module()
        except AttributeError as exc:
            if "is not a buffer" not in str(exc):
                raise
            # Seen with Falcon (transformers 5.x): export gave two of its constants one
            # name, and torch cannot rebuild a module from the program.
            raise CaptureError(f"torch.export's program of this model cannot be turned back into a module ({exc}: "
                               "two of its constants share a name); optc cannot compile this model") from None


def reexport(gm: torch.fx.GraphModule, inputs: tuple[tuple, dict], dynamic_shapes, *, what: str) -> ExportedProgram:
    """Export a rewritten GraphModule again, for lowering and the artifact."""
    args, kwargs = inputs
    return export_program(gm, args, kwargs, dynamic_shapes, what=what)


def export_lm_programs(
    model: torch.nn.Module, *, batch_size: int, prompt_len: int, max_cache_len: int
) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """(prefill, decode) GraphModules of a Hugging Face decoder LM over one static cache,
    exactly as `optc.compiler.capture` exports them (used by tests and benchmarks). The
    model's generation_config is restored afterwards."""
    if int(prompt_len) >= int(max_cache_len):
        raise UsageError(f"prompt_len {prompt_len} must be below max_cache_len {max_cache_len}")
    saved = model.generation_config
    try:
        captured = capture_causal_lm(
            model, batch_size=int(batch_size), max_cache_len=int(max_cache_len), prompt_len=int(prompt_len)
        )
    finally:
        model.generation_config = saved
    return graph_module(captured.programs[PREFILL]), graph_module(captured.programs[DECODE])
