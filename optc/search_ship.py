"""What `optc search` does after its trials: compile the fastest configuration under the
limit that passes the lowering check every artifact passes, and time it again beside
dense in one process."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple


class Shipped(NamedTuple):
    row: dict | None  # the configuration that shipped, with its artifact; None if none did
    compiled: Any  # its compiled programs (what the side-by-side timing lowers)
    not_shipped: list  # the faster ones that failed, with why
    failure: Exception | None  # to raise when none compiled


def ship_fastest(session, candidates: list[dict], out_dir: Path, study_name: str, log, *,
                 package: str = "aoti") -> Shipped:
    """Compile the fastest configuration under the limit; if it fails (its lowering
    check, which trials are timed without, or anything else), the next fastest, and so
    on."""
    from optc.errors import CompileError

    not_shipped = []
    for row in candidates:
        try:
            saved, compiled = compile_best(session, row, out_dir, study_name, log, package=package)
            return Shipped({**row, **saved}, compiled, not_shipped, None)
        except Exception as exc:
            not_shipped.append({**row, "error": f"{type(exc).__name__}: {exc}"})
            log(f"search: trial {row['trial']}'s configuration cannot ship: {type(exc).__name__}: {exc}; "
                "trying the next fastest")
    return Shipped(None, None, not_shipped, CompileError(
        f"none of the {len(candidates)} configurations under the limit compiled; the last: "
        f"{not_shipped[-1]['error'] if not_shipped else 'none'}"))


def compile_best(session, best, out_dir: Path, study_name: str, log, *, package: str = "aoti") -> tuple[dict, Any]:
    """The chosen configuration compiled, verified and evaluated in full, and saved as
    `optc compile` saves one (api.artifact_of: kernel cache, packages, the decode loop's
    quality figure): what the report records of it, and the compiled programs."""
    from optc.api import artifact_of

    config = session.resolve(best["config"])
    compiled = session.run(config, verify=True, evaluate=True)
    art = artifact_of(session, compiled, package=package, verify=True, evaluate=True, log=log)
    path = out_dir / f"{study_name}-best-{config['hash']}.optc"
    art.save(path)
    log(f"search: best configuration compiled to {path}")
    return {"artifact": str(path), "config_hash": config["hash"], "quality_full": art.manifest["quality"]}, compiled


def side_by_side(measure_one, rounds: int):
    """A function timing compiled programs as `optc bench --rounds` does: each lowered and
    timed once (`measure_one`, the trials' own), then timed again round-robin until each
    has `rounds` timings, every call pooled (runtime.timing.pooled). Drift over the
    minutes between a search's trials then spreads over both instead of landing between
    them. None when rounds is 0."""
    from optc.runtime.timing import pooled

    def run(compiled_list) -> list:
        measured = [measure_one(c) for c in compiled_list]
        runs = [[m.timing] for m in measured]
        for _ in range(rounds - 1):
            for timings, m in zip(runs, measured):
                timings.append(m.remeasure())
        return [pooled(timings) for timings in runs]

    return run if rounds > 0 else None


def lost_to_dense(confirmed: dict | None) -> str | None:
    """What the report and the README say when the side-by-side timing found the shipped
    configuration no faster than dense (None otherwise). A lossy configuration no faster
    than dense is worse than dense; compiles of one configuration differ by a few percent
    (coordinate descent), so a trial's lead of that size may not survive a second compile."""
    if not confirmed or "error" in confirmed or confirmed["speedup_vs_dense"] > 1.0:
        return None
    return ("It was not faster than dense side by side: at this limit dense optc (no lossy pass) is the better "
            "choice; the trials' lead did not hold in a second compile beside dense.")


def confirm_against_dense(session, shipped: Shipped, dense: dict | None, confirm, log) -> dict | None:
    """The shipped configuration and dense, timed again side by side (side_by_side) with
    the lowering the trials had: the speed-up over dense free of drift between trials.
    None when there is nothing to compare (the dense model shipped, or rounds 0); a
    failure is recorded, not raised: the artifact is saved by then."""
    if confirm is None or not shipped.row.get("passes"):
        return None
    log("search: timing the shipped configuration and dense again, side by side ...")
    try:
        dense_run = session.run(session.resolve(dense["config"] if dense else {}), export_on_use=True)
        best, dense_t = confirm([shipped.compiled, dense_run])
    except Exception as exc:
        log(f"search: timing it again failed: {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"best_ms": best.median_ms, "dense_ms": dense_t.median_ms,
            "speedup_vs_dense": dense_t.median_ms / best.median_ms,
            "round_medians_ms": {"best": best.info["round_medians_ms"], "dense": dense_t.info["round_medians_ms"]}}
