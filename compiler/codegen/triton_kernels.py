"""Triton's compiled kernels of the compile-time check, carried in the artifact beside
Inductor's kernel cache (kernel_cache.py), so that a load on a fresh machine finds them
in Triton's cache instead of compiling them.

Why: Inductor's FX graph cache entry bundles the Triton kernels its graph compiled, but
an entry is written before the graph first runs, and coordinate descent tunes at that
first run. A kernel whose tuned configuration is not among those the entry bundles is
compiled at load from its source (benchmarks/NOTES.md, "The load on a fresh machine
after the fixes": about twenty such kernels of Llama-1B, 0.1-0.2 s each with an empty
Triton cache). Every configuration this process compiled (or found in Triton's cache)
while the check ran is recorded through Triton's compilation listener
(`triton.knobs.compilation.listener`), and the metadata and binary of each are shipped:
what Triton reads back on a cache hit (as its `store_binary_only` caches hold). Kernels
compiled in Inductor's worker processes are not seen here; their graphs' entries bundle
them. A load writes the kernels Triton's cache lacks through Triton's own cache manager,
before anything is lowered; the artifact's environment check (kernel_cache.usable)
covers these too, and Triton's cache key (source, target, options, versions) decides
whether each is ever read.
"""

from __future__ import annotations

import contextlib
import io
import os
import zipfile

MEMBER = "kernels/triton_kernels.zip"
# The files of a compiled kernel that a cache hit reads: its metadata and its binary
# (cubin on CUDA, hsaco on ROCm); the intermediate IRs are for debugging.
_KEPT_SUFFIXES = (".json", ".cubin", ".hsaco")


@contextlib.contextmanager
def recording():
    """{cache directory name: {file name: path}} of every kernel Triton compiled or
    found in its cache in this process inside the block (empty without Triton)."""
    groups: dict[str, dict[str, str]] = {}
    try:
        from triton import knobs
    except ImportError:
        yield groups
        return
    previous = knobs.compilation.listener

    def listener(*, src, metadata, metadata_group, times, cache_hit):
        paths = {name: path for name, path in metadata_group.items() if name.endswith(_KEPT_SUFFIXES)}
        if paths:
            groups[os.path.basename(os.path.dirname(next(iter(paths.values()))))] = paths
        if previous is not None:
            previous(src=src, metadata=metadata, metadata_group=metadata_group, times=times, cache_hit=cache_hit)

    knobs.compilation.listener = listener
    try:
        yield groups
    finally:
        knobs.compilation.listener = previous


def pack(groups: dict[str, dict[str, str]]) -> tuple[bytes | None, int]:
    """(a zip of DIR/FILE entries, how many kernels) of the recorded kernels whose files
    are all still there; (None, 0) when none is."""
    buffer, count = io.BytesIO(), 0
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key in sorted(groups):
            paths = groups[key]
            if not _one_metadata(paths) or not all(os.path.isfile(p) for p in paths.values()):
                continue
            for name in sorted(paths):
                archive.write(paths[name], f"{key}/{name}")
            count += 1
    return (buffer.getvalue(), count) if count else (None, 0)


def install(data: bytes) -> int:
    """Write the packed kernels that this machine's Triton cache lacks into it, through
    Triton's cache manager (the one `TRITON_CACHE_MANAGER` names, else its file cache);
    how many were written."""
    from triton import knobs
    from triton.runtime.cache import FileCacheManager

    manager_class = knobs.cache.manager_class or FileCacheManager
    kernels: dict[str, dict[str, bytes]] = {}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for entry in archive.namelist():
            key, _, name = entry.partition("/")
            kernels.setdefault(key, {})[name] = archive.read(entry)
    written = 0
    for key, files in sorted(kernels.items()):
        metadata = _one_metadata(files)
        if metadata is None:
            continue
        manager = manager_class(key)
        if (manager.get_group(metadata) or {}).get(metadata):
            continue  # already cached here
        paths = {name: manager.put(content, name) for name, content in files.items()}
        manager.put_group(metadata, paths)  # last: the group is what makes it a hit
        written += 1
    return written


def _one_metadata(files) -> str | None:
    """The name of a kernel's metadata file (its group is filed under it)."""
    names = [name for name in files if name.endswith(".json")]
    return names[0] if len(names) == 1 else None
