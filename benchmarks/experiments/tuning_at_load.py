#!/usr/bin/env python
"""Run a script or module and log what Inductor's autotuning does in it: each autotune
cache save (kernel, found by coordinate descent or not), each lookup (hit or not, and
whether the stored entry's configs hash matched), each coordinate-descent run (the
kernel and its cache state), each configuration compiled in this process, and each
kernel Triton compiled or found in its cache ("triton", name, cache hit, and the parts of
its cache key: which part differs tells why a load missed a kernel the compile built). With
`OPTC_WITHOUT_COORDESC_FIX=1` the load runs torch's own `recheck_autotune_cache` and
Triton's own `Config.__setstate__` (torch_fixes' workarounds not installed): the before
of a before/after; with `OPTC_WITHOUT_CACHED_CHOICE_FIX=1` only
`torch_fixes.cached_choice_not_tuned_again` is left out.

    OUT=tuning.json python benchmarks/experiments/tuning_at_load.py -m optc.cli compile llama-1b --target h100 --package none -o l1b.optc
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) TRITON_CACHE_DIR=$(mktemp -d) OUT=load.json \\
        python benchmarks/experiments/tuning_at_load.py benchmarks/load_to_first_token.py l1b.optc --tokens 64

Counts, and the seconds spent inside each kind of call (a configuration's Triton compile,
a coordinate-descent run; the kinds overlap: a run's seconds hold the compiles of the
configurations it tries), are printed at exit ("TUNING {...} SECONDS {...}"); the full
log is written to $OUT when set.
"""

from __future__ import annotations

import atexit
import collections
import functools
import hashlib
import json
import os
import runpy
import sys
import time
from pathlib import Path

import torch
from torch._inductor.runtime import autotune_cache as ac
from torch._inductor.runtime import triton_heuristics as th

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: harness.py
from harness import write_result  # noqa: E402

LOG: list = []
SECONDS: collections.Counter = collections.Counter()  # wall time inside each wrapped method, by record kind
ARGV = list(sys.argv)


def _key(cache) -> str:
    local = getattr(cache, "local_cache", None)
    return os.path.basename(local[1]) if local else "?"


def _wrap(cls, name, record):
    real = getattr(cls, name)

    # functools.wraps: the FX graph cache pickles bound methods by name, and a wrapper
    # named "wrapper" makes every lookup fail (a miss), which would change what is measured.
    @functools.wraps(real)
    def wrapper(self, *args, **kwargs):
        start = time.perf_counter()
        out = real(self, *args, **kwargs)
        entry = record(self, out, *args, **kwargs)
        SECONDS[entry[0]] += time.perf_counter() - start
        LOG.append(entry)
        return out

    setattr(cls, name, wrapper)


_wrap(ac.AutotuneCache, "save", lambda self, out, config, t, found_by_coordesc=False, *a, **k:
      ("save", _key(self), bool(found_by_coordesc)))
_wrap(ac.AutotuneCache, "read_best", lambda self, out, meta, configs:
      ("read", _key(self), out is not None, bool(getattr(out, "found_by_coordesc", False)), len(configs)))
_wrap(th.CachingAutotuner, "coordinate_descent_tuning", lambda self, out, launcher, *a, **k:
      ("coordesc", self.inductor_meta.get("kernel_name"),
       (getattr(self, "autotune_cache_info", None) or {}).get("autotune_cache_state"),
       len(self.launchers or ())))  # configs is None once precompiled; the launchers stay
_wrap(th.CachingAutotuner, "_precompile_config", lambda self, out, cfg, *a, **k:
      ("compiled", self.inductor_meta.get("kernel_name"), bool(getattr(cfg, "found_by_coordesc", False))))


def _listen_to_triton():
    try:
        from triton import knobs
        from triton.compiler import compiler
    except ImportError:
        return
    # Cache-key hash -> what Triton's get_cache_key joined into it (beside Triton's own
    # version key): the source's hash (function, signature, attributes, constants), the
    # backend's (the ptxas version, the target), the options' and the environment's.
    parts = {}
    get_cache_key = compiler.get_cache_key

    def recording_get_cache_key(src, backend, backend_options, env_vars):
        key = get_cache_key(src, backend, backend_options, env_vars)
        parts[hashlib.sha256(key.encode("utf-8")).hexdigest()] = dict(
            source=src.hash(), backend=backend.hash(), options=backend_options.hash(), env=str(sorted(env_vars.items())))
        return key

    compiler.get_cache_key = recording_get_cache_key

    def listener(*, src, metadata, metadata_group, times, cache_hit):
        # The key's parts, and what tells one configuration from another to a reader (the
        # compile options, the constants, the kernel's file), to compare one kernel's
        # compiles across processes.
        key = {k: v for k, v in metadata.items() if isinstance(v, (bool, int, float, str)) and k != "name"}
        key.update({f"key.{k}": v for k, v in parts.get(metadata.get("hash"), {}).items()})
        code = getattr(getattr(getattr(src, "fn", None), "fn", None), "__code__", None)
        constants = sorted((str(k), str(v)) for k, v in (getattr(src, "constants", None) or {}).items())
        key.update(constants=str(constants), file=getattr(code, "co_filename", None))
        LOG.append(("triton", metadata.get("name"), bool(cache_hit), key))

    knobs.compilation.listener = listener


def _report():
    counts = collections.Counter(" ".join(str(x) for x in (e[0], *e[2:]) if not isinstance(x, dict)) for e in LOG)
    seconds = {k: round(v, 2) for k, v in sorted(SECONDS.items())}
    print("TUNING", json.dumps(dict(sorted(counts.items()))), "SECONDS", json.dumps(seconds))
    if os.environ.get("OUT"):
        write_result(os.environ["OUT"], {"run": ARGV[1:], "counts": dict(counts), "seconds": seconds, "log": LOG},
                     device="cuda" if torch.cuda.is_available() else "cpu")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    atexit.register(_report)
    _listen_to_triton()
    without_all = os.environ.get("OPTC_WITHOUT_COORDESC_FIX")
    if without_all or os.environ.get("OPTC_WITHOUT_CACHED_CHOICE_FIX"):
        from optc.compiler.codegen import lowering

        lowering.cached_choice_not_tuned_again = lambda: False
        if without_all:
            lowering.static_autotuner_keeps_coordesc = lambda: False
            lowering.config_pickles_keep_coordesc = lambda: False
    if sys.argv[1] == "-m":
        sys.argv = [sys.argv[2], *sys.argv[3:]]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
