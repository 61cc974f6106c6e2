"""The baselines `optc bench` runs in the same process as optc.

Each returns a `Timing` (median/p20/p80 ms) whose `compile_s` holds the time of the
untimed first call(s) (compilation, autotuning, graph capture) and whose `info` says how
the number was obtained. Result names: "eager", "hf-static", "inductor", "inductor-max", and
for forward models "optc-backend" (torch.compile with backend="optc").

Decoder LMs: ms/token of decoding, prefill excluded, the same definition as
`StaticCacheDecoder.measure_decode`: for a prompt and N new tokens (the first one comes
from the prefill), ms/token = time from the first new token being produced to the N-th
being produced, divided by N - 1. On CUDA the two instants are CUDA events recorded on
the current stream (for `model.generate` from a StoppingCriteria, which generate calls
once per produced token; it records an event and never synchronises); on CPU they are
`time.perf_counter`. One sample per generation; `repeats` timed generations after one
untimed one. `min_new_tokens = max_new_tokens` so generation never stops early.

Encoders / ViT: ms per forward of one batch through `optc.runtime.timing.measure`.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from optc.compiler.torch_private import dynamo_counters
from optc.errors import UsageError
from optc.runtime.timing import Timing, as_device, call_with, measure, summarise

__all__ = [
    "LM_BASELINES",
    "FORWARD_BASELINES",
    "hf_generate_eager",
    "hf_generate_static",
    "inductor_decode",
    "eager_forward",
    "inductor_forward",
    "run_lm_baselines",
    "run_forward_baselines",
    "static_cache_module",
]


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_lm_args(prompt: torch.Tensor, n: int) -> None:
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.dtype != torch.long:
        raise UsageError("prompt must be a [batch, length] torch.long tensor")
    if int(n) < 2:
        raise UsageError(f"decode timing needs at least 2 new tokens, got {n}")


class _Clock:
    """Marks instants on the device timeline (CUDA events) or the host clock (CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.marks: list = []

    def mark(self) -> None:
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def ms_per_step(self) -> float:
        """(last mark - first mark) / (number of marks - 1)."""
        if len(self.marks) < 2:
            raise RuntimeError("fewer than two timing marks were recorded")
        first, last = self.marks[0], self.marks[-1]
        steps = len(self.marks) - 1
        if self.device.type == "cuda":
            last.synchronize()
            return first.elapsed_time(last) / steps
        return (last - first) * 1e3 / steps


def _token_clock_criteria(clock: _Clock, batch: int, device: torch.device):
    from transformers import StoppingCriteria

    never = torch.zeros(batch, dtype=torch.bool, device=device)

    class _TokenClock(StoppingCriteria):
        # generate calls its stopping criteria once per produced token (the prefill's
        # included), right after appending it: one mark per token, no host sync.
        def __call__(self, input_ids, scores, **kwargs):
            clock.mark()
            return never

    return _TokenClock()


def _generate_timing(model, prompt, n, *, repeats, **gen_kwargs) -> Timing:
    from transformers import StoppingCriteriaList

    _check_lm_args(prompt, n)
    device = _device_of(model)
    prompt = prompt.to(device)
    B = prompt.shape[0]
    kwargs = dict(
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=int(n),
        min_new_tokens=int(n),
        do_sample=False,
        pad_token_id=0,
    )
    kwargs.update(gen_kwargs)
    samples: list[float] = []
    compile_s = None
    tokens = None
    with torch.no_grad():
        for r in range(repeats + 1):
            clock = _Clock(device)
            crit = StoppingCriteriaList([_token_clock_criteria(clock, B, device)])
            _sync(device)
            t0 = time.perf_counter()
            out = model.generate(prompt, stopping_criteria=crit, **kwargs)
            _sync(device)
            if out.shape[1] != prompt.shape[1] + n:
                raise RuntimeError(
                    f"generate produced {out.shape[1] - prompt.shape[1]} tokens, expected {n}"
                )
            if len(clock.marks) != n:
                raise RuntimeError(f"expected {n} per-token marks from generate, got {len(clock.marks)}")
            if r == 0:
                compile_s = time.perf_counter() - t0
                tokens = out[0, prompt.shape[1] :].tolist()
            else:
                samples.append(clock.ms_per_step())
    return summarise(samples).with_extra(
        compile_s=compile_s,
        definition="(t[token N] - t[token 1]) / (N - 1), prefill excluded",
        new_tokens=int(n),
        first_tokens=tokens[:16],
    )


def hf_generate_eager(model: nn.Module, prompt: torch.Tensor, n: int, *, repeats: int = 5) -> Timing:
    """`model.generate` with the default dynamic cache, no compile ("eager")."""
    t = _generate_timing(model, prompt, n, repeats=repeats, cache_implementation="dynamic")
    return t.with_extra(baseline="eager")


def hf_generate_static(model: nn.Module, prompt: torch.Tensor, n: int, *, repeats: int = 5) -> Timing:
    """`model.generate(cache_implementation="static")` ("hf-static"). Recent transformers
    auto-compile the decode forward (Inductor, reduce-overhead) for a static cache on
    CUDA; `info["auto_compiled"]` records whether it did, and `info["dynamo_graphs"]`
    how many graphs Dynamo compiled meanwhile."""
    counters = dynamo_counters()

    had = hasattr(model, "_compiled_call")
    if had:
        # A compiled call left by an earlier run would hide whether this one compiled.
        del model._compiled_call
    graphs_before = counters["stats"]["unique_graphs"]
    t = _generate_timing(model, prompt, n, repeats=repeats, cache_implementation="static")
    auto = hasattr(model, "_compiled_call")
    return t.with_extra(
        baseline="hf-static",
        auto_compiled=auto,
        dynamo_graphs=counters["stats"]["unique_graphs"] - graphs_before,
    )


def static_cache_module(model: nn.Module, batch_size: int, max_cache_len: int) -> nn.Module:
    """`TorchExportableModuleWithStaticCache` over `model`, without leaving the
    static-cache generation config it requires on the model."""
    from transformers import GenerationConfig
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    saved = model.generation_config
    gc = copy.deepcopy(saved) if saved is not None else GenerationConfig()
    gc.use_cache = True
    gc.cache_implementation = "static"
    gc.cache_config = {"batch_size": int(batch_size), "max_cache_len": int(max_cache_len)}
    model.generation_config = gc
    try:
        return TorchExportableModuleWithStaticCache(model, int(batch_size), int(max_cache_len))
    finally:
        model.generation_config = saved


def inductor_decode(
    model: nn.Module,
    prompt: torch.Tensor,
    n: int,
    mode: str = "default",
    *,
    repeats: int = 5,
    fullgraph: bool = False,
) -> Timing:
    """torch.compile of the static-cache module's forward, greedy loop in Python.

    mode "default" is the "inductor" baseline; "max-autotune" ("inductor-max") uses
    Inductor's own CUDA graphs on CUDA. Only the decode step is compiled (static
    shapes); the prefill runs the same module eagerly.
    """
    counters = dynamo_counters()

    _check_lm_args(prompt, n)
    if mode not in ("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead"):
        raise UsageError(f"unknown torch.compile mode {mode!r}")
    device = _device_of(model)
    prompt = prompt.to(device)
    B, T = prompt.shape
    module = static_cache_module(model, B, T + int(n))
    step = torch.compile(module, mode=mode, fullgraph=fullgraph, dynamic=False)
    inductor_graphs = mode in ("max-autotune", "reduce-overhead") and device.type == "cuda"
    skips_before = counters["inductor"]["cudagraph_skips"]
    graphs_before = counters["stats"]["unique_graphs"]

    def one_generation() -> tuple[float, list[int]]:
        clock = _Clock(device)
        pos = torch.arange(T, dtype=torch.long, device=device)
        logits = module(input_ids=prompt, cache_position=pos)  # eager prefill
        tok = logits[:, -1, :].argmax(dim=-1, keepdim=True)
        pos = torch.tensor([T], dtype=torch.long, device=device)
        toks = [tok]
        clock.mark()
        for _ in range(int(n) - 1):
            if inductor_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            logits = step(input_ids=tok, cache_position=pos)
            tok = logits[:, -1, :].argmax(dim=-1, keepdim=True)
            pos = pos + 1
            toks.append(tok)
            clock.mark()
        ms = clock.ms_per_step()
        return ms, torch.cat(toks, dim=1)[0].tolist()

    samples = []
    with torch.no_grad():
        _sync(device)
        t0 = time.perf_counter()
        _, tokens = one_generation()
        _sync(device)
        compile_s = time.perf_counter() - t0
        for _ in range(repeats):
            samples.append(one_generation()[0])
    name = "inductor" if mode == "default" else ("inductor-max" if mode == "max-autotune" else mode)
    return summarise(samples).with_extra(
        compile_s=compile_s,
        baseline=name,
        mode=mode,
        definition="(t[token N] - t[token 1]) / (N - 1), prefill excluded",
        new_tokens=int(n),
        first_tokens=tokens[:16],
        dynamo_graphs=counters["stats"]["unique_graphs"] - graphs_before,
        cudagraph_skips=counters["inductor"]["cudagraph_skips"] - skips_before,
    )


def _as_inputs_list(inputs: Any) -> list:
    """A list of input sets; a single dict/tensor/tuple is one set, rotated as 3 clones
    (distinct addresses) so that `measure` still rotates."""
    if isinstance(inputs, list):
        if not inputs:
            raise UsageError("empty list of input sets")
        return inputs

    def clone(x):
        if isinstance(x, torch.Tensor):
            return x.clone()
        if isinstance(x, dict):
            return {k: clone(v) for k, v in x.items()}
        if isinstance(x, tuple):
            return tuple(clone(v) for v in x)
        return x

    return [inputs] + [clone(inputs) for _ in range(2)]


def eager_forward(
    model: nn.Module,
    inputs: Any,
    *,
    warmup: int = 10,
    iters: int = 50,
    device: str | torch.device | None = None,
) -> Timing:
    """ms per forward of a batch, eager ("eager"). `inputs`: one input set (tensor,
    tuple of positional args, or dict of keywords) or a list of input sets."""
    dev = as_device(device) if device is not None else _device_of(model)
    inputs_list = _as_inputs_list(inputs)
    t0 = time.perf_counter()
    with torch.no_grad():
        call_with(model, inputs_list[0])
    _sync(dev)
    first_s = time.perf_counter() - t0
    t = measure(model, inputs_list, warmup=warmup, iters=iters, device=dev)
    return t.with_extra(compile_s=first_s, baseline="eager")


OPTC_BACKEND = "optc-backend"


def compiled_forward(model: nn.Module, mode: str, device: torch.device):
    """torch.compile(model, mode) as a callable that marks each call a new CUDA-graph step
    where Inductor captures graphs (max-autotune, reduce-overhead on CUDA): the graphs
    reuse their output buffers, and a call must say the last outputs are no longer read."""
    # OPTC_BACKEND: optc's torch.compile backend with its defaults (optc/backend.py)
    compiled = torch.compile(model, backend="optc") if mode == OPTC_BACKEND else torch.compile(model, mode=mode)
    graphs = mode in ("max-autotune", "reduce-overhead") and device.type == "cuda"

    def fn(*args, **kwargs):
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args, **kwargs)

    return fn


def inductor_forward(
    model: nn.Module,
    inputs: Any,
    mode: str = "default",
    *,
    warmup: int = 10,
    iters: int = 50,
    device: str | torch.device | None = None,
) -> Timing:
    """ms per forward of torch.compile(model, mode): "inductor" (default),
    "inductor-max" (max-autotune, Inductor's CUDA graphs on CUDA), or "optc-backend"
    (backend="optc", no lossy pass: optc's lowering for the target, without CUDA graphs)."""
    counters = dynamo_counters()

    dev = as_device(device) if device is not None else _device_of(model)
    inputs_list = _as_inputs_list(inputs)
    fn = compiled_forward(model, mode, dev)
    skips_before = counters["inductor"]["cudagraph_skips"]
    t0 = time.perf_counter()
    with torch.no_grad():
        call_with(fn, inputs_list[0])
        call_with(fn, inputs_list[0])
    _sync(dev)
    compile_s = time.perf_counter() - t0
    t = measure(fn, inputs_list, warmup=warmup, iters=iters, device=dev)
    name = "inductor" if mode == "default" else ("inductor-max" if mode == "max-autotune" else mode)
    return t.with_extra(
        compile_s=compile_s,
        baseline=name,
        mode=mode,
        cudagraph_skips=counters["inductor"]["cudagraph_skips"] - skips_before,
    )


LM_BASELINES: dict[str, Callable[..., Timing]] = {
    "eager": hf_generate_eager,
    "hf-static": hf_generate_static,
    "inductor": lambda model, prompt, n, **kw: inductor_decode(model, prompt, n, "default", **kw),
    "inductor-max": lambda model, prompt, n, **kw: inductor_decode(model, prompt, n, "max-autotune", **kw),
}

FORWARD_BASELINES: dict[str, Callable[..., Timing]] = {
    "eager": eager_forward,
    "inductor": lambda model, inputs, **kw: inductor_forward(model, inputs, "default", **kw),
    "inductor-max": lambda model, inputs, **kw: inductor_forward(model, inputs, "max-autotune", **kw),
    OPTC_BACKEND: lambda model, inputs, **kw: inductor_forward(model, inputs, OPTC_BACKEND, **kw),
}


def _run(table: dict, names: Sequence[str], *args, **kwargs) -> dict[str, Timing]:
    unknown = [n for n in names if n not in table]
    if unknown:
        raise UsageError(f"unknown baseline(s) {unknown}; known: {sorted(table)}")
    return {name: table[name](*args, **kwargs) for name in names}


def run_lm_baselines(model, prompt, n, names: Sequence[str] = tuple(LM_BASELINES), **kwargs) -> dict[str, Timing]:
    """The named decoder-LM baselines, in order, as {name: Timing}."""
    return _run(LM_BASELINES, names, model, prompt, n, **kwargs)


def run_forward_baselines(model, inputs, names: Sequence[str] = tuple(FORWARD_BASELINES), **kwargs) -> dict[str, Timing]:
    """The named encoder/ViT baselines, in order, as {name: Timing}."""
    return _run(FORWARD_BASELINES, names, model, inputs, **kwargs)
