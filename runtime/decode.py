"""Greedy decoding over a static KV cache, one CUDA graph per token on CUDA.

How a decoder LM reaches this file: capture exports the Hugging Face model wrapped in
`TorchExportableModuleWithStaticCache` twice with torch.export (non-strict): a prefill
program (T = prompt length) and a decode program (T = 1). Both are called as
`fn(input_ids=[B, T] long, cache_position=[T] long) -> logits [B, T, V]` and mutate the
static KV cache in place.

A prompt of any length goes through the prefill program at one length, `prefill_len`
(runtime/prefill.py), so a new prompt length never compiles again.

How the programs' cache tensors are found and tied to one cache: runtime/cache.py.

The decode step on CUDA is captured once as a CUDA graph that, per replay, runs the
model on a static token buffer, takes the argmax of the last logits, writes it into
the token buffer and the output row, and advances the static cache position: N
replays generate N tokens with no host work in between.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from optc.compiler.capture import KEY_CACHE_BUFFER, LENGTH_BUFFER, is_state_buffer
from optc.errors import UsageError
from optc.runtime.greedy import greedy_token
from optc.runtime.prefill import run_chunks
from optc.runtime.timing import Timing, summarise

from optc.runtime.cache import (_check_shared, _storage_key, cache_buffer_names,
                                tensor_attributes, tie_buffers)

__all__ = ["StaticCacheDecoder"]


def _static_input_shape(module, name: str):
    """The example shape a GraphModule's input was exported with, if static."""
    module = getattr(module, "gm", module)  # an AOTInductor package holds its program's GraphModule
    if not isinstance(module, torch.fx.GraphModule):
        return None
    for node in module.graph.nodes:
        if node.op == "placeholder" and node.target == name:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and all(isinstance(s, int) for s in val.shape):
                return tuple(val.shape)
    return None


# --- StaticCacheDecoder ---------------------------------------------------------------


class StaticCacheDecoder:
    """Greedy generation with a prefill and a decode program sharing one static KV cache.

    prefill, decode: callables `(input_ids=[B, T], cache_position=[T]) -> logits [B, T, V]`
        (usually `ep.module()` of the two exported programs). `prefill` may be None: the
        prompt is then fed one token at a time through `decode`. The cache of `prefill` is
        tied to `decode`'s tensors; if they are the same module nothing is tied.
    compile: optional function applied to each module before use (after tying), e.g.
        `lambda m: torch.compile(m, mode="max-autotune-no-cudagraphs", fullgraph=True)`.
        Do not pass a mode that uses Inductor's own CUDA graphs when `cuda_graph` is on.
    compile_prefill: apply `compile` to the prefill module too (default True).
    cuda_graph: capture the decode step as one CUDA graph (default: on when the cache
        lives on a CUDA device). On CPU the same step runs in a Python loop.
    max_cache_len / batch_size: taken from the `key_cache_*` tensors when not given.
    prefill_len: run the prefill program on chunks of this many tokens, whatever the
        prompt's length (runtime/prefill.py); default: the length the program's input is
        fixed to, if it is, else every prompt goes in whole.

    ms/token (time_decode, and the same definition in optc.runtime.baselines): the time
    from the moment the first new token (the prefill's) is on the device to the moment
    the last decode step's token is, divided by the number of decode steps; prefill
    excluded, one decode step = one token in, one token out (argmax included).
    """

    def __init__(
        self,
        prefill: Callable | None,
        decode: Callable,
        *,
        compile: Callable | None = None,
        compile_prefill: bool = True,
        cuda_graph: bool | None = None,
        max_cache_len: int | None = None,
        batch_size: int | None = None,
        device: str | torch.device | None = None,
        graph_warmup: int = 3,
        prefill_len: int | None = None,
    ) -> None:
        if decode is None:
            raise UsageError("StaticCacheDecoder needs a decode program")
        modules = [m for m in (prefill, decode) if isinstance(m, nn.Module)]
        self.tied: list[str] = []
        if isinstance(prefill, nn.Module) and isinstance(decode, nn.Module) and prefill is not decode:
            # Tie by the cache buffers' own names (key_cache_i, ...), which every program
            # of one model keeps; tie_buffers rebinds their aliases (lifted constants,
            # whose numbering can differ between programs) by storage.
            names = sorted(
                n for n in set(cache_buffer_names(decode)) & set(cache_buffer_names(prefill)) if is_state_buffer(n)
            )
            if not names:
                raise UsageError("prefill and decode programs hold no common KV-cache tensors to tie")
            self.tied = tie_buffers(decode, prefill, names)
            _check_shared(prefill, decode)

        # Every distinct cache storage, for reset().
        self._cache: list[torch.Tensor] = []
        seen = set()
        keys: list[torch.Tensor] = []
        self._lengths: list[torch.Tensor] = []  # the cache's cumulative_length counters
        devices: set[torch.device] = set()
        for mod in modules:
            tensors = tensor_attributes(mod)
            for n in cache_buffer_names(mod):
                t = tensors[n]
                devices.add(t.device)
                k = _storage_key(t)
                if k is not None and k not in seen:
                    seen.add(k)
                    self._cache.append(t)
                    if LENGTH_BUFFER.search(n):
                        self._lengths.append(t)
                if KEY_CACHE_BUFFER.search(n):
                    keys.append(t)
        if len(devices) > 1:
            # nn.Module.to() moves buffers but not GraphModule constants, and the exported
            # graph reaches the cache through constants: move ExportedPrograms with
            # torch.export.passes.move_to_device_pass before ep.module() instead.
            raise UsageError(
                f"the KV-cache tensors live on several devices {sorted(map(str, devices))}; "
                "move the exported programs with torch.export.passes.move_to_device_pass, "
                "not GraphModule.to()"
            )
        if keys:
            # StaticCache keys are [B, heads, max_cache_len, head_dim].
            max_cache_len = max_cache_len or int(keys[0].shape[-2])
            batch_size = batch_size or int(keys[0].shape[0])
            device = device or keys[0].device
        if max_cache_len is None or batch_size is None:
            raise UsageError("cannot infer max_cache_len/batch_size from the programs; pass them")
        self.max_cache_len = int(max_cache_len)
        self.batch_size = int(batch_size)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if devices and next(iter(devices)).type != self.device.type:
            raise UsageError(f"the KV cache lives on {next(iter(devices))}, not on the requested {self.device}")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.use_cuda_graph = (self.device.type == "cuda") if cuda_graph is None else bool(cuda_graph)
        if self.use_cuda_graph and self.device.type != "cuda":
            raise UsageError("cuda_graph=True needs the cache on a CUDA device")
        shape = _static_input_shape(prefill, "input_ids")
        self.prefill_len = int(prefill_len) if prefill_len else (shape[1] if shape else None)
        if self.prefill_len is not None and not 1 <= self.prefill_len <= self.max_cache_len:
            raise UsageError(f"prefill_len={self.prefill_len} must be between 1 and max_cache_len={self.max_cache_len}")
        # A sliding-window layer's cache is shorter than max_cache_len and rolls as its
        # counter grows, so a chunk written twice or a padded one would corrupt it.
        self._sliding = any(int(k.shape[-2]) != self.max_cache_len for k in keys)
        self._prefill_raw, self._decode_raw = prefill, decode

        t0 = time.perf_counter()
        self.decode_fn = compile(decode) if compile is not None else decode
        if prefill is None:
            self.prefill_fn = None
        elif prefill is decode:
            self.prefill_fn = self.decode_fn
        else:
            self.prefill_fn = compile(prefill) if (compile is not None and compile_prefill) else prefill
        self.compiled = compile is not None
        # torch.compile is lazy: the real compile time lands in the first calls, which
        # setup_s (set by warm_up / graph capture) records.
        self.setup_s = time.perf_counter() - t0

        B, L = self.batch_size, self.max_cache_len
        self._tok = torch.zeros(B, 1, dtype=torch.long, device=self.device)
        self._pos = torch.zeros(1, dtype=torch.long, device=self.device)
        # Row of generated tokens, indexed by cache position + 1 (L + 1 columns: the token
        # produced at the last position is never fed back).
        self._out = torch.zeros(B, L + 1, dtype=torch.long, device=self.device)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_warmup = int(graph_warmup)
        self.graph_replays = 0
        self.eager_steps = 0

    @classmethod
    def from_modules(cls, prefill, decode, **kwargs) -> "StaticCacheDecoder":
        """Same as the constructor (kept for callers that build from loaded programs)."""
        return cls(prefill, decode, **kwargs)

    # -- state ---------------------------------------------------------------------------

    @torch.no_grad()
    def reset(self) -> None:
        """Zero the KV cache and the cumulative-length counters."""
        for t in self._cache:
            t.zero_()

    @property
    def cache_tensors(self) -> list[torch.Tensor]:
        return list(self._cache)

    # -- steps ---------------------------------------------------------------------------

    def _step(self) -> None:
        # One token: model -> argmax -> token buffer and output row -> position + 1.
        # Only tensor ops on static buffers, so it can be captured and replayed.
        logits = self.decode_fn(input_ids=self._tok, cache_position=self._pos)
        nxt = greedy_token(logits[:, -1, :])
        self._out.index_copy_(1, self._pos + 1, nxt)
        self._tok.copy_(nxt)
        self._pos.add_(1)

    def _capture(self) -> None:
        if self._graph is not None:
            return
        t0 = time.perf_counter()
        # Warm-up on a side stream (PyTorch CUDA-graph docs): lazy init, autotuning and
        # torch.compile's first calls happen here, not inside the capture. The writes it
        # makes to the cache land at positions 0.. and are overwritten by the next prefill.
        self._tok.zero_()
        self._pos.zero_()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(max(1, self._graph_warmup)):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        torch.cuda.synchronize(self.device)
        self._graph = graph
        self.setup_s += time.perf_counter() - t0

    @torch.no_grad()
    def warm_up(self, prompt_ids: torch.Tensor | None = None) -> float:
        """Compile/capture now (otherwise done by the first generate). Returns seconds."""
        t0 = time.perf_counter()
        if prompt_ids is not None:
            self._check_request(prompt_ids, 1)
            self.reset()
            self._run_prefill(prompt_ids.to(self.device))
        if self.use_cuda_graph:
            self._capture()
        else:
            self._pos.zero_()
            self._step()
        self.reset()
        return time.perf_counter() - t0

    def _check_request(self, prompt_ids: torch.Tensor, n_positions_after: int) -> None:
        if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2:
            raise UsageError("prompt_ids must be a [batch, length] tensor")
        if prompt_ids.dtype != torch.long:
            raise UsageError(f"prompt_ids must be torch.long, got {prompt_ids.dtype}")
        B, T = prompt_ids.shape
        if B != self.batch_size:
            raise UsageError(f"batch {B} does not match the programs' batch {self.batch_size}")
        if T < 1:
            raise UsageError("the prompt needs at least one token")
        if self._sliding and self.prefill_len is not None and T != self.prefill_len and self.prefill_fn is not None:
            raise UsageError(
                f"this model's sliding-window cache takes prompts of exactly {self.prefill_len} tokens through "
                f"its prefill program, got {T}: pad or cut the prompt to {self.prefill_len} tokens"
            )
        if T + n_positions_after > self.max_cache_len:
            raise UsageError(
                f"prompt of {T} tokens + {n_positions_after} new tokens = {T + n_positions_after} "
                f"exceeds max_cache_len={self.max_cache_len}"
            )

    def _set_length(self, n: int) -> None:
        for t in self._lengths:
            t.fill_(n)

    def _prefill_logits(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Fill the cache with the prompt; returns the next-token logits [B, V] at its
        last position."""
        T = prompt_ids.shape[1]
        if self.prefill_fn is None:
            for i in range(T):
                pos = torch.tensor([i], dtype=torch.long, device=self.device)
                logits = self.decode_fn(input_ids=prompt_ids[:, i : i + 1], cache_position=pos)
            return logits[:, -1, :]
        return run_chunks(self.prefill_fn, prompt_ids, self.prefill_len or T, self._set_length)

    def _run_prefill(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Fill the cache with the prompt; returns the first new token [B, 1]."""
        return self._prefill_logits(prompt_ids).argmax(dim=-1, keepdim=True)

    def _start(self, prompt_ids: torch.Tensor) -> None:
        """Prefill and load the static buffers for the first decode step."""
        T = prompt_ids.shape[1]
        self.reset()
        first = self._run_prefill(prompt_ids)
        self._out[:, :T].copy_(prompt_ids)
        self._out[:, T : T + 1].copy_(first)
        self._tok.copy_(first)
        self._pos.fill_(T)

    def _decode_steps(self, n: int) -> None:
        if n <= 0:
            return
        if self.use_cuda_graph:
            for _ in range(n):
                self._graph.replay()
            self.graph_replays += n
        else:
            for _ in range(n):
                self._step()
            self.eager_steps += n

    # -- public --------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding: returns [B, T + max_new_tokens] (prompt then new tokens)."""
        if int(max_new_tokens) < 1:
            raise UsageError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        n = int(max_new_tokens)
        self._check_request(prompt_ids, n)
        prompt_ids = prompt_ids.to(self.device)
        T = prompt_ids.shape[1]
        if self.use_cuda_graph:
            self._capture()
        self._start(prompt_ids)
        # The first new token came from the prefill; n - 1 decode steps make the rest.
        self._decode_steps(n - 1)
        return self._out[:, : T + n].clone()

    @torch.no_grad()
    def measure_decode(self, prompt_ids: torch.Tensor, n_tokens: int, *, repeats: int = 5) -> Timing:
        """ms/token over `n_tokens` decode steps after a prefill, `repeats` times (after one
        untimed run); one sample per run. Prefill is excluded."""
        n = int(n_tokens)
        if n < 1 or repeats < 1:
            raise UsageError(f"need n_tokens >= 1 and repeats >= 1, got {n_tokens}, {repeats}")
        self._check_request(prompt_ids, n)
        prompt_ids = prompt_ids.to(self.device)
        if self.use_cuda_graph:
            self._capture()
        samples = []
        for r in range(repeats + 1):
            self._start(prompt_ids)
            if self.device.type == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                self._decode_steps(n)
                end.record()
                end.synchronize()  # one host wait per run, after all n steps
                ms = start.elapsed_time(end) / n
            else:
                t0 = time.perf_counter()
                self._decode_steps(n)
                ms = (time.perf_counter() - t0) * 1e3 / n
            if r > 0:
                samples.append(ms)
        return summarise(samples).with_extra(
            compile_s=self.setup_s,
            samples_ms=samples,
            definition="decode steps only, prefill excluded; ms = elapsed / steps",
            cuda_graph=self.use_cuda_graph,
            steps=n,
        )

    def time_decode(self, prompt_ids: torch.Tensor, n_tokens: int, *, repeats: int = 5) -> float:
        """Median ms per token of `n_tokens` decode steps (prefill excluded)."""
        return self.measure_decode(prompt_ids, n_tokens, repeats=repeats).median_ms

    @torch.no_grad()
    def forced_logits(self, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
        """Teacher-forced logits through the (compiled) programs, no CUDA graph: prefill
        `ids[:, :prompt_len]`, then feed `ids[:, prompt_len:]` one decode step at a time.
        Returns the next-token logits at positions prompt_len-1 .. S-1, [B, S-prompt_len+1, V],
        comparable to `full_model(ids).logits[:, prompt_len-1:]`."""
        S = ids.shape[1]
        self._check_request(ids[:, :prompt_len], S - prompt_len)
        ids = ids.to(self.device)
        self.reset()
        rows = [self._prefill_logits(ids[:, :prompt_len]).clone()]
        for j in range(prompt_len, S):
            pos = torch.tensor([j], dtype=torch.long, device=self.device)
            logits = self.decode_fn(input_ids=ids[:, j : j + 1], cache_position=pos)
            rows.append(logits[:, -1, :].clone())
        self.reset()
        return torch.stack(rows, dim=1)
