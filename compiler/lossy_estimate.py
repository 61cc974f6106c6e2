"""Whether a lossy configuration is estimated to pay on its target, before any GPU runs it.

Fewer tokens or channels are not always less time: at batch 1 a merged ViT-B/16 has the
same one wave of GEMM tiles as the dense one plus the launches each merge adds, and runs
slower (benchmarks/NOTES.md, "Merging at batch 1"). The compile says so when the cost
model's prior for the target (its bandwidth, FLOPs and launch cost; no measurement)
estimates the compressed program slower than the captured one. The program estimated is
the one that decides latency: decode for a causal LM, the forward otherwise. The captured
program stands for the dense one, which spares compiling it again: the lossless rewrites
the dense compile adds change the prior's figure by a launch or two, inside the tie band
on a real model (the captured side is the slower, so a lossy pass gains that little).
"""

from __future__ import annotations

from optc.compiler.search.cost_model import PAYS_SHARE, CostModel, program_features, realised_share

# An estimate within this fraction of dense is a tie, not a warning: the prior is a model.
TIE = 0.02


def against_dense(dense, compressed, report: list[dict], target, program: str) -> dict | None:
    """{"program", "source", "passes", "dense_ms", "compressed_ms", "share_of_ideal", "slower",
    "pays"} for the `program` named, `dense` (captured) against `compressed` (after the passes
    in `report`; both exported programs); "unavailable" instead of the figures where the cost
    model cannot read a graph; None where no lossy pass applied.

    `pays` as `optc bench` and the search judge a measured row (cost_model.PAYS_SHARE): the
    estimated saving is at least that share of what the removed work (bytes at decode, FLOPs
    in a forward) would save at the dense rate; where less than cost_model.MIN_REMOVED of the
    work went (share_of_ideal None), not slower than dense. `slower`: beyond the tie band."""
    lossy = [p["name"] for p in report if p.get("lossy") and p.get("applied")]
    if not lossy:
        return None
    model = CostModel.prior(target)
    said = {"program": program, "source": f"cost model prior for {target.name}", "passes": lossy}
    try:
        dense_f = program_features(dense, batch=None)
        compressed_f = program_features(compressed, {"passes": report}, batch=None)
        dense_ms, compressed_ms = model.estimate_ms(dense_f), model.estimate_ms(compressed_f)
    except Exception as exc:  # noqa: BLE001 - advice only: a graph the cost model cannot read must not fail a compile
        return {**said, "unavailable": f"{type(exc).__name__}: {exc}"}
    work = "bytes" if program == "decode" else "flops"
    share = realised_share(dense_ms, compressed_ms, dense_f[work], compressed_f[work]) if dense_f[work] else None
    slower = compressed_ms > dense_ms * (1 + TIE)
    return {**said, "dense_ms": round(dense_ms, 4), "compressed_ms": round(compressed_ms, 4),
            "share_of_ideal": None if share is None else round(share, 3), "slower": slower,
            "pays": not slower if share is None else share >= PAYS_SHARE}


def verdict(estimate: dict) -> str:
    """What the compile's report says of an estimate (one made before `slower` existed had
    `pays` False only when slower)."""
    if estimate["pays"]:
        return "pays"
    if estimate.get("slower", True):
        return "does NOT pay: slower than dense"
    return (f"does not pay: {100 * estimate['share_of_ideal']:.0f}% of the ideal saving, under the "
            f"{100 * PAYS_SHARE:.0f}% that pays")


def warning(estimate: dict | None) -> str | None:
    """The line the compile logs when the estimate says the lossy passes make the program
    slower (one that is faster but short of paying is said in the report's estimate line)."""
    if not estimate or not estimate.get("slower", False):
        return None
    return (f"[optc] warning: {estimate['source']} estimates the {estimate['program']} program with "
            f"{', '.join(estimate['passes'])} slower than without them ({estimate['compressed_ms']:.3f} against "
            f"{estimate['dense_ms']:.3f} ms): what they remove does not decide latency at this shape "
            "(e.g. batch 1); measure with `optc bench`, or compile without them")
