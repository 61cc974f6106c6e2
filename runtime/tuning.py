"""`--tuning-from FILE.optc`: the kernel configurations an earlier compile chose, written
into this machine's autotune cache before `optc compile` or `optc bench` lowers anything
(codegen/tuned_configs.py says what that does and why)."""

from __future__ import annotations

import zipfile
from pathlib import Path

from optc.compiler import targets
from optc.compiler.codegen import kernel_cache, tuned_configs
from optc.compiler.targets import Target
from optc.errors import ArtifactError, UsageError
from optc.runtime import member_read
from optc.runtime.artifact import read_manifest


def carry_tuning(path, target: Target) -> dict:
    """Install `path`'s chosen kernel configurations for lowerings on `target` in this
    process; {"from": path, "configs": how many}. Refused (UsageError, exit 2) where the
    target's device is not here, or the artifact's kernel cache was not built for this
    target, environment and optc (kernel_cache.usable says which)."""
    if not targets.available(target):
        raise UsageError(f"--tuning-from: no {target.name} device here; the configurations are used where the "
                         "programs are lowered and tuned, on the target's device")
    manifest, members = _kernel_cache_members(Path(path))
    data, reason = kernel_cache.usable(manifest, members, target)
    if data is None:
        reason = reason or ("it carries no kernel cache (it was compiled where its target's device was absent, "
                            "or its lowering recorded nothing)")
        raise UsageError(f"--tuning-from {path}: {reason}; compile without --tuning-from, or pass an artifact "
                         f"compiled for {target.name} by this optc on this kind of machine")
    return {"from": str(path), "configs": tuned_configs.install(data)}


def _kernel_cache_members(path: Path) -> tuple[dict, dict]:
    """The manifest and the kernel cache's members (not the programs or the weights)."""
    manifest = read_manifest(path)
    rec = manifest.get("kernel_cache") or {}
    names = [part["member"] for part in (rec, rec.get("triton_kernels") or {}) if "member" in part]
    try:
        with zipfile.ZipFile(path) as zf:
            return manifest, {name: bytes(member_read.read(zf, name, manifest["files"].get(name) or {}))
                              for name in names}
    except (KeyError, zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise ArtifactError(f"artifact {path} is damaged: its kernel cache cannot be read ({e}); copy it again or "
                            "recompile the model with `optc compile`") from e
