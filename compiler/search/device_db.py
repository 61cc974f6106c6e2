"""Per-device calibration of the cost model's roofline: microbenchmarks, and one JSON
file per device in the user's cache directory.

A device is keyed by what changes its speed: the GPU name (or "cpu" and the CPU model),
the driver, torch and triton versions. A record holds the fitted constants the cost
model reads (`bandwidth_gbs`, `tflops`, and `launch_us`: what each kernel costs beyond
its bytes) and the raw measurements they came from, so a fit can be checked by hand.

This module imports neither optc.runtime nor Triton (importing Triton here would fix
its interpreter mode for the whole process); versions come from package metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from optc.compiler.torch_private import cuda_driver_api_version

SCHEMA = 2


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """$OPTC_CACHE_DIR, else $XDG_CACHE_HOME/optc, else ~/.cache/optc."""
    if os.environ.get("OPTC_CACHE_DIR"):
        return Path(os.environ["OPTC_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "optc"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _nvidia_driver() -> str | None:
    # The kernel module's version is the driver users know; torch only exposes the
    # CUDA driver API level, used when /proc is not there (other OSes).
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        found = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", text)
        if found:
            return found.group(1)
    except OSError:
        pass
    try:
        return f"cuda-api-{cuda_driver_api_version()}"
    except Exception:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_key(device: str | torch.device) -> dict:
    """What identifies a device's speed: name, driver, torch and triton versions."""
    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        name, driver = torch.cuda.get_device_properties(index).name, _nvidia_driver()
    else:
        name, driver = f"cpu {_cpu_model()}", None
    return {"device": name, "driver": driver, "torch": torch.__version__, "triton": _version("triton")}


def key_file(key: dict) -> Path:
    """The record's path: a readable slug plus a hash of the whole key (slugs collide)."""
    text = json.dumps(key, sort_keys=True)
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{key['device']}_{key['driver']}_torch{key['torch']}").strip("-")
    return cache_dir() / "devices" / f"{slug[:80]}-{hashlib.sha256(text.encode()).hexdigest()[:10]}.json"


def load(device: str | torch.device) -> dict | None:
    """The stored record of this device (as keyed now), or None."""
    key = device_key(device)
    path = key_file(key)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("key") == key and record.get("schema") == SCHEMA else None


def store(record: dict) -> Path:
    """Write atomically (a temporary file in the same folder, then os.replace) so that
    parallel study workers never read half a record."""
    path = key_file(record["key"])
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------------------- history
# Every latency a search measures on a device is also appended to the device's history
# (one JSON line per sample, beside its record), so a new study on the same device
# starts with a fitted correction instead of measuring its first trials blind.


def history_file(key: dict) -> Path:
    return key_file(key).with_suffix(".samples.jsonl")


def append_sample(device: str | torch.device, sample: dict) -> None:
    """Add one measured sample: {"workload": {...}, "lowering": str, "features": {...},
    "ms": float, "model": str}. One write per line in append mode, so concurrent
    workers' lines do not interleave; a torn last line is skipped on reading."""
    path = history_file(device_key(device))
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({**sample, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, sort_keys=True) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)


def history(device: str | torch.device, *, kind: str, lowering: str) -> list[dict]:
    """The device's measured samples for one workload kind (decode, forward) and
    lowering (the search's label: target or plain, and the lowering's settings): the cost
    model is only comparable within one."""
    path = history_file(device_key(device))
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            s = json.loads(line)
        except ValueError:
            continue
        if s.get("workload", {}).get("kind") == kind and s.get("lowering") == lowering and s.get("ms"):
            out.append(s)
    return out


# ---------------------------------------------------------------------------- timing


def _timer(dev: torch.device):
    """fn, reps -> median ms per call of `fn`, from `reps` timed calls after a warm-up."""

    def run(fn, reps: int) -> float:
        fn()
        times = []
        for _ in range(reps):
            if dev.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return run


def _per_call_ms(dev: torch.device, fn, calls: int, reps: int, timed, graph: bool = True) -> float:
    """ms per call of `fn` among `calls` back-to-back calls: replayed from a CUDA graph
    (how the runtime decodes, with no host launch cost in between), or a tight loop
    (CPU, and long kernels, which the host outruns anyway: a plain copy captured in a
    graph becomes a copy-engine transfer, slower than the copy kernel the programs run).
    One call at a time would time the host's launch, not the kernel."""
    if dev.type == "cuda" and graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # warm the op outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        return timed(graph.replay, reps) / calls

    def loop():
        for _ in range(calls):
            fn()

    return timed(loop, reps) / calls


def _rotating(make, nbytes_each: int, at_least: int) -> list:
    """Enough copies of an operand that cycling through them overflows the last-level
    cache, so bandwidth is DRAM's, not the cache's."""
    return [make() for _ in range(max(1, -(-at_least // max(nbytes_each, 1))))]


SIZES = {
    # copy MiB, launch calls, GEMV (K, N) shapes (1 x K @ K x N), GEMM n, timed reps
    "full": {"copy_mib": 512, "calls": 2000,
             "gemv": [(2048, 2048), (2048, 8192), (8192, 2048), (4096, 14336), (8192, 28672)],
             "gemm": 8192, "reps": 20},
    "quick": {"copy_mib": 4, "calls": 200, "gemv": [(256, 256), (512, 1024)], "gemm": 256, "reps": 3},
}


def microbenchmarks(device: str | torch.device, dtype: torch.dtype, *, quick: bool = False, log=_log) -> dict:
    """Raw measurements: copy bandwidth, launch cost, GEMV times, GEMM rate."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    sizes = SIZES["quick" if quick else "full"]
    timed = _timer(dev)
    item = torch.empty((), dtype=dtype).element_size()
    llc = torch.cuda.get_device_properties(dev).L2_cache_size if dev.type == "cuda" else 64 << 20
    flush_at = 0 if quick else 4 * llc
    out: dict = {"dtype": str(dtype).replace("torch.", "")}

    n = sizes["copy_mib"] << 20
    src, dst = torch.empty(n, dtype=torch.uint8, device=dev), torch.empty(n, dtype=torch.uint8, device=dev)
    ms = _per_call_ms(dev, lambda: dst.copy_(src), 4, sizes["reps"], timed, graph=False)
    out["copy"] = {"bytes": 2 * n, "ms": ms}  # read + write, as the features count bytes
    del src, dst
    log(f"[optc] calibrate {dev}: copy {2 * n / ms / 1e6:.1f} GB/s")

    tiny = torch.zeros(1, device=dev)
    out["launch_us"] = _per_call_ms(dev, lambda: tiny.add_(1), sizes["calls"], sizes["reps"], timed) * 1e3
    log(f"[optc] calibrate {dev}: launch {out['launch_us']:.2f} us")

    out["gemv"] = []
    for k, m in sizes["gemv"]:
        weights = _rotating(lambda: torch.randn(m, k, device=dev, dtype=dtype), m * k * item, flush_at)
        x = torch.randn(1, k, device=dev, dtype=dtype)
        state = {"i": 0}

        def gemv():
            state["i"] = (state["i"] + 1) % len(weights)
            torch.nn.functional.linear(x, weights[state["i"]])

        calls = len(weights) * max(1, -(-16 // len(weights)))  # every copy, equally often
        ms = _per_call_ms(dev, gemv, calls, sizes["reps"], timed)
        out["gemv"].append({"shape": [1, k, m], "bytes": (m * k + k + m) * item, "ms": ms})
        del weights

    g = sizes["gemm"]
    a, b = torch.randn(g, g, device=dev, dtype=dtype), torch.randn(g, g, device=dev, dtype=dtype)
    ms = _per_call_ms(dev, lambda: a @ b, 4, sizes["reps"], timed, graph=False)
    out["gemm"] = {"n": g, "flops": 2 * g**3, "ms": ms}
    log(f"[optc] calibrate {dev}: GEMM {out['gemm']['flops'] / out['gemm']['ms'] / 1e9:.2f} TFLOP/s")
    return out


def fit_constants(raw: dict) -> dict:
    """Roofline constants from the measurements. GEMV time against bytes is a line:
    its slope gives the bandwidth weight-bound kernels reach (decode is GEMVs; a copy
    is another kernel), its intercept what every kernel costs beyond its bytes
    (launch, ramp-up, tail), never less than a tiny kernel's launch. The FLOP rate is
    the GEMM's."""
    launch_ms = raw["launch_us"] / 1e3
    copy_gbs = raw["copy"]["bytes"] / raw["copy"]["ms"] / 1e6
    x = np.array([g["bytes"] for g in raw.get("gemv", [])], dtype=float)
    t = np.array([g["ms"] for g in raw.get("gemv", [])], dtype=float)
    slope = intercept = None
    if len(set(x)) >= 2:
        slope, intercept = np.polyfit(x, t, 1)
    if slope is None or slope <= 0:  # too few sizes, or noise swamped them: the mean rate
        slope = float(np.sum(np.maximum(t - launch_ms, 0.5 * t)) / np.sum(x)) if len(x) else 1 / (copy_gbs * 1e6)
        intercept = launch_ms
    return {
        "bandwidth_gbs": 1.0 / slope / 1e6,
        "launch_us": max(float(intercept), launch_ms) * 1e3,
        "copy_gbs": copy_gbs,
        "tiny_launch_us": raw["launch_us"],
        "tflops": raw["gemm"]["flops"] / raw["gemm"]["ms"] / 1e9,
    }


def calibrate_device(device: str | torch.device, *, dtype: torch.dtype | None = None, quick: bool = False,
                     log=_log) -> dict:
    """Measure `device`, fit the roofline constants, store the record; returns it.
    dtype: the device's dtype by default (bf16 on CUDA, fp32 on CPU); quick: tiny sizes
    (tests, smoke runs), whose constants are rough."""
    dev = torch.device(device)
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    raw = microbenchmarks(dev, dtype, quick=quick, log=log)
    record = {
        "schema": SCHEMA,
        "key": device_key(dev),
        "constants": fit_constants(raw),
        "measurements": raw,
        "quick": quick,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    record["path"] = str(store(record))
    log(f"[optc] calibration stored in {record['path']}")
    return record
