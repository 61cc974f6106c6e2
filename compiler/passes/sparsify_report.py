"""sparsify_activations' measurements on held-out inputs (`optc compile --eval`): the
activation sparsity each thresholded unit reaches, and the weight rows a kernel serving
one, 4 or 16 tokens at once would read."""

from __future__ import annotations

import torch
import torch.fx as fx

from optc.compiler.rewrite import rebuild
from optc.progress import progress

aten = torch.ops.aten


# Token counts of the multi-token rows: a kernel serving M tokens at once must read the
# weight row of every channel active for any of them.
UNION_TOKENS = (4, 16)


class _Unions:
    """Fraction of channels active for at least one of M tokens, for M consecutive tokens
    of one sequence (the verify step of speculative decoding) and for the same position
    of M different sequences (batched decode), accumulated per unit over held-out inputs."""

    def __init__(self, n_units: int):
        self.consecutive = {m: [[0, 0] for _ in range(n_units)] for m in UNION_TOKENS}
        self.across = {m: [[0, 0] for _ in range(n_units)] for m in UNION_TOKENS}
        # per unit: the running OR over the sequences of the open group, and their count
        self._open = {m: [[None, 0] for _ in range(n_units)] for m in UNION_TOKENS}

    def add(self, i: int, keep: torch.Tensor) -> None:
        """`keep` [batch, tokens, channels] (or [tokens, channels]) of unit i: one
        sequence per batch row."""
        for rows in keep.reshape(-1, *keep.shape[-2:]):  # [tokens, channels] per sequence
            for m in UNION_TOKENS:
                if rows.shape[0] >= m:
                    groups = rows[: rows.shape[0] // m * m].reshape(-1, m, rows.shape[-1]).any(dim=1)
                    self.consecutive[m][i][0] += int(groups.sum())
                    self.consecutive[m][i][1] += groups.numel()
                slot = self._open[m][i]
                if slot[0] is None or slot[0].shape != rows.shape:
                    # positions are compared across sequences of one length: another
                    # length starts a new group (the open one is dropped, incomplete)
                    slot[0], slot[1] = rows, 1
                else:
                    slot[0], slot[1] = slot[0] | rows, slot[1] + 1
                if slot[1] == m:  # a group of m sequences is complete
                    self.across[m][i][0] += int(slot[0].sum())
                    self.across[m][i][1] += slot[0].numel()
                    slot[0], slot[1] = None, 0

    def summary(self, weights: list[int]) -> dict:
        """Weight-row fraction read per M (weighted by each unit's weights), where measured."""
        out = {}
        for label, table in (("consecutive", self.consecutive), ("sequences", self.across)):
            for m, per_unit in table.items():
                pairs = [(w, a / c) for w, (a, c) in zip(weights, per_unit) if c]
                if pairs:
                    out[f"{m}_{label}"] = round(sum(w * f for w, f in pairs) / sum(w for w, _ in pairs), 4)
        return out


def report_sparsity(gm: fx.GraphModule, plan: dict, inputs) -> dict:
    """Fraction of thresholded activations that are zero on `inputs` (held out), and the
    fraction of weight rows a kernel serving 1, 4 or 16 tokens at once would read."""
    rows = {r["buffer"]: r for r in plan.get("units", [])}
    keeps = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == aten.gt.Tensor
             and isinstance(n.args[1], fx.Node) and n.args[1].op == "get_attr" and n.args[1].target in rows]
    if not keeps:
        return {"sparsity": None, "reason": "no masking nodes in this program"}
    probe, _ = rebuild(gm, extra_outputs=keeps)
    zeros, count = [0] * len(keeps), [0] * len(keeps)
    unions = _Unions(len(keeps))
    with torch.no_grad():
        for args, kwargs in progress(inputs, "held-out sparsity"):
            for i, keep in enumerate(probe(*args, **kwargs)[1]):
                zeros[i] += int((~keep).sum())
                count[i] += keep.numel()
                unions.add(i, keep)
    per = {rows[k.args[1].target]["key"]: z / max(c, 1) for k, z, c in zip(keeps, zeros, count)}
    by_kind: dict[str, list] = {}
    for r in rows.values():
        if r["key"] in per:
            by_kind.setdefault(r["kind"], []).append(per[r["key"]])
    params = sum(r["params"] for r in rows.values() if r["key"] in per)
    skipped = sum(per[r["key"]] * r["params"] for r in rows.values() if r["key"] in per)
    unit_params = [rows[k.args[1].target]["params"] for k in keeps]
    return {
        "sparsity": round(sum(zeros) / max(sum(count), 1), 4),
        "weighted_sparsity": round(skipped / params, 4),
        "weights_skipped": round(skipped / plan.get("block_params", params), 4),
        # Of the thresholded units' weight rows: read for one token (1 - weighted_sparsity),
        # and for M tokens at once (the union of their active channels).
        "rows_read": {"1": round(1 - skipped / params, 4), **unions.summary(unit_params)},
        "by_kind": {k: round(sum(v) / len(v), 4) for k, v in by_kind.items()},
        "units": {k: round(v, 4) for k, v in per.items()},
        "n_inputs": len(inputs),
    }
