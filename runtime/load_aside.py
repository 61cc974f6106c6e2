"""What `optc.load` starts beside reading an artifact (runtime/artifact.read_artifact):
torch.export's deserialiser imported, and Inductor's compile workers booted, while the
members are read and hashed."""

from __future__ import annotations

import threading

from optc.compiler.torch_private import import_export_deserialiser, warm_compile_workers


def for_a_gpu(man: dict) -> bool:
    """Whether the manifest's target is a GPU's and this machine has one."""
    import torch

    from optc.compiler.targets import TARGETS

    target = TARGETS.get(man.get("target"))
    return target is not None and target.device == "cuda" and torch.cuda.is_available()


def import_deserialiser_aside(compile_workers: bool = False, refused: threading.Event | None = None):
    """A started thread importing torch.export's deserialiser (Dynamo with it: about a
    second of a fresh process) while the members are read and hashed, which hold the GIL
    only between chunks, and then, with `compile_workers` and unless `refused` is set by
    then, creating Inductor's compile pool, whose workers boot in processes of their own
    while the programs are deserialised. Its join() comes before the first program is
    read (so the pool is created by one thread only); if the import failed there, the
    load's own import raises the error (and a pool that did not start is started by the
    first lowering, as without this)."""

    def deserialiser():
        try:
            import_export_deserialiser()
            if compile_workers and not (refused is not None and refused.is_set()):
                warm_compile_workers()
        except Exception:  # noqa: BLE001 - the load imports it again and reports it
            pass

    thread = threading.Thread(target=deserialiser, name="optc-import-deserialiser", daemon=True)
    try:
        thread.start()
    except RuntimeError:  # no thread to be had (a process limit): the load imports it itself
        from types import SimpleNamespace

        return SimpleNamespace(join=lambda timeout=None: None)
    return thread
