"""Quality metrics, always measured on the held-out evaluation split.

- perplexity (LMs): exp of the next-token cross-entropy averaged over every predicted
  token (a window of T tokens predicts T-1). Lower is better.
- embedding-cosine (encoders): mean cosine between the candidate's and the original
  model's pooled embeddings (mean over attention_mask) of the same inputs; the
  original scores 1.0.
- retrieval agreement (encoders, beside embedding-cosine): the share of held-out samples
  whose nearest neighbour among the other samples (cosine of pooled embeddings) is the
  same under the candidate as under the original: whether a search index built on the
  candidate's embeddings returns what the original's would.
- top1-agreement (vision): fraction of images whose argmax class matches the original
  model's. The vision models here have random weights, so this measures agreement
  with the original, not accuracy.

Model functions take the positional inputs of `ZooEntry.example_inputs` and may return
a tensor, a Hugging Face ModelOutput or a tuple; `output_tensor` picks the tensor.
"""

from __future__ import annotations

import math

import torch

from optc.errors import UsageError
from optc.progress import progress

# Defaults per metric: (n batches, batch); text windows are entry.default_seq_len long
# (128 for the real models: 8x127 predicted tokens for an LM).
DEFAULTS = {"perplexity": (8, 1), "embedding-cosine": (16, 1), "top1-agreement": (8, 8)}


def output_tensor(out, prefer: str = "logits") -> torch.Tensor:
    """The main tensor of a model output: `prefer` (logits / last_hidden_state) when
    the output has it, else the first element."""
    if isinstance(out, torch.Tensor):
        return out
    for key in (prefer, "logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(out, dict) and isinstance(out.get(key), torch.Tensor):
            return out[key]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise UsageError(f"cannot find an output tensor in a {type(out).__name__}; return a "
                     "tensor, a tuple whose first element is one, or a Hugging Face output")


def _as_tuple(batch) -> tuple:
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


@torch.no_grad()
def perplexity(forward_logits, batches) -> float:
    """exp(mean next-token cross-entropy) over all predicted tokens of `batches`
    (LongTensors [B, T], or input tuples whose first element is one)."""
    total, count = 0.0, 0
    for batch in progress(batches, "perplexity"):
        args = _as_tuple(batch)
        ids = args[0]
        logits = output_tensor(forward_logits(*args)).float()
        if logits.shape[:2] != ids.shape:
            raise UsageError(f"logits of shape {tuple(logits.shape)} do not match input_ids "
                             f"{tuple(ids.shape)}; expected [B, T, vocab]")
        pred = logits[:, :-1].reshape(-1, logits.shape[-1])
        target = ids[:, 1:].reshape(-1).to(pred.device)
        total += torch.nn.functional.cross_entropy(pred, target, reduction="sum").item()
        count += target.numel()
    if count == 0:
        raise UsageError("perplexity needs windows of at least 2 tokens")
    return math.exp(total / count)


def pooled(hidden: torch.Tensor, args: tuple) -> torch.Tensor:
    """Mean over the attention mask (args[1]) or over all tokens; 2-D inputs as they are."""
    hidden = hidden.float()
    if hidden.dim() == 2:  # already pooled
        return hidden
    mask = args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else None
    if mask is None:
        return hidden.mean(dim=1)
    mask = mask.to(hidden.device, torch.float32).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


@torch.no_grad()
def embeddings(fn, batches) -> torch.Tensor:
    """Mean-pooled embeddings [N, H] of every sample in `batches`."""
    out = []
    for batch in progress(batches, "embeddings"):
        args = _as_tuple(batch)
        out.append(pooled(output_tensor(fn(*args), "last_hidden_state"), args).cpu())
    return torch.cat(out)


@torch.no_grad()
def embedding_cosine(reference_fn, candidate_fn, batches) -> float:
    """Mean cosine between reference and candidate pooled embeddings, per sample."""
    batches = list(batches)
    ref, cand = embeddings(reference_fn, batches), embeddings(candidate_fn, batches)
    return torch.nn.functional.cosine_similarity(ref, cand, dim=-1).mean().item()


@torch.no_grad()
def retrieval_agreement(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Share of rows of [N, H] embeddings whose nearest other row by cosine is the same
    in `candidate` as in `reference` (N >= 2)."""
    def nearest(e):
        e = torch.nn.functional.normalize(e.float(), dim=-1)
        sim = e @ e.T
        sim.fill_diagonal_(float("-inf"))
        return sim.argmax(-1)

    if reference.shape[0] < 2:
        raise UsageError("retrieval agreement needs at least 2 samples")
    return (nearest(reference) == nearest(candidate)).float().mean().item()


@torch.no_grad()
def top1_agreement(reference_fn, candidate_fn, batches) -> float:
    """Fraction of samples where the candidate's argmax class equals the reference's."""
    same, count = 0, 0
    for batch in progress(batches, "top-1 agreement"):
        args = _as_tuple(batch)
        ref = output_tensor(reference_fn(*args)).float().argmax(dim=-1).cpu()
        cand = output_tensor(candidate_fn(*args)).float().argmax(dim=-1).cpu()
        same += (ref == cand).sum().item()
        count += ref.numel()
    return same / count


def _to(batch: tuple, device) -> tuple:
    return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in batch)


def evaluate(entry, candidate_fn, reference_fn=None, n: int | None = None,
             seq_len: int | None = None, batch: int | None = None, seed: int = 0,
             device="cpu") -> dict:
    """Quality of `candidate_fn` on `entry`'s evaluation split, by `entry.metric`.

    For the relative metrics the reference defaults to a fresh `entry.load(device=...)`
    (the original model). Inputs are placed on `device`. Returns {"metric", "value",
    "split": "evaluation", "n_tokens" | "n_samples", "n_batches", "seq_len", "batch"}.
    """
    if entry.metric not in DEFAULTS:
        raise UsageError(f"{entry.name}: unknown metric {entry.metric!r}")
    d_n, d_batch = DEFAULTS[entry.metric]
    n, batch = n or d_n, batch or d_batch
    seq_len = None if entry.family == "vit" else (seq_len or entry.default_seq_len)
    batches = [_to(b, device) for b in entry.evaluation_batches(n, seq_len, batch=batch, seed=seed)]
    result = {"metric": entry.metric, "split": "evaluation", "n_batches": n, "batch": batch,
              "seq_len": seq_len}
    if entry.metric == "perplexity":
        result["value"] = perplexity(candidate_fn, batches)
        result["n_tokens"] = sum(b[0].shape[0] * (b[0].shape[1] - 1) for b in batches)
        return result
    if reference_fn is None:
        reference_fn = entry.load(device=device)
    if entry.metric == "embedding-cosine":
        result["value"] = embedding_cosine(reference_fn, candidate_fn, batches)
    else:
        result["value"] = top1_agreement(reference_fn, candidate_fn, batches)
    result["n_samples"] = n * batch
    return result
