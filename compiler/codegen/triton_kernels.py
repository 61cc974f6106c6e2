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

Beside the kernels, the host-side modules Triton builds with the C compiler: the launcher
of each kernel (`__triton_launcher`: its C source follows the kernel's signature and
constants), built or read at the kernel's first launch, and the driver's `cuda_utils`
where Triton's driver starts inside the recording; recorded through Triton's cache
manager as they are built or read. Inductor launches its kernels without them (its static
launcher) except where a kernel sets a launch attribute (programmatic dependent launch,
`triton.enable_pdl`) or is a user-defined kernel (optc's decode attention), and each one
a fresh machine builds costs a compiler run (about 0.1 s; benchmarks/NOTES.md, "the load
since PDL"). A module is found by its cache key, a hash of its C source and the platform,
and its file name carries the Python ABI, so a module is only read where it was built for.

Not seen: kernels compiled in Inductor's worker processes. Those of a fresh compile are
bundled in the FX graph entries; a configuration a worker compiled from a choice
already in the autotune cache (a compile over a warm cache) is in neither, and a load
compiles it as before.

A load writes the kernels Triton's cache lacks through Triton's own cache manager,
before anything is lowered, into the directory Inductor's kernels will read
(torch_private.inductor_triton_cache_dir); the artifact's environment check
(kernel_cache.usable) covers these too, and Triton's cache key (source, target,
options, versions, the ptxas version: torch_private.use_inductors_ptxas makes a compile
and its load assemble with one) decides whether each is ever read.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import sysconfig
import zipfile

MEMBER = "kernels/triton_kernels.zip"
# The files of a compiled kernel that a cache hit reads: its metadata and its binary
# (cubin on CUDA, hsaco on ROCm); the intermediate IRs are for debugging.
_BINARY_SUFFIXES = (".cubin", ".hsaco")
_KEPT_SUFFIXES = (".json", *_BINARY_SUFFIXES)
_KEY = re.compile(r"[A-Z2-7]+")  # Triton's cache keys: the base32 of a sha256
# Compiled host modules (launchers, the driver's utilities): Python extensions.
_MODULE_SUFFIX = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
_MODULES = "modules"  # their directory in the packed zip: modules/KEY/NAME


@contextlib.contextmanager
def recording():
    """{Triton's cache key: {file name: path}} of every kernel Triton compiled or found
    in its cache in this process inside the block, and of every host module it built or
    read (empty without Triton)."""
    groups: dict[str, dict[str, str]] = {}
    try:
        from triton import knobs
        from triton.runtime.cache import FileCacheManager
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

    # A knob set in this process (not through the environment) is held in its group's
    # instance dict; one that was not is unset again on the way out.
    manager_was_set = "manager_class" in vars(knobs.cache)
    try:
        previous_manager = knobs.cache.manager_class
    except Exception:  # noqa: BLE001 - a TRITON_CACHE_MANAGER that does not import: Triton reports it when used
        previous_manager = recorder = None
    else:
        recorder = _module_recorder(previous_manager or FileCacheManager, groups)
    knobs.compilation.listener = listener
    if recorder is not None:
        knobs.cache.manager_class = recorder
    try:
        yield groups
    finally:
        knobs.compilation.listener = previous
        if recorder is not None and manager_was_set:
            knobs.cache.manager_class = previous_manager
        elif recorder is not None:
            del knobs.cache.manager_class


def _module_recorder(base, groups: dict):
    """`base` (a Triton cache manager class) that also records, into `groups`, each host
    module it hands out or stores."""

    class ModuleRecorder(base):
        def get_file(self, filename):
            path = super().get_file(filename)
            self._note(filename, path)
            return path

        def put(self, data, filename, binary=True):
            path = super().put(data, filename, binary)
            self._note(filename, path)
            return path

        def _note(self, filename, path):
            if path and filename.endswith(_MODULE_SUFFIX) and isinstance(getattr(self, "key", None), str):
                groups.setdefault(self.key, {})[filename] = path

    return ModuleRecorder


def pack(groups: dict[str, dict[str, str]]) -> tuple[bytes | None, int]:
    """(a zip of KEY/FILE entries for kernels and modules/KEY/FILE for host modules, how
    many kernels) of the recorded groups whose files are all still there; (None, 0) when
    there is nothing to ship. Modules travel without kernels too: the launchers of kernels
    compiled in Inductor's workers are built in this process, where they are recorded."""
    buffer, count, modules = io.BytesIO(), 0, 0
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key in sorted(groups):
            paths = groups[key]
            if not all(os.path.isfile(p) for p in paths.values()):
                continue
            if _is_module(paths):
                for name in sorted(paths):
                    archive.write(paths[name], f"{_MODULES}/{key}/{name}")
                modules += 1
            elif _metadata_of(paths) is not None:
                for name in sorted(paths):
                    archive.write(paths[name], f"{key}/{name}")
                count += 1
    return (buffer.getvalue(), count) if count or modules else (None, 0)


def install(data: bytes, device_index: int = 0) -> int:
    """Write the packed kernels (and host modules) that this machine's Triton cache lacks
    into it, through Triton's cache manager (the one `TRITON_CACHE_MANAGER` names, else
    its file cache); how many kernels were written. The cache is the one Inductor's
    kernels for `device_index` read: TRITON_CACHE_DIR, which is set to Inductor's
    directory where it is unset, as Inductor's first kernel would set it."""
    from triton import knobs
    from triton.runtime.cache import FileCacheManager

    from optc.compiler.torch_private import inductor_triton_cache_dir

    os.environ.setdefault("TRITON_CACHE_DIR", inductor_triton_cache_dir(device_index))
    manager_class = knobs.cache.manager_class or FileCacheManager
    kernels: dict[str, dict[str, bytes]] = {}
    modules: dict[str, dict[str, bytes]] = {}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for entry in archive.namelist():
            key, _, name = entry.partition("/")
            found = kernels
            if key == _MODULES:
                key, _, name = name.partition("/")
                found = modules
            if _KEY.fullmatch(key) and name and name == os.path.basename(name):
                found.setdefault(key, {})[name] = archive.read(entry)
    for key, files in sorted(modules.items()):
        manager = manager_class(key)
        for name, content in files.items():
            if name.endswith(_MODULE_SUFFIX) and manager.get_file(name) is None:
                manager.put(content, name, binary=True)
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


def _is_module(files) -> bool:
    """Whether a recorded group is a host module built for this Python."""
    return bool(files) and all(name.endswith(_MODULE_SUFFIX) for name in files)


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
