"""The compiled code of the lowering a compile verified, carried in the artifact, so that
a load on the same target and environment runs those kernels instead of compiling and
tuning its own.

What it holds: `torch.compiler.save_cache_artifacts()` taken right after the
compile-time check lowered and ran every program with the options a load uses
(lowering.load_lowering) and the FX graph cache on: Inductor's FX graph cache entries
(the generated code, with the compiled Triton kernels bundled in), AOTAutograd's
entries, and the kernel configurations that coordinate descent chose while the check
ran (the autotune cache). `torch.compiler.load_cache_artifacts` writes them into this
machine's Inductor caches; the lowering then finds each program there, so it runs the
verified kernels with the configurations chosen at compile time, without generating
code or tuning again (issue: a decode step whose tuning differs from one process to
the next decodes at a different speed). Beside them, the Triton kernels this process
compiled while the check ran (triton_kernels.py: configurations chosen after the FX
graph entry was written), so a fresh machine does not compile those at load either.

When a load uses it: the manifest's record names the environment it was built in
(aoti_probe.environment: the target, torch and triton builds, CUDA, the GPU model or
the CPU's vector ISA) and the digest of optc's op sources its keys carry
(sources_tag), and a load anywhere else lowers the portable programs as before, with a
warning saying why. Bytes that do not hash to the recorded sha256 are refused
(ArtifactError, exit 2), as for packages: the file was changed after it was written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from dataclasses import dataclass, field

import torch

from optc.compiler.targets import LOWERING_FIELDS, Target
from optc.errors import ArtifactError
from optc.fileio import check_member_hash

MEMBER = "kernels/inductor_cache.bin"
FORMAT = "inductor-cache-artifacts"
_RECOMPILE = "recompile the model with `optc compile`"


@dataclass
class Recording:
    """What `recording()` collected: the serialised entries (None: nothing was
    cacheable) and how many of each kind, and the Triton kernels this process compiled
    meanwhile (triton_kernels.recording)."""

    data: bytes | None = None
    counts: dict = field(default_factory=dict)
    triton: dict = field(default_factory=dict)


@contextlib.contextmanager
def recording():
    """Collect the cache entries of every lowering compiled or run inside (and nothing
    the process compiled before)."""
    from optc.compiler.codegen import triton_kernels
    from optc.compiler.torch_private import fresh_cache_artifacts

    rec = Recording()
    with fresh_cache_artifacts(), triton_kernels.recording() as rec.triton:
        yield rec
        saved = torch.compiler.save_cache_artifacts()
    if saved is not None:
        rec.data, info = saved
        rec.counts = _counts(info)


def package(rec: Recording, target: Target, programs: list[str]) -> tuple[dict, dict]:
    """({member: bytes}, the manifest's "kernel_cache" record) for a recording."""
    from optc.compiler.codegen import triton_kernels
    from optc.compiler.codegen.aoti_probe import environment
    from optc.compiler.codegen.sources_tag import optc_tag

    if rec.data is None:
        return {}, {"format": FORMAT, "skipped": "Inductor recorded no cache entries for these programs"}
    files = {MEMBER: rec.data}
    record = {
        "format": FORMAT, "member": MEMBER, "sha256": hashlib.sha256(rec.data).hexdigest(),
        "bytes": len(rec.data), "entries": rec.counts, "programs": sorted(programs),
        "environment": environment(target), "sources_tag": optc_tag(),
    }
    kernels, count = triton_kernels.pack(rec.triton)
    if kernels is not None:
        files[triton_kernels.MEMBER] = kernels
        record["triton_kernels"] = {"member": triton_kernels.MEMBER, "sha256": hashlib.sha256(kernels).hexdigest(),
                                    "bytes": len(kernels), "kernels": count}
    return files, record


def _parts(manifest: dict) -> list[dict]:
    """The records of the kernel cache's members: its entries and its Triton kernels."""
    rec = manifest.get("kernel_cache") or {}
    return [part for part in (rec, rec.get("triton_kernels") or {}) if "member" in part]


def members(manifest: dict) -> list[str]:
    """The artifact members the kernel cache is made of (none where it carries none)."""
    return [part["member"] for part in _parts(manifest)]


def check_hash(manifest: dict, extra_files: dict, files: dict | None = None) -> None:
    """Refuse (ArtifactError, exit 2) a kernel cache whose bytes are missing or do not
    hash to what the manifest recorded: checked at load, before anything could run.
    `files`: the record the bytes were checked against as they were read (check_member_hash)."""
    for part in _parts(manifest):
        check_member_hash(extra_files, part["member"], part.get("sha256"), f"the kernel cache {part['member']!r}",
                          _RECOMPILE, files)


def usable(manifest: dict, extra_files: dict, target: Target) -> tuple[bytes | None, str | None]:
    """(bytes, None) when the artifact's kernel cache was built for `target` in this
    environment; (None, reason) when the portable programs must be lowered here
    instead (reason None: the artifact carries none, nothing to say)."""
    from optc.compiler.codegen.aoti_probe import environment
    from optc.compiler.codegen.sources_tag import optc_tag

    rec = manifest.get("kernel_cache") or {}
    if "member" not in rec:
        return None, None
    from optc.compiler.codegen.lowering import DYNAMO

    # The cache's keys are the graphs the check's frontend handed Inductor (the manifest's
    # lowering record; one without a frontend was made when every program went through Dynamo).
    checked = (manifest.get("lowering") or {}).get("check") or {}
    recorded = {p: (checked.get(p) or {}).get("frontend", DYNAMO) for p in rec.get("programs") or []}
    moved = [p for p, used in recorded.items() if used != _frontend(target, p)]
    if moved:
        return None, (f"its kernel cache holds the graphs that {recorded[moved[0]]!r} handed "
                      f"Inductor for {', '.join(moved)}, where this optc lowers through "
                      f"{_frontend(target, moved[0])!r} (lowering.frontend); recompile the model to carry "
                      "one it can use")
    changed = _options_changed(manifest, target, list(recorded))
    if changed:
        return None, (f"its kernel cache was compiled with other Inductor options or graph rewrites for "
                      f"{changed[0]} than this optc lowers it with ({changed[1]}); recompile the model to carry "
                      "one it can use")
    if rec.get("sources_tag") != optc_tag():
        # Inductor would not find a single entry: their keys carry the tag they were written under.
        return None, (f"its kernel cache was keyed to optc's op sources {rec.get('sources_tag')!r}, this optc's are "
                      f"{optc_tag()!r} (codegen/sources_tag); recompile the model to carry one it can use")
    built, here = rec.get("environment") or {}, environment(target)
    if built.get("target") != target.name:
        return None, f"its kernel cache was built for {built.get('target')}, this is {target.name}"
    differ = [f"{k} {built.get(k)!r} there, {here.get(k)!r} here" for k in sorted(set(built) | set(here))
              if k != "target" and built.get(k) != here.get(k)]
    if differ:
        return None, "its kernel cache was built in another environment: " + "; ".join(differ)
    check_hash({"kernel_cache": rec}, extra_files)  # again (the Triton kernels too): the bytes may be in-memory edits
    return extra_files[rec["member"]], None


def install(data: bytes) -> dict:
    """Write the entries into this machine's Inductor caches; how many of each kind."""
    info = torch.compiler.load_cache_artifacts(data)
    if info is None:
        raise ArtifactError(f"the artifact's kernel cache could not be read by torch {torch.__version__}; "
                            f"{_RECOMPILE}")
    return _counts(info)


def install_triton_kernels(manifest: dict, extra_files: dict, device_index: int = 0) -> dict:
    """Write the artifact's Triton kernels that this machine's Triton cache lacks into it
    (for a kernel cache usable() accepted): {"triton_kernels": how many were written},
    {} where it carries none. They only spare compiles, so a cache that cannot be
    written warns and the load goes on (Triton compiles those kernels itself)."""
    import warnings

    from optc.compiler.codegen import triton_kernels

    rec = (manifest.get("kernel_cache") or {}).get("triton_kernels") or {}
    if "member" not in rec:
        return {}
    try:
        return {"triton_kernels": triton_kernels.install(extra_files[rec["member"]], device_index)}
    except Exception as exc:  # noqa: BLE001  (any failure of a speed-up must not fail the load)
        warnings.warn(f"the artifact's Triton kernels could not be written into Triton's cache ({exc}); "
                      "they are compiled here instead", stacklevel=3)
        return {"triton_kernels": 0}


# What a record that does not name a rewrite (made before it existed) compares as: the
# field's default. Off for the rewrites that came in off; drop_constant_masks came on for
# every target, and refusing records without it would refuse every earlier artifact's
# cache, LMs' included, whose masks it never touches. The cache is keyed by the graph, so
# a program it does change misses its entries and compiles cold, never wrong kernels.
_ABSENT = {f.name: f.default for f in dataclasses.fields(Target) if f.name in LOWERING_FIELDS}


def _options_changed(manifest: dict, target: Target, programs: list[str]) -> tuple[str, str] | None:
    """(program, what differs) for the first program whose recorded load options are not
    the ones this optc lowers it with (a target's options changed since the compile, so
    every cache key would miss); None when all agree or the manifest records none."""
    from optc.compiler.codegen.lowering import load_lowering, lowering_record

    loads = (manifest.get("lowering") or {}).get("load") or {}
    for program in programs:
        record = loads.get(program) or {}
        if record.get("inductor_options") is None:
            continue
        lowering = {**load_lowering(target, program), "shape_tuning": record.get("shape_tuning", True)}
        full = lowering_record(target, **lowering, kernel_cache=True)
        # The Inductor options and the graph rewrites (LOWERING_FIELDS): either changes every key.
        now = {**full["inductor_options"], **{f: full[f] for f in LOWERING_FIELDS}}
        recorded = {**record["inductor_options"], **{f: record.get(f, _ABSENT[f]) for f in LOWERING_FIELDS}}
        if now != recorded:
            diff = sorted(k for k in set(now) | set(recorded) if now.get(k) != recorded.get(k))
            return program, ", ".join(f"{k}: {recorded.get(k)!r} there, {now.get(k)!r} here" for k in diff)
    return None


def _frontend(target: Target, program: str) -> str:
    """How a load lowers `program` on `target` hands its graph to Inductor."""
    from optc.compiler.codegen.lowering import frontend, load_lowering

    return frontend(load_lowering(target, program)["cudagraphs"])


def _counts(info) -> dict:
    """Entries per kind ("inductor": compiled graphs, "autotune": tuned kernel configs,
    "aot_autograd", ...) of a torch.compiler CacheInfo."""
    return {kind: len(keys) for kind, keys in sorted(info.artifacts.items())}


def hit_counts() -> dict:
    """Inductor's FX graph cache hits and misses in this process so far (a load reports
    the difference: a hit runs the kernels the compile verified)."""
    from optc.compiler.torch_private import dynamo_counters

    c = dynamo_counters()["inductor"]
    return {"hits": int(c["fxgraph_cache_hit"]), "misses": int(c["fxgraph_cache_miss"])}
