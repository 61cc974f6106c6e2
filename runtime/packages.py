"""Choosing, at load, between an artifact's AOTInductor package and its portable program.

A package is code compiled for one target and one environment (compiler/codegen/aoti.py:
`environment`). It runs when the manifest's record names this target and every part of
this environment equals it; otherwise the portable torch.export program is lowered by
Inductor here, with a warning that says why (another target, another torch or triton
build, another CPU instruction set or GPU). A package whose bytes do not hash to what
the manifest recorded is refused (ArtifactError, exit 2), never run nor silently
replaced: the file was modified after it was written, so nothing in it is trusted.
"""

from __future__ import annotations

import warnings

import torch

from optc.fileio import check_member_hash

_RECOMPILE = "recompile the model with `optc compile`"


def check_hashes(manifest: dict, extra_files: dict, files: dict | None = None) -> None:
    """Refuse (ArtifactError, exit 2) an artifact whose packages do not hash to what its
    manifest's "packages" record says: checked at load, before anything could run.
    `files`: the record the bytes were checked against as they were read (check_member_hash)."""
    packages = manifest.get("packages") or {}
    for name, rec in (packages.get("programs") or {}).items():
        if "skipped" not in rec:
            check_member_hash(extra_files, rec.get("member"), rec.get("sha256"), f"the package {rec.get('member')!r}",
                              _RECOMPILE, files)


def package_for(manifest: dict, extra_files: dict, name: str, target) -> tuple[bytes | None, dict | None, str | None]:
    """(bytes, record, None) when the package of program `name` can run for `target`
    here; (None, None, reason) when the portable program must be lowered instead
    (reason None: the artifact carries no packages, nothing to say)."""
    from optc.compiler.codegen.aoti_probe import environment

    packages = manifest.get("packages")
    if not packages or packages.get("format") != "aoti":
        return None, None, None
    rec = (packages.get("programs") or {}).get(name)
    if rec is None:
        return None, None, f"the artifact has no package of {name}"
    if "skipped" in rec:
        return None, None, f"{name} was not packaged at compile time ({rec['skipped']})"
    built = packages.get("environment") or {}
    here = environment(target)
    if built.get("target") != target.name:
        return None, None, f"its packages were compiled for {built.get('target')}, this is {target.name}"
    differ = [f"{k} {built.get(k)!r} there, {here.get(k)!r} here" for k in sorted(set(built) | set(here))
              if k != "target" and built.get(k) != here.get(k)]
    if differ:
        return None, None, "its packages were compiled in another environment: " + "; ".join(differ)
    check_hashes({"packages": {"programs": {name: rec}}}, extra_files)  # again: the bytes may be in-memory edits
    from optc.compiler.codegen.aoti_probe import load_failure

    failure = load_failure(target)  # loading a package where they crash would end the process
    if failure is not None:
        return None, None, f"AOTInductor packages do not load here: {failure}"
    return extra_files[rec["member"]], rec, None


def packaged_module(manifest: dict, extra_files: dict, name: str, target, gm, device, warned: set):
    """The package of `name` bound to `gm`'s weights and state, or None (after a
    warning, once per reason) when the portable program must be lowered instead."""
    from optc.compiler.codegen.aoti import PackagedProgram, bind_constants, constants_module, load_package

    data, rec, reason = package_for(manifest, extra_files, name, target)
    if data is not None:
        try:
            dev = torch.device(device)
            index = (dev.index if dev.index is not None else torch.cuda.current_device()) if dev.type == "cuda" else -1
            runner = load_package(data, device_index=index)
            constants = constants_module(gm, runner)
            bind_constants(runner, constants)
            return PackagedProgram(runner, gm, rec["state"], constants)
        except Exception as exc:  # noqa: BLE001 - a package that cannot load: lower the portable program
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            reason = f"its package of {name} cannot be loaded here ({type(exc).__name__}: {first})"
    if reason is not None and reason not in warned:
        warned.add(reason)
        warnings.warn(f"{reason}; running the portable {name} program, lowered by Inductor now "
                      "(slower to load, and not the code the compile verified)", stacklevel=4)
    return None
