"""The Python API the CLI is built on: `optc.compile` and `optc.load`.

compile: capture -> passes (lossy ones plan on calibration data) -> re-export ->
lowering through Inductor, verified against the uncompiled programs -> optional
quality evaluation on the held-out split -> an Artifact that saves to `.optc`.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

from optc.compiler import targets
from optc.compiler.capture import PREFILL_LEN
from optc.compiler.session import CompileSession
from optc.errors import UsageError
from optc.runtime.loaded import Artifact


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def compile(
    model: torch.nn.Module,
    example_inputs: tuple,
    *,
    target: str = "auto",
    pipeline_name: str = "default",
    passes: dict | None = None,
    calibration: list | None = None,
    evaluation: list | None = None,
    entry=None,
    max_cache_len: int = 256,
    dynamic: tuple[str, ...] = (),
    prefill_len: int = PREFILL_LEN,
    verify: bool = True,
    evaluate: bool = False,
    package: str = "none",
    log=_log,
) -> Artifact:
    """Compile `model` for `target` with the pipeline's passes.

    passes: {"skip_layers.count": 2} or {"skip_layers": {"count": 2}}.
    calibration / evaluation: lists of input tuples like `example_inputs` (token ids
    for LMs); a zoo `entry` supplies both from its data splits when they are None.
    evaluate: measure quality before/after on the evaluation data (held out); for an LM
        also through its decode program token by token (quality["decode"]).
    package: "aoti" compiles every program into an AOTInductor package for the target
        (verified like the lowering when `verify`), which the artifact carries so that a
        load on the same target and versions runs it without Inductor; "none" (the API's
        default: in-process callers lower anyway) ships the portable programs only.
    prefill_len: a decoder's prefill program is checked and lowered at this many tokens,
        and a loaded artifact runs prompts through it in chunks of that length.
    A search compiles many configurations of one model: use `CompileSession` directly.
    """
    targets.get(target)  # an unknown target is refused before the capture
    check_package(package)  # before the compile, not after it
    session = CompileSession(model, example_inputs, target=target, entry=entry, calibration=calibration,
                             evaluation=evaluation, max_cache_len=max_cache_len, dynamic=dynamic,
                             prefill_len=prefill_len, log=log)
    config = session.resolve(passes, pipeline_name)
    compiled = session.run(config, verify=verify, evaluate=evaluate, estimate=True)
    return artifact_of(session, compiled, package=package, verify=verify, evaluate=evaluate, log=log)


PACKAGE_FORMATS = ("aoti", "none")


def check_package(package: str, spelled: str = "package=") -> None:
    """Refuse (UsageError, exit 2) a package format optc does not make; `spelled` is how
    the caller's user wrote the option (`--package ` for the CLI)."""
    if package not in PACKAGE_FORMATS:
        raise UsageError(f"{spelled}{package!r}: expected one of {', '.join(PACKAGE_FORMATS)}")


def artifact_of(session: CompileSession, compiled, *, package: str, verify: bool, evaluate: bool,
                log=_log) -> Artifact:
    """What a compile ships of a compiled configuration (session.run): its programs and
    kernel cache, its AOTInductor packages (`package`), and for an LM with `evaluate` the
    held-out figure through the decode loop. `optc compile` and the search's shipped
    configuration both come from here."""
    check_package(package)
    # Copies: the packages and the decode figure belong to the artifact; `compiled` stays what
    # the session ran (the search times it again beside dense).
    art = Artifact(compiled.programs, copy.deepcopy(compiled.manifest), dict(compiled.extra_files))
    _package(art, session, package, verify, log)
    if evaluate and session.is_lm:
        _decode_quality(art, session, compiled, log)
    return art


def _package(art: Artifact, session: CompileSession, package: str, verify: bool, log) -> None:
    """Adds the packages and the manifest's "packages" record (before the decode-quality
    figure, which then runs through the packages: what a load runs)."""
    import time

    from optc.compiler.codegen import aoti

    if package == "none":
        art.manifest["packages"] = {"format": "none"}
        return
    start = time.perf_counter()
    files, record = aoti.package_programs(art.programs, session.captured.example_inputs, session.target,
                                          verify=verify, log=log)
    art.extra_files.update(files)
    art.manifest["packages"] = record
    art.manifest.setdefault("timings_s", {})["packaging"] = round(time.perf_counter() - start, 3)


def _decode_quality(art: Artifact, session: CompileSession, compiled, log) -> None:
    """The held-out figure through the decode loop, beside the prefill graph's (see
    optc.runtime.decode_quality): through the lowered programs when the compile lowered
    and verified them here, else the uncompiled ones."""
    from optc.runtime.decode_quality import WINDOW_TOKENS, WINDOWS, check, decode_quality

    checked = art.manifest["verification"]
    lowered = bool(checked) and "skipped" not in checked
    log(f"[optc] evaluating quality through the {'lowered' if lowered else 'uncompiled'} decode program on "
        f"{WINDOWS} held-out windows of {WINDOW_TOKENS} tokens ...")
    quality = art.manifest["quality"]
    quality["decode"] = decode_quality(art, session.heldout().batches, reference=session.original,
                                       rewritten=compiled.primary_gm, lowered=lowered, device=str(session.device))
    check(quality["decode"])  # before anything is written: a failed compile leaves no artifact


def read_calibration(path: str | Path | None, model: torch.nn.Module, example_inputs: tuple, *,
                     entry=None) -> list | None:
    """A calibration file (`--calibration PATH`: text for causal LMs with a tokenizer, or a
    `.pt` list of input tuples) read and checked against `model`; None for no path."""
    if path is None:
        return None
    from optc.compiler.capture import is_causal_lm
    from optc.models.calibration_file import read_calibration as read

    return read(path, entry=entry, example_inputs=example_inputs, is_lm=is_causal_lm(model),
                vocab_size=getattr(getattr(model, "config", None), "vocab_size", None))


def load(path: str | Path, *, check_versions: bool = True, packages: bool = True,
         kernel_cache: bool = True) -> Artifact:
    """Load a `.optc` artifact; refuses truncated, tampered or mismatched files (exit 2).
    packages: run the AOTInductor packages the artifact carries where they fit this
    target and environment (else, with a warning, the portable programs lowered here).
    kernel_cache: lower the portable programs from the kernel cache the compile
    recorded where it fits (the verified kernels, no tuning; else, with a warning,
    Inductor compiles and tunes them here)."""
    from optc.compiler.codegen import kernel_cache as kcache
    from optc.runtime.artifact import read_artifact
    from optc.runtime.packages import check_hashes

    loaded = read_artifact(path, check_versions=check_versions, compile_workers=True)
    # read_artifact checked every member's bytes against the manifest's files record: the
    # package and kernel-cache records must name the same digests (no second hash).
    check_hashes(loaded.manifest, loaded.extra_files, loaded.manifest["files"])
    kcache.check_hash(loaded.manifest, loaded.extra_files, loaded.manifest["files"])
    return Artifact(loaded.programs, loaded.manifest, loaded.extra_files, packages=packages,
                    kernel_cache=kernel_cache)
