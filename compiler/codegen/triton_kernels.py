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
what Triton reads back on a cache hit (as its `store_binary_only` caches hold).

Not seen: kernels compiled in Inductor's worker processes. Those of a fresh compile are
bundled in the FX graph entries; a configuration a worker compiled from a choice
already in the autotune cache (a compile over a warm cache) is in neither, and a load
compiles it as before.

A load writes the kernels Triton's cache lacks through Triton's own cache manager,
before anything is lowered, into the directory Inductor's kernels will read
(torch_private.inductor_triton_cache_dir); the artifact's environment check
(kernel_cache.usable) covers these too, and Triton's cache key (source, target,
options, versions) decides whether each is ever read.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import zipfile

MEMBER = "kernels/triton_kernels.zip"
# The files of a compiled kernel that a cache hit reads: its metadata and its binary
# (cubin on CUDA, hsaco on ROCm); the intermediate IRs are for debugging.
_BINARY_SUFFIXES = (".cubin", ".hsaco")
_KEPT_SUFFIXES = (".json", *_BINARY_SUFFIXES)
_KEY = re.compile(r"[A-Z2-7]+")  # Triton's cache keys: the base32 of a sha256


@contextlib.contextmanager
def recording():
    """{Triton's cache key: {file name: path}} of every kernel Triton compiled or found
    in its cache in this process inside the block (empty without Triton)."""
    groups: dict[str, dict[str, str]] = {}
    try:
        from triton import knobs
    except ImportError:
        yield groups
        return
    previous = knobs.compilation.listener

    def listener(*, src, metadata, metadata_group, times, cache_hit):
        paths = {name: path for name, path in metadata_group.items() if name.endswith(_KEPT_SUFFIXES)}
        key = _cache_key(metadata.get("hash"))
        if paths and key:
            groups[key] = paths
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
            if _metadata_of(paths) is None or not all(os.path.isfile(p) for p in paths.values()):
                continue
            for name in sorted(paths):
                archive.write(paths[name], f"{key}/{name}")
            count += 1
    return (buffer.getvalue(), count) if count else (None, 0)


def install(data: bytes, device_index: int = 0) -> int:
    """Write the packed kernels that this machine's Triton cache lacks into it, through
    Triton's cache manager (the one `TRITON_CACHE_MANAGER` names, else its file cache);
    how many were written. The cache is the one Inductor's kernels for `device_index`
    read: TRITON_CACHE_DIR, which is set to Inductor's directory where it is unset, as
    Inductor's first kernel would set it."""
    from triton import knobs
    from triton.runtime.cache import FileCacheManager

    from optc.compiler.torch_private import inductor_triton_cache_dir

    os.environ.setdefault("TRITON_CACHE_DIR", inductor_triton_cache_dir(device_index))
    manager_class = knobs.cache.manager_class or FileCacheManager
    kernels: dict[str, dict[str, bytes]] = {}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for entry in archive.namelist():
            key, _, name = entry.partition("/")
            if _KEY.fullmatch(key) and name and name == os.path.basename(name):
                kernels.setdefault(key, {})[name] = archive.read(entry)
    written = 0
    for key, files in sorted(kernels.items()):
        metadata = _metadata_of(files)
        if metadata is None:
            continue
        manager = manager_class(key)
        if (manager.get_group(metadata) or {}).get(metadata):
            continue  # already cached here
        paths = {name: manager.put(content, name) for name, content in files.items()}
        manager.put_group(metadata, paths)  # last: the group is what makes it a hit
        written += 1
    return written


def _metadata_of(files) -> str | None:
    """The name of a kernel's metadata file (its group is filed under it), where its
    files are what a cache hit reads (one metadata file and a binary); else None."""
    names = [name for name in files if name.endswith(".json")]
    has_binary = any(name.endswith(_BINARY_SUFFIXES) for name in files)
    return names[0] if len(names) == 1 and has_binary else None


def _cache_key(kernel_hash) -> str | None:
    """The cache key Triton files a compiled kernel under: the base32 of its hash
    (`triton.runtime.cache.get_cache_manager`)."""
    if not isinstance(kernel_hash, str):
        return None
    try:
        return base64.b32encode(bytes.fromhex(kernel_hash)).decode("utf-8").rstrip("=")
    except ValueError:
        return None
