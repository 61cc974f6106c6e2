"""Wall-clock time spent inside the parts of `optc.load` and of building a decoder, without a
profiler: cProfile inflates exactly the call-heavy parts of torch.export's deserialisation
(benchmarks/NOTES.md, "Two load shortcuts measured on the CPU and dropped"), so it cannot
say which part to work on.

    with load_phases() as seconds:
        art = optc.load(path)
    seconds  # {"members read": 0.4, "JSON to schema": 0.9, ...}

Each phase sums the time its calls took, in whichever thread ran them (the members are read
while another thread imports the deserialiser), so phases may overlap one another; nested
phases are listed apart (the deserialised graph is part of torch.export.load). What they
wrap is torch 2.11-2.13's (torch._export.serde.serialize, torch.export.pt2_archive); a
function a torch release lacks is skipped, and its phase is absent from the result.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib
import threading
import time

# (module, attribute path, phase)
_PHASES = (
    ("optc.runtime.member_read", "read", "members read"),
    ("optc.runtime.member_read", "mismatch", "members checked (sha256)"),
    ("torch.export", "load", "torch.export.load"),
    ("torch._export.serde.serialize", "_bytes_to_dataclass", "JSON to schema"),
    ("torch._export.serde.serialize", "GraphModuleDeserializer.deserialize_graph", "graph deserialised"),
    ("torch.export.pt2_archive._package", "_load_state_dict", "state dict"),
    ("torch.export", "ExportedProgram.module", "unlifted (ep.module)"),
)


@contextlib.contextmanager
def load_phases():
    """{phase: seconds} filled while the block runs; the wrapped functions are restored after."""
    seconds: dict[str, float] = collections.defaultdict(float)
    lock = threading.Lock()
    restore = []
    for module_name, path, phase in _PHASES:
        try:
            owner = importlib.import_module(module_name)
            *parents, name = path.split(".")
            for part in parents:
                owner = getattr(owner, part)
            real = getattr(owner, name)
        except (ImportError, AttributeError):
            continue
        restore.append((owner, name, real))
        setattr(owner, name, _timed(real, phase, seconds, lock))
    try:
        yield seconds
    finally:
        for owner, name, real in reversed(restore):
            setattr(owner, name, real)


def _timed(fn, phase: str, seconds: dict, lock: threading.Lock):
    @functools.wraps(fn)
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            with lock:
                seconds[phase] += time.perf_counter() - start

    return timed
