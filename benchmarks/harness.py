"""The one way a script under benchmarks/ writes its result: the same envelope as
`optc bench` and `optc search` (argv, git commit, date, device and its state, library
versions: runtime/timing.py's result_envelope), then the script's own keys, written
atomically. A result file is written by code and never edited after the run: what it
claims about how it was produced must be what the code saw.

    from harness import envelope, write_result    # scripts in benchmarks/
    env = envelope("cuda")                         # once per run: nvidia-smi and git are slow
    write_result(args.out, {"rows": rows}, env)    # as often as the run has more to keep

Scripts in benchmarks/experiments/ put benchmarks/ on sys.path to import this.
"""

from __future__ import annotations

import json
from pathlib import Path

from optc.fileio import atomic_open
from optc.runtime.timing import result_envelope

__all__ = ["envelope", "write_result"]

envelope = result_envelope


def write_result(path, payload: dict, env: dict | None = None, device=None) -> Path:
    """Write `payload` under the envelope `env` (made now for `device` when None) to
    `path`, atomically: a run cut short leaves the last complete file, never half of one.
    A payload key the envelope owns is an error, so that no script can claim another
    device, date or commit than the one the run had."""
    env = result_envelope(device) if env is None else env
    clash = sorted(set(payload) & set(env))
    if clash:
        raise ValueError(f"payload keys {clash} belong to the result envelope; rename them")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps({**env, **payload}, indent=1, default=str) + "\n")
    return path
