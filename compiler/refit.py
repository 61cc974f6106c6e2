"""Repair of a linear whose input columns were cut (prune_mlp's down_proj, prune_heads'
o_proj): what the removed columns added to the output is put back, as a constant or by
refitting the kept columns, on calibration activations.

`y = x @ W^T` over all input columns; after pruning only `x[:, kept]` remains, and the
repaired linear computes `x[:, kept] @ W'^T + c`.
"""

from __future__ import annotations

import torch


def repair(x: torch.Tensor, w: torch.Tensor, kept: torch.Tensor, lstsq: bool,
           ridge: float = 1.0, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept columns W', constant c) with `y ~ x[:, kept] @ W'^T + c`.

    `y` is the output to reproduce, by default the dense linear's on the same inputs,
    `x @ W^T`; a sequential refit passes the dense model's output while `x` comes from
    the model pruned and repaired below this layer, so the refit also absorbs the error
    the layers below leave in its inputs.

    Without `lstsq` W' are the original columns and c puts back the mean (with `y` the
    default, the removed columns' mean contribution: FLAP's bias repair). With it,
    centred and the constant fitted alongside: min ||x_k W'^T - y_c||^2 + r ||W' - W_k||^2,
    i.e. the kept columns plus a correction predicting what they miss from the kept
    inputs. The ridge pulls toward the original columns, not toward 0: a plain refit on
    fewer tokens than kept inputs interpolates the calibration set and ruins held-out
    outputs. `ridge` is relative to the mean diagonal of the kept inputs' centred Gram.
    """
    y = x @ w.T if y is None else y
    mean_k = x[:, kept].mean(0)
    wk = w[:, kept]
    if lstsq:
        xk = x[:, kept] - mean_k
        gram = xk.T @ xk
        r = ridge * gram.diagonal().mean().clamp_min(1e-12)
        eye = torch.eye(len(kept), dtype=gram.dtype, device=gram.device)
        wk = wk + torch.linalg.solve(gram + r * eye, xk.T @ (y - y.mean(0) - xk @ wk.T)).T
    return wk, y.mean(0) - mean_k @ wk.T


def rel_err(x: torch.Tensor, w: torch.Tensor, kept: torch.Tensor, wk: torch.Tensor | None = None,
            c: torch.Tensor | None = None, y: torch.Tensor | None = None) -> float:
    """||x_k W'^T + c - y||^2 / ||y||^2 (W' the original kept columns, y = x W^T by default)."""
    y = x @ w.T if y is None else y
    approx = x[:, kept] @ (w[:, kept] if wk is None else wk).T + (0 if c is None else c)
    return ((approx - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30)).item()
