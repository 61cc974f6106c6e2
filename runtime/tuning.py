"""`--tuning-from FILE.optc`: the kernel configurations an earlier compile chose, written
into this machine's autotune cache before `optc compile` or `optc bench` lowers anything
(codegen/tuned_configs.py says what that does and why)."""

from __future__ import annotations

from optc.compiler import targets
from optc.compiler.codegen import kernel_cache, tuned_configs
from optc.compiler.targets import Target
from optc.errors import UsageError
from optc.runtime.artifact import read_members


def carry_tuning(path, target: Target, log=None) -> dict:
    """Install `path`'s chosen kernel configurations for lowerings on `target` in this
    process, saying how many to `log`; {"from": path, "configs": how many}. Refused (UsageError, exit 2) where the
    target's device is not here, or the artifact's kernel cache was not built for this
    target, environment and optc (kernel_cache.usable says which)."""
    if not targets.available(target):
        raise UsageError(f"--tuning-from: no {target.name} device here; the configurations are used where the "
                         "programs are lowered and tuned, on the target's device")
    manifest, members = read_members(path, kernel_cache.members)  # not the programs, not the weights
    data, reason = kernel_cache.usable(manifest, members, target)
    if data is None:
        reason = reason or ("it carries no kernel cache (it was compiled where its target's device was absent, "
                            "or its lowering recorded nothing)")
        raise UsageError(f"--tuning-from {path}: {reason}; compile without --tuning-from, or pass an artifact "
                         f"compiled for {target.name} by this optc on this kind of machine")
    carried = {"from": str(path), "configs": tuned_configs.install(data)}
    if log is not None:
        log(f"{carried['configs']} kernel configurations from {path}")
    return carried
