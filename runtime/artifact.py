"""The `.optc` file: torch.export programs plus the optc manifest, in one zip.

Layout (a zip with stored members; the programs are PT2 archives, already compact):

    manifest.json            format and tool versions, target, config and its hash,
                             passes, quality, model, creation date, and a sha256,
                             size and per-chunk sha256s for every other member
                             (runtime/member_read.py)
    programs/<name>.pt2      one torch.export.save archive per program
                             ("forward", or "prefill" and "decode")
    weights/parameters.bin   the programs' dense parameters, one after another
                             (runtime/weights_blob.py; the manifest says where)
    <anything else>          extra files: kernels/<name>.py, extra/<name>.json ...

The manifest is written last and lists every other member, so a reader can refuse an
artifact that was truncated, tampered with or built by other versions before it
unpickles anything. Writes are atomic: a failed write never leaves a half file at the
destination nor clobbers an existing artifact.
"""

from __future__ import annotations

import copy
import io
import json
import re
import threading
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

from optc.compiler.codegen.aoti_probe import triton_version
from optc.compiler.config import config_hash  # noqa: F401 (re-exported)
from optc.compiler.torch_private import (export_load_schema_converters, export_load_stand_ins_quiet,
                                        export_load_sympify_cached, export_load_type_hints_cached)
from optc.errors import ArtifactError, UsageError
from optc.fileio import atomic_open  # noqa: F401 (re-exported)
from optc.runtime import load_aside, member_read
from optc.runtime.shared_weights import restore_shared, strip_shared
from optc.runtime.weights_blob import BLOB_MEMBER, Blob, strip_to_blob

FORMAT_VERSION = 3  # 2: shared weights stored once (shared_weights.py); 3: parameters in one member (weights_blob.py)
READABLE_FORMATS = (1, 2, 3)
MANIFEST_NAME = "manifest.json"
PROGRAM_DIR = "programs/"
PROGRAM_SUFFIX = ".pt2"

_PROGRAM_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_RECOMPILE = "recompile the model with `optc compile`"
# Keys write_artifact owns; anything the caller passes for them is replaced.
_FILLED_KEYS = ("format_version", "optc_version", "torch_version", "triton_version",
                "created", "files", "shared_weights", "weights_blob")
_DEFAULTS = {"target": None, "config": {}, "passes": [], "quality": None, "model": {}}


class LoadedArtifact(NamedTuple):
    """What read_artifact returns; unpacks as (programs, manifest, extra_files)."""

    programs: dict
    manifest: dict
    extra_files: dict


def _optc_version() -> str:
    from optc.version import __version__

    return __version__


def _release(version: str) -> tuple[int, ...] | None:
    """major.minor.patch of a version string, ignoring local (+cpu) and dev suffixes."""
    m = re.match(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?", str(version))
    if not m:
        return None
    return tuple(int(g) if g is not None else 0 for g in m.groups())


def program_member(name: str) -> str:
    return f"{PROGRAM_DIR}{name}{PROGRAM_SUFFIX}"


def _check_member_name(name: str) -> None:
    bad = (not isinstance(name, str) or not name or name.startswith("/") or "\\" in name
           or any(part in ("", ".", "..") for part in name.split("/")))
    if bad:
        raise UsageError(f"extra file name {name!r} is not a safe relative path inside the artifact")
    if name in (MANIFEST_NAME, BLOB_MEMBER) or name.startswith(PROGRAM_DIR):
        raise UsageError(
            f"extra file name {name!r} is reserved ({MANIFEST_NAME}, {BLOB_MEMBER} and {PROGRAM_DIR}* "
            "belong to optc); put extra files under kernels/ or extra/")


# --------------------------------------------------------------------------- writing


def _listed_members(manifest: dict) -> list[str]:
    """The members the manifest says the file carries: the kernel cache (and its Triton
    kernels) and each package."""
    def record(value) -> dict:
        return value if isinstance(value, dict) else {}

    cache = record(manifest.get("kernel_cache"))
    listed = [cache.get("member"), record(cache.get("triton_kernels")).get("member")]
    listed += [record(rec).get("member") for rec in record(record(manifest.get("packages")).get("programs")).values()]
    return [m for m in listed if isinstance(m, str)]


def _check_listed_members(manifest: dict, extra_files: dict) -> None:
    """Refuse to write an artifact whose manifest lists compiled code it lacks: every load
    of it would be refused (the manifest was passed without its extra files)."""
    missing = [m for m in _listed_members(manifest) if m not in extra_files]
    if missing:
        raise UsageError(f"the manifest lists {', '.join(map(repr, missing))} but no such extra file was given; "
                         "pass the files the manifest lists (nothing was written)")


def write_artifact(path, programs: dict, manifest: dict, extra_files: dict | None = None) -> Path:
    """Write an .optc artifact atomically and return its path.

    `programs` maps a name ("forward", "prefill", "decode") to an ExportedProgram;
    `manifest` holds target, config, passes, quality and model (missing keys get
    empty defaults); versions, checksums, format_version, config_hash and the creation
    date are filled in here. `extra_files` maps member names (e.g. "kernels/x.py") to
    bytes. The file appears at `path` only once complete and fsynced; on any failure
    the temporary file is removed and whatever was at `path` is left untouched.
    """
    import torch

    path = Path(path)
    if not programs:
        raise UsageError("an artifact needs at least one program (e.g. 'forward')")
    for name in programs:
        if not isinstance(name, str) or not _PROGRAM_NAME.match(name):
            raise UsageError(f"program name {name!r} must be letters, digits, '_', '.' or '-'")
    extra_files = dict(extra_files or {})
    for name, data in extra_files.items():
        _check_member_name(name)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise UsageError(f"extra file {name!r} must be bytes, got {type(data).__name__}")
    _check_listed_members(manifest, extra_files)

    man = {k: copy.deepcopy(v) for k, v in manifest.items() if k not in _FILLED_KEYS}
    for key, default in _DEFAULTS.items():
        man.setdefault(key, copy.deepcopy(default))
    man["config_hash"] = config_hash(man["config"] or {})
    man.update(
        format_version=FORMAT_VERSION,
        optc_version=_optc_version(),
        torch_version=torch.__version__,
        triton_version=triton_version(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    try:  # fail before touching the disk if the caller's manifest cannot be stored
        json.dumps(man, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise UsageError(f"artifact manifest is not JSON-serialisable: {e}") from e

    files: dict[str, dict] = {}
    with atomic_open(path, "wb") as fh:
        with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            def add(member: str, data) -> None:
                files[member] = member_read.record(data)
                zf.writestr(_zipinfo(member), data)

            stored, man["shared_weights"] = strip_shared(programs)
            stored, man["weights_blob"], blob = strip_to_blob(stored)
            if blob is not None:
                add(BLOB_MEMBER, blob)
                del blob
            for name, ep in stored.items():
                # torch.export.save wants a seekable buffer (it warns otherwise).
                buf = io.BytesIO()
                torch.export.save(ep, buf)
                add(program_member(name), buf.getvalue())
                del buf
            for name, data in extra_files.items():
                add(name, bytes(data))
            # Last, so that it can list every other member.
            man["files"] = files
            text = json.dumps(man, indent=2, sort_keys=True, allow_nan=False)
            zf.writestr(_zipinfo(MANIFEST_NAME), text.encode("utf-8"))
    return path


def _zipinfo(member: str) -> zipfile.ZipInfo:
    # Fixed timestamp: the manifest carries the creation date, and identical inputs
    # then give byte-identical members.
    info = zipfile.ZipInfo(member, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info


# --------------------------------------------------------------------------- reading


def _open_zip(path: Path) -> zipfile.ZipFile:
    if not path.exists():
        raise ArtifactError(f"artifact {path} does not exist; check the path or create it "
                            "with `optc compile MODEL -o FILE.optc`")
    if not path.is_file():
        raise ArtifactError(f"artifact {path} is not a file")
    try:
        return zipfile.ZipFile(path, "r")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as e:
        raise ArtifactError(
            f"{path} is not a valid .optc artifact: it is not a zip archive or it is "
            f"truncated ({e}); copy it again or {_RECOMPILE}") from e


def _read_member(zf: zipfile.ZipFile, path: Path, member: str, entry: dict | None = None) -> bytes:
    try:
        return member_read.read(zf, member, entry or {})
    except KeyError as e:
        raise ArtifactError(f"artifact {path} lacks member {member!r} that its manifest "
                            f"lists; the file is damaged: copy it again or {_RECOMPILE}") from e
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        # A flipped byte in a member read through zipfile trips its CRC-32 before our sha256.
        raise ArtifactError(f"artifact {path} is damaged: member {member!r} cannot be read "
                            f"({e}); copy it again or {_RECOMPILE}") from e


def _validate_manifest(man, path: Path, names: set[str], infos: dict) -> dict:
    if not isinstance(man, dict):
        raise ArtifactError(f"artifact {path}: {MANIFEST_NAME} is not a JSON object")
    fv = man.get("format_version")
    if fv not in READABLE_FORMATS:
        raise ArtifactError(
            f"artifact {path} has format_version {fv!r}, but this optc "
            f"({_optc_version()}) reads formats {', '.join(map(str, READABLE_FORMATS))}; use the optc that wrote "
            f"it, or {_RECOMPILE}")
    missing = [k for k in ("optc_version", "torch_version", "files") if k not in man]
    if missing:
        raise ArtifactError(f"artifact {path}: manifest lacks {', '.join(missing)}; {_RECOMPILE}")
    files = man["files"]
    if not isinstance(files, dict) or not all(
            isinstance(v, dict) and "sha256" in v and "size" in v for v in files.values()):
        raise ArtifactError(f"artifact {path}: manifest 'files' is malformed; {_RECOMPILE}")
    for member, entry in files.items():
        if member not in names:
            raise ArtifactError(f"artifact {path} lacks member {member!r} that its manifest "
                                f"lists; the file is damaged: copy it again or {_RECOMPILE}")
        if infos[member].file_size != entry["size"]:
            raise ArtifactError(
                f"artifact {path}: member {member!r} has size {infos[member].file_size}, "
                f"the manifest says {entry['size']}; the file was modified: {_RECOMPILE}")
    extra = sorted(names - set(files) - {MANIFEST_NAME})
    if extra:
        raise ArtifactError(f"artifact {path} holds members its manifest does not list "
                            f"({', '.join(extra)}); the file was modified: {_RECOMPILE}")
    if not any(m.startswith(PROGRAM_DIR) for m in files):
        raise ArtifactError(f"artifact {path} holds no program; {_RECOMPILE}")
    return man


def _read_manifest_from(zf: zipfile.ZipFile, path: Path) -> dict:
    infos = {i.filename: i for i in zf.infolist()}
    if MANIFEST_NAME not in infos:
        raise ArtifactError(f"{path} is a zip but not an .optc artifact: it has no "
                            f"{MANIFEST_NAME}; {_RECOMPILE}")
    raw = _read_member(zf, path, MANIFEST_NAME)
    try:
        man = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"artifact {path}: {MANIFEST_NAME} is not valid JSON ({e}); "
                            f"{_RECOMPILE}") from e
    return _validate_manifest(man, path, set(infos), infos)


def read_manifest(path) -> dict:
    """Validate the zip and the manifest (no checksums, no unpickling) and return it."""
    path = Path(path)
    with _open_zip(path) as zf:
        return _read_manifest_from(zf, path)


def read_members(path, names_of) -> tuple[dict, dict]:
    """The manifest and the members `names_of(manifest)` lists, each checked against the
    manifest's record, without reading the rest (the programs, the weights)."""
    path = Path(path)
    with _open_zip(path) as zf:
        man = _read_manifest_from(zf, path)
        return man, {m: bytes(_read_checked(zf, path, m, man["files"].get(m))) for m in names_of(man)}


def verify_versions(manifest: dict, path="artifact") -> None:
    """Refuse an artifact built by another torch (major.minor.patch) or optc version."""
    import torch

    built, running = manifest.get("torch_version"), torch.__version__
    if _release(built) is None or _release(built) != _release(running):
        raise ArtifactError(
            f"{path} was compiled with torch {built}, but this environment runs torch "
            f"{running}; torch.export programs are not portable across torch versions: "
            f"{_RECOMPILE} here (or install torch {built})")
    built_optc, running_optc = manifest.get("optc_version"), _optc_version()
    if built_optc != running_optc:
        raise ArtifactError(
            f"{path} was compiled with optc {built_optc}, but this is optc {running_optc}; "
            f"{_RECOMPILE} (or install optc {built_optc})")


def read_artifact(path, *, check_versions: bool = True, compile_workers: bool = False) -> LoadedArtifact:
    """Read and verify an artifact: (programs, manifest, extra_files).

    Checks, in order: the file exists and is a complete zip, the manifest is present
    and of a known format, the versions match the running torch and optc (unless
    `check_versions=False`), every member's sha256 matches the manifest; then loads
    each program with torch.export.load, while the weights member is read and checked
    on a thread (their bytes reach the programs only after that check). `compile_workers`: the programs are about to be
    lowered here, so where they are for a GPU and this machine has one, Inductor's
    compile workers start while the artifact is read (torch_private.warm_compile_workers).
    """
    path = Path(path)
    with _open_zip(path) as zf:
        man = _read_manifest_from(zf, path)
        if check_versions:
            verify_versions(man, path)
        refused = threading.Event()  # a refusal before the thread got to the workers: none start
        importing = load_aside.import_deserialiser_aside(compile_workers and load_aside.for_a_gpu(man), refused)
        try:
            contents = {m: _read_checked(zf, path, m, e) for m, e in man["files"].items() if m != BLOB_MEMBER}
        except BaseException:
            refused.set()
            raise
        finally:
            importing.join()  # no import left running behind a refusal, into the exit
        # The weights (most of the file) are read and checked in a thread while the programs
        # are deserialised: reading and hashing let go of the GIL, deserialising holds it.
        with ThreadPoolExecutor(1, thread_name_prefix="optc-weights") as pool:
            weights = pool.submit(_read_checked, zf, path, BLOB_MEMBER, man["files"].get(BLOB_MEMBER))
            programs, extra = _load_programs(path, man, contents)
            blob = Blob(man.get("weights_blob"), weights.result(), path)
    for name, program in programs.items():
        blob.restore(name, program)
    blob.check_restored()
    restore_shared(programs, man.get("shared_weights"), path)
    return LoadedArtifact(programs, man, extra)


def _read_checked(zf: zipfile.ZipFile, path: Path, member: str, entry: dict | None) -> bytes:
    """A member's bytes, checked against the manifest's record (b"" for a member it lacks)."""
    if entry is None:
        return b""
    data = _read_member(zf, path, member, entry)
    found = member_read.mismatch(data, entry)
    if found is not None:
        raise ArtifactError(f"artifact {path}: checksum mismatch in member {member!r} ({found}); the "
                            f"file was modified or damaged: copy it again or {_RECOMPILE}")
    return data


def _load_programs(path: Path, man: dict, contents: dict) -> tuple[dict, dict]:
    """({program name: ExportedProgram}, {other member: bytes}) of the members read."""
    programs, extra = {}, {}
    # One cache of each for every program.
    with export_load_type_hints_cached(), export_load_sympify_cached(), export_load_schema_converters(), \
            export_load_stand_ins_quiet():
        for member, data in contents.items():
            if member.startswith(PROGRAM_DIR) and member.endswith(PROGRAM_SUFFIX):
                name = member[len(PROGRAM_DIR):-len(PROGRAM_SUFFIX)]
                programs[name] = _load_program(path, name, data, man)
            else:
                extra[member] = bytes(data)  # as written: torch's cache loaders take bytes only
    return programs, extra


def _load_program(path, name: str, data: bytes, man: dict):
    import torch

    try:
        with warnings.catch_warnings():
            # torch 2.11 builds weights with torch.frombuffer over the archive's private
            # bytes and warns they are not writable; nothing else holds those bytes, so
            # in-place updates (KV caches) are safe.
            warnings.filterwarnings("ignore", message=".*buffer is not writable.*")
            return torch.export.load(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot load"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ArtifactError(
            f"artifact {path}: program {name!r} cannot be loaded by torch "
            f"{torch.__version__} ({type(e).__name__}: {first}); it was built with "
            f"torch {man.get('torch_version')}: {_RECOMPILE}") from e
