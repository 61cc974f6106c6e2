"""Quality on the held-out evaluation split, measured per window so that a search can
score a cheap subsample first and the full split for candidates near the front.

The original program's per-window figures are computed once and reused for every
candidate. Quality loss, the figure the search constrains (0 = unchanged):
- perplexity (LMs): relative perplexity increase, ppl(candidate) / ppl(original) - 1;
- embedding-cosine (encoders): 1 - mean cosine of the pooled outputs;
- top1-agreement (classifiers): share of samples whose top-1 class changed.
The uncertainty is the spread between the loss on two disjoint halves of the windows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from optc.errors import UsageError
from optc.models.quality import output_tensor, pooled, retrieval_agreement
from optc.progress import progress


class HeldOut:
    def __init__(self, task: str, metric: str, batches: list[tuple], reference_gm, device="cpu"):
        if not batches:
            raise UsageError("quality needs at least one held-out batch")
        self.task, self.metric, self.device = task, metric, device
        self.batches = [tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in b) for b in batches]
        self._reference = [self._window(reference_gm, b) for b in progress(self.batches, "held-out: original", unit="window")]

    @property
    def size(self) -> int:
        return len(self.batches)

    def _window(self, gm, batch: tuple):
        """What one window contributes: (CE sum, tokens) for LMs, else the pooled
        output or class of each sample."""
        with torch.no_grad():
            if self.task == "causal-lm":
                ids = batch[0]
                out = output_tensor(gm(input_ids=ids, cache_position=torch.arange(ids.shape[1], device=ids.device)))
                logits = out[:, :-1].float().flatten(0, 1)
                ce = F.cross_entropy(logits, ids[:, 1:].flatten(), reduction="sum").item()
                return ce, ids[:, 1:].numel()
            out = output_tensor(gm(*batch), "last_hidden_state").float()
            if self.metric == "top1-agreement":
                return out.argmax(-1).cpu()
            return pooled(out, batch).cpu()

    def loss(self, gm, n: int | None = None) -> dict:
        """Quality loss of `gm` on the first `n` windows (all by default), with the
        original's and the candidate's figures and the two halves' spread."""
        n = min(n or self.size, self.size)
        cand = [self._window(gm, b) for b in progress(self.batches[:n], "held-out: candidate", unit="window")]
        ref = self._reference[:n]
        total = self._loss(ref, cand)
        halves = [self._loss(ref[i::2], cand[i::2]) for i in (0, 1)] if n >= 2 else [total["loss"]] * 2
        halves = [h["loss"] if isinstance(h, dict) else h for h in halves]
        return {**total, "windows": n, "of": self.size, "halves": halves,
                "spread": abs(halves[0] - halves[1])}

    def _loss(self, ref: list, cand: list) -> dict:
        if self.task == "causal-lm":
            tokens = sum(c[1] for c in ref)
            before = math.exp(sum(r[0] for r in ref) / tokens)
            after = math.exp(sum(c[0] for c in cand) / tokens)
            return {"metric": "perplexity", "before": before, "after": after, "loss": after / before - 1.0,
                    "tokens": tokens}
        ref_t, cand_t = torch.cat(ref), torch.cat(cand)
        if self.metric == "top1-agreement":
            agree = (ref_t == cand_t).float().mean().item()
            return {"metric": self.metric, "before": 1.0, "after": agree, "loss": 1.0 - agree,
                    "samples": ref_t.numel()}
        cos = F.cosine_similarity(ref_t, cand_t, dim=-1).mean().item()
        out = {"metric": "embedding-cosine", "before": 1.0, "after": cos, "loss": 1.0 - cos,
               "samples": ref_t.shape[0]}
        if ref_t.shape[0] >= 2:  # the samples as a search corpus: same nearest neighbour?
            out["retrieval_agreement"] = retrieval_agreement(ref_t, cand_t)
        return out

