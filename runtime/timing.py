"""The timing harness every optc latency number goes through.

`measure` times one callable over several input sets (rotated, so that a single set
sitting in L2 does not flatter the result). On CUDA each call is bracketed by its own
pair of CUDA events recorded on the current stream and the host synchronises once,
after the last call, so the host never waits inside the timed loop. On CPU each call
is timed with `time.perf_counter`.

Statistics are the median and the 20th/80th percentiles (linear interpolation, as
`numpy.percentile` does), never the mean: a single stall should not move a number.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import math
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from optc.errors import UsageError
from optc.version import __version__

__all__ = ["Timing", "measure", "summarise", "device_info", "device_probe", "call_with", "as_device",
           "git_commit", "git_dirty", "result_envelope"]


@dataclass(frozen=True)
class Timing:
    """A latency summary in milliseconds.

    `compile_s` (seconds spent compiling or warming up before timing) and `info`
    (free-form facts about how the number was obtained) travel with the timing but are
    not part of the latency: they are reported separately.
    """

    median_ms: float
    p20_ms: float
    p80_ms: float
    n: int
    compile_s: float | None = None
    info: dict = field(default_factory=dict, compare=False)

    def as_row(self, name: str, baseline_ms: float | None) -> dict:
        """One row of `bench --json`: ratio = baseline median / this median (> 1 is faster)."""
        if baseline_ms is None or self.median_ms <= 0:
            ratio = None
        else:
            ratio = float(baseline_ms) / self.median_ms
        return {
            "name": name,
            "median_ms": self.median_ms,
            "p20_ms": self.p20_ms,
            "p80_ms": self.p80_ms,
            "ratio_vs_baseline": ratio,
        }

    def to_dict(self) -> dict:
        """Everything, for result JSON (the row plus n, compile time and info)."""
        return {
            "median_ms": self.median_ms,
            "p20_ms": self.p20_ms,
            "p80_ms": self.p80_ms,
            "n": self.n,
            "compile_s": self.compile_s,
            "info": dict(self.info),
        }

    def with_extra(self, *, compile_s: float | None = None, **info: Any) -> "Timing":
        """A copy carrying a compile time and/or more info."""
        merged = dict(self.info)
        merged.update(info)
        return Timing(
            self.median_ms,
            self.p20_ms,
            self.p80_ms,
            self.n,
            self.compile_s if compile_s is None else compile_s,
            merged,
        )


def _percentile(sorted_vals: Sequence[float], q: float) -> float:
    # Linear interpolation between closest ranks (numpy's default "linear" method).
    pos = (len(sorted_vals) - 1) * q
    lo = math.floor(pos)
    hi = math.ceil(pos)
    if lo == hi:
        return float(sorted_vals[lo])
    frac = pos - lo
    return float(sorted_vals[lo] * (1.0 - frac) + sorted_vals[hi] * frac)


def pooled(rounds: Sequence[Timing]) -> Timing:
    """One program timed in several rounds as one timing: every call of every round
    pooled, with each round's median and the first round's setup and details."""
    first = rounds[0]
    return summarise([ms for t in rounds for ms in t.info["samples_ms"]]).with_extra(
        compile_s=first.compile_s, **{k: v for k, v in first.info.items() if k != "samples_ms"},
        rounds=len(rounds), round_medians_ms=[round(t.median_ms, 4) for t in rounds])


def summarise(samples: Sequence[float]) -> Timing:
    """Median and 20th/80th percentiles of per-call times in milliseconds."""
    vals = [float(s) for s in samples]
    if not vals:
        raise UsageError("summarise() needs at least one sample")
    if any(not math.isfinite(v) or v < 0 for v in vals):
        raise UsageError(f"timing samples must be finite and non-negative, got {vals[:8]}")
    vals.sort()
    return Timing(
        median_ms=_percentile(vals, 0.5),
        p20_ms=_percentile(vals, 0.2),
        p80_ms=_percentile(vals, 0.8),
        n=len(vals),
    )


def as_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("device 'cuda' was asked for but torch sees no CUDA device")
    return dev


def call_with(fn: Callable, inputs: Any):
    """Call fn with one input set: a dict is passed as keywords, a tuple/list as positional
    arguments, anything else (a tensor) as the single argument."""
    if isinstance(inputs, dict):
        return fn(**inputs)
    if isinstance(inputs, (tuple, list)):
        return fn(*inputs)
    return fn(inputs)


def measure(
    fn: Callable,
    inputs_list: Sequence[Any],
    *,
    warmup: int = 10,
    iters: int = 50,
    device: str | torch.device | None = None,
) -> Timing:
    """Time `fn` over `iters` calls after `warmup` calls, rotating through `inputs_list`.

    Returns per-call statistics in milliseconds. Outputs are dropped; `fn` must do its
    work on the device the inputs live on.
    """
    if not isinstance(inputs_list, (list, tuple)) or len(inputs_list) == 0:
        raise UsageError("measure() needs a non-empty list of input sets")
    if iters < 1 or warmup < 0:
        raise UsageError(f"measure() needs iters >= 1 and warmup >= 0, got {iters=}, {warmup=}")
    dev = as_device(device)
    k = len(inputs_list)
    # no_grad, not inference_mode: tensors created here (a lazily built cache, say) must
    # stay usable for in-place updates after measure() returns.
    with torch.no_grad():
        for i in range(warmup):
            call_with(fn, inputs_list[i % k])
        if dev.type == "cuda":
            with torch.cuda.device(dev):
                torch.cuda.synchronize()
                starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
                ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
                for i in range(iters):
                    starts[i].record()
                    call_with(fn, inputs_list[i % k])
                    ends[i].record()
                # One host wait, after all calls were queued.
                torch.cuda.synchronize()
                samples = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        else:
            samples = []
            for i in range(iters):
                t0 = time.perf_counter()
                call_with(fn, inputs_list[i % k])
                samples.append((time.perf_counter() - t0) * 1e3)
    return summarise(samples)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_info(device: str | torch.device | None = None) -> dict:
    """Device name and library versions for result JSON."""
    dev = as_device(device)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        name = props.name
        extra = {
            "sm_count": props.multi_processor_count,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            # Which physical GPU: rows from two runs compare only if this matches
            # (a lent machine may be a different one on every start).
            "uuid": str(getattr(props, "uuid", "")) or None,
            "gpu_state": _gpu_state(str(getattr(props, "uuid", "")) or None),
        }
    else:
        name = platform.processor() or platform.machine() or "cpu"
        extra = {"cpu_threads": torch.get_num_threads()}
    triton_version = _version("triton") or _version("pytorch-triton")
    return {
        "device": name,
        "device_type": dev.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": _version("transformers"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def git_commit() -> str | None:
    """The commit optc runs from (40 hex digits), or None where that is not a git checkout
    (an installed wheel) or git is missing: a result never fails for want of it."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def git_dirty() -> bool | None:
    """Whether tracked files differ from that commit (the run's code is not exactly the
    commit's), or None where git_commit is None."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                             text=True, timeout=10, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def result_envelope(device: str | torch.device | None = None) -> dict:
    """The keys every result JSON opens with (optc bench, optc search, benchmarks/), so
    that each number can be traced to the command, code and machine that produced it:
    argv, git commit, device_info (device, its state, date, versions) and the versions
    once more as one dict."""
    info = device_info(device)
    versions = {k: info[k] for k in ("torch", "triton", "transformers", "cuda", "python")}
    commit = git_commit()
    return {"argv": list(sys.argv), "git_commit": commit, "git_dirty": git_dirty() if commit else None, **info,
            "versions": {**versions, "optc": __version__}}


_SMI_FIELDS = ("clocks.sm", "clocks.mem", "clocks.max.sm", "power.limit", "temperature.gpu", "pstate",
               "clocks_throttle_reasons.active")


def _gpu_state(uuid: str | None) -> dict | None:
    """Clocks, power limit and temperature as nvidia-smi reports them now (None when
    nvidia-smi is missing or fails: these facts annotate a result, they never block it).
    The GPU is named by uuid: torch's index and nvidia-smi's differ under
    CUDA_VISIBLE_DEVICES."""
    smi = shutil.which("nvidia-smi")
    if smi is None or not uuid:
        return None
    try:
        out = subprocess.run([smi, f"--id=GPU-{uuid.removeprefix('GPU-')}", f"--query-gpu={','.join(_SMI_FIELDS)}",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    values = [v.strip() for v in out.stdout.strip().split(",")]
    if out.returncode != 0 or len(values) != len(_SMI_FIELDS):
        return None
    return dict(zip(_SMI_FIELDS, values))


def device_probe(device: str | torch.device | None = None) -> dict | None:
    """Two reference timings of the GPU itself, taken in the process that times the rows:
    a device-to-device copy (TB/s over bytes read + written) and cuBLAS's bf16 GEMV on a
    Llama-1B MLP shape (8192 x 2048, one token). Rows from two processes or two machines
    compare only as far as these agree; None on CPU."""
    dev = as_device(device)
    if dev.type != "cuda":
        return None
    with torch.cuda.device(dev):
        src = torch.empty(2**28, dtype=torch.uint8, device=dev)  # 256 MiB, far beyond L2
        dst = torch.empty_like(src)
        copy = measure(lambda: dst.copy_(src), [()], warmup=5, iters=30, device=dev)
        # Eight weights that do not fit in L2 together (every GEMV reads HBM), replayed as
        # one CUDA graph so that host launch time is not in the number.
        weights = [torch.randn(8192, 2048, device=dev, dtype=torch.bfloat16) for _ in range(8)]
        x = torch.randn(1, 2048, device=dev, dtype=torch.bfloat16)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):  # cuBLAS allocates its workspace outside capture
            for w in weights:
                torch.nn.functional.linear(x, w)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for w in weights:
                torch.nn.functional.linear(x, w)
        gemv = measure(graph.replay, [()], warmup=3, iters=30, device=dev)
        del src, dst, weights, graph
    return {
        "copy_tbs": round(2 * 2**28 / copy.median_ms / 1e9, 3),
        "gemv_8192x2048_us": round(gemv.median_ms * 1e3 / 8, 2),
        "gemv_note": "per GEMV in a CUDA graph of 8, each on its own weight",
    }
