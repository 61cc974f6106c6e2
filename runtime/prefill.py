"""A prompt of any length through a prefill program of one length P.

An artifact's prefill program is checked, and its kernels cached, for one prompt length
P; lowered without dynamic shapes, every other length would compile it again (and the
ninth would fail at Dynamo's recompile limit). So a prompt goes in P-token chunks, the
last one ending at the prompt's end and overlapping the one before it (its positions are
written again with the same values), or as one chunk padded on the right when it is
shorter than P. The padded positions' cache entries are masked (each query sees
positions up to its own) and overwritten by the decode steps that reach them.

Transformers' static cache writes where its `cumulative_length` counters say; the
export wrapper sets them from `cache_position` at each call (transformers 5.23), and
`run_chunks` sets them too (`set_length`), before each chunk and to the prompt's length
after it, so the writes follow the positions it passes whichever wrapper built the
programs.
"""

from __future__ import annotations

from typing import Callable

import torch


def prefill_starts(T: int, P: int) -> list[int]:
    """Where each call of a P-token prefill program starts for a T-token prompt: every P
    tokens, and the last call ending at T (overlapping the call before it) when P does
    not divide T; one padded call when T < P."""
    starts = list(range(0, max(T - P, 0) + 1, P))
    if T > P and starts[-1] + P < T:
        starts.append(T - P)
    return starts


def run_chunks(prefill: Callable, prompt_ids: torch.Tensor, P: int, set_length: Callable[[int], None]) -> torch.Tensor:
    """Run `prefill` over the prompt in P-token calls; returns the next-token logits
    [B, V] at the prompt's last position."""
    T = prompt_ids.shape[1]
    for start in prefill_starts(T, P):
        # A fresh [B, P] tensor: a slice keeps the prompt's strides, which would compile
        # the program again (Dynamo guards on strides, even of a size-1 batch).
        chunk = prompt_ids.new_empty(prompt_ids.shape[0], P)
        part = prompt_ids[:, start : start + P]
        chunk[:, : part.shape[1]] = part
        chunk[:, part.shape[1] :] = part[:, -1:]  # a prompt shorter than P: padded with its last token
        set_length(start)
        pos = torch.arange(start, start + P, dtype=torch.long, device=prompt_ids.device)
        logits = prefill(input_ids=chunk, cache_position=pos)
    set_length(T)
    return logits[:, T - 1 - start, :]
