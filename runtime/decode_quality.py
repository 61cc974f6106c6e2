"""Held-out quality through the decode loop a causal LM runs, beside the prefill graph's.

`--eval` scores the rewritten prefill graph over whole windows, but generation runs the
decode program one token at a time, with its own rewrites (e.g. share_kv_heads applies to
one-token attention only) and its own kernels. So each of a few held-out windows is
prefilled for its first half and the rest is fed through the decode program one token
at a time, teacher-forced (StaticCacheDecoder.forced_logits, as the bench's agreement
check does). The same predictions are scored with the rewritten and the original
prefill graphs, so the figures compare token for token.

The decode loop runs the programs as they ship: lowered the way the artifact lowers
them at load when the compile lowered (and verified) them, else uncompiled (no device
of the target here, or --no-verify). Few windows keep the CPU cost small; the figure is
a check that the decode path computes what the prefill graph does, not a second
quality estimate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from optc.models.quality import output_tensor

WINDOWS = 2  # held-out windows scored through the decode loop
WINDOW_TOKENS = 64  # tokens of each: the first half prefilled, the rest decoded one by one
# How far the decode loop's perplexity may be from the prefill graph's on the same tokens
# (relative) before the compile fails. Lossless programs agree to rounding; calibrated
# thresholds that decide near-ties differently after reordered arithmetic move it by a few
# percent (benchmarks/NOTES.md, "Quality through the decode program"); a decode path that
# computes something else (a cache it does not read, a wrong kernel) is off by far more.
TOLERANCE = 0.10


def decode_quality(art, batches: list, *, reference, rewritten, lowered: bool, device: str,
                   windows: int = WINDOWS, window_tokens: int = WINDOW_TOKENS) -> dict:
    """Perplexity through `art`'s decode loop on the first `windows` of `batches` (held-out
    token windows), with the rewritten and `reference` (original) prefill graphs' figures
    on the same predictions."""
    meta = art.manifest["model"]
    W = min(window_tokens, meta["max_cache_len"])
    usable = [b[0] for b in batches if b[0].shape[0] == meta["batch_size"] and b[0].shape[1] >= W][:windows]
    if not usable or W < 4:
        return {"skipped": f"no held-out window of batch {meta['batch_size']} and at least {max(W, 4)} tokens"}
    P = W // 2
    dec = art.decoder(device=device, compiled=lowered)
    ce = {"decode": 0.0, "prefill_graph": 0.0, "original": 0.0}
    n = 0
    with torch.no_grad():
        for ids in usable:
            ids = ids[:, :W].to(device)
            target = ids[:, P:].flatten()
            # Rows P-1 .. W-2: the prefill's last position, then one decode step per token.
            ce["decode"] += _ce(dec.forced_logits(ids[:, :-1], P), target)
            pos = torch.arange(W, device=ids.device)
            for name, gm in (("prefill_graph", rewritten), ("original", reference)):
                logits = output_tensor(gm(input_ids=ids, cache_position=pos))
                ce[name] += _ce(logits[:, P - 1:-1], target)
            n += target.numel()
    ppl = {k: math.exp(v / n) for k, v in ce.items()}
    return {
        "metric": "perplexity", "before": ppl["original"], "after": ppl["decode"],
        "prefill_graph_after": ppl["prefill_graph"], "loss": ppl["decode"] / ppl["original"] - 1.0,
        "vs_prefill_graph": ppl["decode"] / ppl["prefill_graph"] - 1.0,
        "programs": _programs(dec) if lowered else "uncompiled", "device": device,
        "windows": len(usable), "window_tokens": W, "prefill_tokens": P, "tokens": n,
    }


def check(d: dict) -> None:
    """Refuse (CompileError) a decode loop whose held-out perplexity is further than
    TOLERANCE from the prefill graph's on the same tokens: generation would not compute
    what --eval measured."""
    from optc.errors import CompileError

    if "vs_prefill_graph" not in d or abs(d["vs_prefill_graph"]) <= TOLERANCE:
        return
    raise CompileError(
        f"the decode program's held-out perplexity ({ran_as(d)}: {d['after']:.4g}) is "
        f"{100 * d['vs_prefill_graph']:+.1f}% "
        f"off the prefill graph's on the same tokens ({d['prefill_graph_after']:.4g}; tolerance "
        f"{100 * TOLERANCE:.0f}%): what generation runs does not compute what --eval measured. Compile without "
        "the pass that rewrites the decode program (`optc compile --json` names each program's rewrites), and "
        "report this with the model and settings")


def ran_as(d: dict) -> str:
    """What ran a decode_quality figure's decode loop, in words."""
    return {"lowered": "lowered as the artifact loads them", "packages": "the artifact's AOTInductor packages"}.get(
        d["programs"], "uncompiled")


def _programs(dec) -> str:
    """How the decoder's programs run: as the artifact's AOTInductor packages, or lowered
    by Inductor here."""
    from optc.compiler.codegen.aoti import PackagedProgram

    return "packages" if isinstance(dec.decode_fn, PackagedProgram) else "lowered"


def _ce(logits: torch.Tensor, target: torch.Tensor) -> float:
    return F.cross_entropy(logits.float().flatten(0, 1), target, reduction="sum").item()
