"""The one place optc programs are timed: latency of an in-memory Artifact on a target.

`measure(art, target, workload, inputs=...)` lowers the artifact's programs for the
target, warms them up, times them through the harness in optc.runtime.timing, and
returns a Measurement whose `remeasure()` times the already-compiled program again.
`optc bench` times its optc rows through it and the search its trials, so a number from
either means the same thing:

  decode   causal LMs: ms per decoded token at batch B over `tokens` decode steps after
           a `prompt_len`-token prefill, prefill excluded (StaticCacheDecoder, one CUDA
           graph per token on the GPU);
  forward  encoders and ViTs: ms per forward of one batch.

Nothing here needs the eager model; `agreement` (the check bench prints beside every
row) takes it optionally.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from optc.errors import UsageError
from optc.runtime.timing import Timing
from optc.runtime.timing import measure as time_calls

__all__ = ["Workload", "Measurement", "workload_for", "measure", "decode_timer", "agreement", "forward_agreement"]

UNITS = {"decode": "ms/token (decode, prefill excluded)", "forward": "ms/forward"}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Workload:
    """What one latency number means (see the module docstring). `tokens` and
    `prompt_len` apply to decode only."""

    kind: str
    batch: int = 1
    tokens: int = 64
    prompt_len: int = 16

    def __post_init__(self) -> None:
        # Refused at construction, so a bad workload fails before minutes of lowering.
        if self.kind not in UNITS:
            raise UsageError(f"unknown workload kind {self.kind!r}; known: {', '.join(UNITS)}")
        for name in ("batch", "tokens", "prompt_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"workload {name} must be a positive integer, got {value!r}")

    @property
    def unit(self) -> str:
        return UNITS[self.kind]

    def to_dict(self) -> dict:
        return {**asdict(self), "unit": self.unit}


def workload_for(task: str, batch: int | None = None, tokens: int = 64) -> Workload:
    """Decode for causal LMs (the task optc.compile records), one forward otherwise."""
    return Workload("decode" if task == "causal-lm" else "forward", batch=1 if batch is None else batch, tokens=tokens)


@dataclass(frozen=True)
class Measurement:
    """A timing of one compiled program. `program` is what was timed (the
    StaticCacheDecoder for decode, the compiled callable for forward); it stays compiled
    for as long as this object lives, so `remeasure()` costs timing only."""

    timing: Timing  # compile_s = setup_s
    setup_s: float  # lowering, compiling and warm-up, excluded from the timing
    workload: Workload
    program: Any
    remeasure: Callable[[], Timing]

    def to_dict(self) -> dict:
        return {"workload": self.workload.to_dict(), "setup_s": round(self.setup_s, 3), **self.timing.to_dict()}


def measure(art, target, workload: Workload, *, inputs, autotune: bool | None = None, loaded: bool = False,
            log=_log) -> Measurement:
    """Lower `art` for `target` (a name or a Target), warm up, and time `workload`.

    inputs: decode, the prompt [batch, prompt_len] (torch.long, on the target's device);
    forward, the example input tuple of the model, batch first.
    autotune: Inductor max-autotune on the GPU (minutes more). None: as the artifact
    loads, which autotunes forward programs and not the decode step.
    loaded: run what `art.generate` / `art(...)` run (an artifact read with optc.load: its
    decoder, prefill compiled too, from its kernel cache where that applies) instead of
    lowering the decode step alone; `autotune` is then the load's.
    """
    from optc.compiler import targets

    tgt = targets.get(target) if isinstance(target, str) else target
    if not targets.available(tgt):
        raise UsageError(f"target {tgt.name} is not present on this machine; measure where it is, or use cpu")
    if not isinstance(workload, Workload):
        raise UsageError(f"workload must be an optc.runtime.measure.Workload, got {type(workload).__name__}")
    if tgt.device == "cpu":
        _warn_if_busy(log)
    if workload.kind == "decode":
        return _measure_decode(art, tgt, workload, inputs, autotune, loaded, log)
    # A forward program lowers as a load lowers it whenever autotune is None.
    return _measure_forward(art, tgt, workload, inputs, None if loaded else autotune, log)


def _warn_if_busy(log) -> None:
    """Say so when other work loads the CPU: two processes' thread pools on the same cores
    spin against each other, and a timing taken then can be many times too slow
    (benchmarks/NOTES.md, "CPU work while the GPU was out of reach")."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return
    if load > 1.5 * cores:
        log(f"warning: this machine is busy (load {load:.1f} on {cores} cores): CPU timings taken now are not "
            "comparable with timings on an idle machine")


def _device_of(x, tgt) -> str:
    if not isinstance(x, torch.Tensor):
        raise UsageError(f"measure() inputs must be tensors, got {type(x).__name__}")
    if x.device.type != tgt.device:
        raise UsageError(f"the inputs are on {x.device} but target {tgt.name} runs on {tgt.device}")
    return str(x.device)


def _measure_decode(art, tgt, workload: Workload, inputs, autotune: bool | None, loaded: bool, log) -> Measurement:
    from optc.compiler.codegen.lowering import lower

    if art.task != "causal-lm":
        raise UsageError(f"a decode workload needs a causal-LM artifact; this one is {art.task}: "
                         f"time it with Workload('forward')")
    prompt = inputs[0] if isinstance(inputs, (tuple, list)) and len(inputs) == 1 else inputs
    device = _device_of(prompt, tgt)
    B, P, n = workload.batch, workload.prompt_len, workload.tokens
    meta = art.manifest["model"]
    if tuple(prompt.shape) != (B, P) or prompt.dtype != torch.long:
        raise UsageError(f"the decode workload needs a [{B}, {P}] torch.long prompt, "
                         f"got {prompt.dtype} of shape {list(prompt.shape)}")
    if meta["batch_size"] != B:
        raise UsageError(f"the artifact was compiled for batch {meta['batch_size']}, the workload asks for batch {B}")
    if P + n > meta["max_cache_len"]:
        raise UsageError(f"a {P}-token prompt + {n} decode steps exceed the artifact's "
                         f"max_cache_len={meta['max_cache_len']}")
    if loaded:
        dec = art.decoder(device=device)
    else:  # tuning Inductor's configs on the CPU benchmarks C++ templates for minutes, to no gain
        dec = decode_timer(art, lambda m: lower(m, tgt, autotune=bool(autotune) and tgt.device == "cuda",
                                                      decoder=True), device)
    start = time.perf_counter()
    dec.warm_up(prompt)
    setup = time.perf_counter() - start
    log(f"lowered and warmed up in {setup:.0f} s; timing {n} decode steps ...")
    timing = dec.measure_decode(prompt, n).with_extra(compile_s=setup)
    return Measurement(timing, setup, workload, dec, lambda: dec.measure_decode(prompt, n))


def _measure_forward(art, tgt, workload: Workload, inputs, autotune: bool | None, log) -> Measurement:
    if "forward" not in art.programs:
        raise UsageError(f"a forward workload needs an encoder or ViT artifact; this one ({art.task}) has "
                         f"programs {sorted(art.programs)}: time it with Workload('decode')")
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    device = _device_of(inputs[0] if inputs else None, tgt)
    if inputs[0].dim() == 0 or inputs[0].shape[0] != workload.batch:
        raise UsageError(f"the forward workload is batch {workload.batch}, the inputs' first dimension is "
                         f"{list(inputs[0].shape[:1])}")
    compiled = art.module("forward", device=device, compiled=True, autotune=autotune, target=tgt)

    def module(*args):
        if device.startswith("cuda"):
            torch.compiler.cudagraph_mark_step_begin()  # Inductor's CUDA graphs reuse outputs
        return compiled(*args)

    start = time.perf_counter()
    with torch.no_grad():
        module(*inputs)
    setup = time.perf_counter() - start
    log(f"lowered and warmed up in {setup:.0f} s; timing forwards ...")
    timing = time_calls(module, [inputs], device=device).with_extra(compile_s=setup)
    return Measurement(timing, setup, workload, module, lambda: time_calls(module, [inputs], device=device))


def decode_timer(art, compile_fn, device: str):
    """A StaticCacheDecoder over an artifact's programs for timing decode steps: the
    decode step lowered by `compile_fn`, the prefill program run as exported (compiling
    and autotuning its dynamic-length graph would cost minutes and change no number)."""
    from optc.runtime.decode import StaticCacheDecoder

    meta = art.manifest["model"]
    return StaticCacheDecoder(art.module("prefill", device=device, compiled=False),
                              art.module("decode", device=device, compiled=False),
                              compile=compile_fn, compile_prefill=False, device=device,
                              max_cache_len=meta["max_cache_len"], batch_size=meta["batch_size"])


def agreement(dec, art, prompt: torch.Tensor, model=None) -> dict:
    """Teacher-forced logits of the compiled decode loop against the artifact's own
    uncompiled prefill program over the whole sequence (and against the eager `model`
    when given: pass it for lossless programs only), so a fast number cannot come from
    a broken program."""
    from optc.compiler.capture import graph_module
    from optc.compiler.codegen.lowering import rel_err

    ids = torch.cat([prompt, prompt[:, :8]], dim=1)
    start = prompt.shape[1] - 1
    with torch.no_grad():
        out = dec.forced_logits(ids, prompt.shape[1]).float()
        program = graph_module(art.programs["prefill"])  # a fresh copy: its own cache
        refs = {"program": program(input_ids=ids, cache_position=torch.arange(ids.shape[1], device=ids.device))}
        if model is not None:
            refs["eager"] = model(ids, use_cache=False).logits
    result = {}
    for name, ref in refs.items():
        ref = ref[:, start:].float()
        result[f"rel_err_vs_{name}"] = rel_err(out, ref)
        result[f"argmax_match_vs_{name}"] = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return result


def forward_agreement(program, art, inputs: tuple, model=None) -> dict:
    """The timed forward's first floating output against the artifact's own uncompiled
    forward program on the same inputs (and against the eager `model` when given: pass
    it for lossless programs only): the encoder rows' counterpart of `agreement`."""
    from optc.compiler.capture import graph_module
    from optc.compiler.codegen.lowering import rel_err

    with torch.no_grad():
        out = _first_float(program(*inputs)).to(torch.float32, copy=True)  # before a CUDA-graph replay reuses it
        refs = {"program": _first_float(graph_module(art.programs["forward"])(*inputs))}
        if model is not None:
            refs["eager"] = _first_float(model(*inputs))
    return {f"rel_err_vs_{name}": rel_err(out, ref) for name, ref in refs.items()}


def _first_float(output) -> torch.Tensor:
    """The first floating-point tensor of a model's output (logits, a last hidden state)."""
    from optc.compiler.torch_private import tree_flatten

    found = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not found:
        raise ValueError(f"no floating-point tensor in the output ({type(output).__name__})")
    return found[0]
