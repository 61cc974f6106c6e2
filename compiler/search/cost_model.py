"""Latency cost model of the search: a calibrated roofline over each program's features
(compiler/search/features.py: bytes, FLOPs and kernel launches), and a correction fitted
on the study's own measured trials. It ranks candidates so that only promising ones are
measured; measurement always wins over the estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from optc.compiler.search import device_db
from optc.compiler.search.device_db import calibrate_device  # noqa: F401  (part of this API)
from optc.compiler.search.features import program_features  # noqa: F401  (part of this API)


# Priors where neither the target profile nor a calibration says better; deliberately
# low (a GPU of an older generation, a laptop-class CPU) so an uncalibrated estimate errs slow.
DEFAULTS = {
    "cuda": {"bandwidth_gbs": 1500.0, "tflops": 150.0, "launch_us": 4.0},
    "cpu": {"bandwidth_gbs": 20.0, "tflops": 0.2, "launch_us": 5.0},
}
MIN_FIT = 3  # fewer measured trials than the correction's dense coefficients (a, b, c): scale the roofline (fit)
# The data term sums squared relative errors (measurement noise is a few percent), the
# prior term squared deviations of the coefficients from the prior (plausibly tens of
# percent): a small weight decides only where the trials cannot (few of them, or terms
# that move together across the trials), and yields wherever they can.
PRIOR_WEIGHT = 0.02
# Roofline and launch terms as calibrated, no constant, and optc's sparse kernels at the
# dense rate per byte they read (what the roofline alone assumes). A target that measured its
# sparse kernels slower puts its own s in the prior (targets.Target.sparse_read_cost).
PRIOR = (1.0, 1.0, 0.0, 0.0)
# Weight of a sample from the device's history (other studies, other models) against
# one of the study's own: enough to start fitted, little enough that a study's own
# trials take over once it has a few.
HISTORY_WEIGHT = 0.3


# A configuration pays on a target when it saves at least this share of the time its
# removed work (bytes at decode, FLOPs in a forward) would save at the dense model's rate;
# below it, `optc bench` and the search say that it does not pay there. The roofline
# above credits every removed byte: this is where a measurement says otherwise.
PAYS_SHARE = 0.85


MIN_REMOVED = 0.01  # of the dense row's work: below it a row is a lowering variant


def realised_share(dense_ms: float, row_ms: float, dense_work: float, row_work: float) -> float | None:
    """The share of the ideal saving a row realised: (1 - row_ms / dense_ms) over
    (1 - row_work / dense_work), where work is bytes per decode step or FLOPs per
    forward. None where the row removed no work (a lowering variant) or less than
    MIN_REMOVED of it, where the quotient is timing noise over a rounding of the work
    (a merge of projections spares a few activation bytes)."""
    removed = 1 - row_work / dense_work
    if removed < MIN_REMOVED:
        return None
    return (1 - row_ms / dense_ms) / removed


def mark_against_dense(rows: list[dict], dense: dict | None, key: str, ms: str) -> list[dict]:
    """Each row that removed work (row["work"][key]: bytes or flops) set against `dense`
    (a row of the same measurement): `ideal_speedup` (the work ratio), `realised`
    (realised_share, from row[ms]) and `pays` (realised >= PAYS_SHARE), in place.
    Returns the rows that do not pay."""
    if dense is None or not (dense.get("work") or {}).get(key):
        return []
    for r in rows:
        work = (r.get("work") or {}).get(key)
        if r is dense or not work:
            continue
        share = realised_share(dense[ms], r[ms], dense["work"][key], work)
        if share is not None:
            r.update(ideal_speedup=round(dense["work"][key] / work, 4), realised=round(share, 4),
                     pays=share >= PAYS_SHARE)
    return [r for r in rows if r.get("pays") is False]


@dataclass
class CostModel:
    """ms = a * roofline + b * launches * launch_us + c + s * sparse roofline, with
    (a, b, c, s) = (1, 1, 0, 0) until `fit` has a measured sample (the study's or the
    device history's). launch_us is what a kernel costs beyond its bytes and FLOPs
    (launch, ramp-up, tail); one constant for every kind of kernel, the fitted b absorbs
    the mix. The sparse roofline is that of optc's sparse kernels alone (features'
    `sparse_kernels`, also in the roofline): s is what they cost beyond the dense rate
    for the bytes they read, so that once measured trials with sparse kernels show them
    streaming slower than dense (about half the rate on the H100 and H200,
    benchmarks/NOTES.md), the estimates of the other sparse configurations say so too,
    and a sparsity that does not pay on this GPU stops looking as if it did.

    The roofline is summed per kernel, sum(max(bytes/BW, flops/peak)), rather than
    max(total bytes/BW, total flops/peak): a prefill or encoder program mixes
    compute-bound GEMMs with memory-bound norms and attention, and the aggregate form
    lets the larger side hide the other; at decode both forms agree."""

    bandwidth_gbs: float
    tflops: float
    launch_us: float
    source: str = "prior"
    coef: tuple[float, ...] | None = None  # (a, b, c, s)
    n_fit: int = 0
    history: tuple = ()  # (features, ms) measured on this device by earlier studies
    prior_coef: tuple[float, ...] = PRIOR  # the coefficients before any fit, and what a fit is pulled toward

    def with_history(self, samples: list) -> "CostModel":
        """Fit from now on also on these samples (the device's history), at
        HISTORY_WEIGHT each; returns self, fitted on them alone so far."""
        self.history = tuple((f, ms) for f, ms in samples if ms and math.isfinite(ms) and ms > 0)
        return self.fit([])

    @classmethod
    def prior(cls, target="cpu") -> "CostModel":
        """The target profile's ceilings (or conservative defaults), uncalibrated."""
        from optc.compiler import targets

        tgt = targets.get(target) if isinstance(target, str) or target is None else target
        d = DEFAULTS["cuda" if tgt.device == "cuda" else "cpu"]
        bw = tgt.copy_tbs * 1e3 if tgt.copy_tbs else d["bandwidth_gbs"]
        return cls(bw, tgt.bf16_tflops or d["tflops"], d["launch_us"], source=f"target {tgt.name}",
                   prior_coef=_target_prior(tgt))

    @classmethod
    def for_device(cls, device, target="auto", *, calibrate: bool = False, log=device_db._log) -> "CostModel":
        """The device's calibrated constants when its record exists (measured first
        when `calibrate`), else the target's priors."""
        from optc.compiler import targets

        tgt = targets.get(target) if isinstance(target, str) or target is None else target
        model = cls.prior(tgt)
        record = device_db.load(device)
        if record is None and calibrate:
            dev = torch.device(device)
            record = device_db.calibrate_device(dev, dtype=tgt.dtype if tgt.device == dev.type else None, log=log)
        if record is not None:
            c = record["constants"]
            model = cls(c["bandwidth_gbs"], c["tflops"], c["launch_us"], source=f"calibrated {record['key']['device']}",
                        prior_coef=model.prior_coef)
        return model

    def terms(self, f: dict) -> tuple[float, float]:
        """(roofline ms, launch ms) of a program's features."""
        kernels = f.get("kernels") or [[f["bytes"], f["flops"], 1]]
        return self._roofline(kernels), f["launches"] * self.launch_us / 1e3

    def sparse_roof(self, f: dict) -> float:
        """Roofline ms of the program's optc sparse kernels (0 for features without them)."""
        return self._roofline(f.get("sparse_kernels") or ())

    def _roofline(self, kernels) -> float:
        """sum over [bytes, flops, count] kernels of count * max(bytes/BW, flops/peak), in ms."""
        bw, peak = self.bandwidth_gbs * 1e6, self.tflops * 1e9  # per ms
        return sum(count * max(b / bw, fl / peak) for b, fl, count in kernels)

    def _columns(self, f: dict) -> list[float]:
        """The terms the coefficients (a, b, c, s) multiply."""
        return [*self.terms(f), 1.0, self.sparse_roof(f)]

    def estimate_ms(self, features: dict) -> float:
        return float(np.dot(self.coef or self.prior_coef, self._columns(features)))

    def fit(self, samples: list) -> "CostModel":
        """Fit the correction on (features, measured ms) pairs: non-negative least squares
        of relative error, pulled toward the prior coefficients by PRIOR_WEIGHT so that a handful of
        trials cannot swing it. Fewer than MIN_FIT samples scale the prior instead: one
        measurement (a study's dense seed) cannot fit three coefficients, but it says how far
        this device and lowering sit from the calibrated roofline, and a small model's
        launch-bound step can be half of it. Returns self."""
        samples = [(f, ms) for f, ms in samples if ms is not None and math.isfinite(ms) and ms > 0]
        self.n_fit = len(samples)
        weights = [1.0] * len(samples) + [HISTORY_WEIGHT] * len(self.history)
        samples = samples + list(self.history)
        if len(samples) < MIN_FIT:
            self.coef = self._scaled_prior(samples, weights)
            return self
        y = np.array([ms for _, ms in samples], dtype=float)
        w = np.sqrt(np.array(weights))
        x = np.array([self._columns(f) for f, _ in samples]) / y[:, None] * w[:, None]
        scale = np.array([1.0, 1.0, 1.0 / float(np.median(y)), 1.0])  # c is in ms: compare it to a typical trial
        a = np.vstack([x, math.sqrt(PRIOR_WEIGHT) * np.diag(scale)])
        rhs = np.concatenate([w, math.sqrt(PRIOR_WEIGHT) * scale * np.array(self.prior_coef)])
        self.coef = tuple(float(v) for v in _nonneg_lstsq(a, rhs))
        return self

    def _scaled_prior(self, samples: list, weights: list) -> tuple[float, ...] | None:
        """The prior coefficients times the weighted geometric mean of measured / prior
        estimate, over the samples whose estimate is finite and positive; None without such
        samples."""
        ratios = []
        for w, (f, ms) in zip(weights, samples):
            estimate = float(np.dot(self.prior_coef, self._columns(f)))
            if math.isfinite(estimate) and estimate > 0:
                ratios.append((w, ms / estimate))
        if not ratios:
            return None
        scale = math.exp(sum(w * math.log(r) for w, r in ratios) / sum(w for w, _ in ratios))
        return tuple(v * scale for v in self.prior_coef)

    def unfitted(self) -> "CostModel":
        return CostModel(self.bandwidth_gbs, self.tflops, self.launch_us, self.source, prior_coef=self.prior_coef)

    def holdout_accuracy(self, samples: list, k_fit: int, seed: int = 0) -> dict:
        """Fit on `k_fit` samples drawn with `seed`, report accuracy on the rest."""
        if not 0 <= k_fit < len(samples):
            raise ValueError(f"k_fit={k_fit} must leave some of the {len(samples)} samples to test on")
        order = np.random.default_rng(seed).permutation(len(samples))
        model = self.unfitted().fit([samples[i] for i in order[:k_fit]])
        test = [samples[i] for i in order[k_fit:]]
        return {**accuracy([model.estimate_ms(f) for f, _ in test], [ms for _, ms in test]), "n_fit": k_fit}

    def leave_one_out(self, samples: list) -> dict:
        """Each sample predicted by a model fitted on all the others."""
        preds = [self.unfitted().fit(samples[:i] + samples[i + 1:]).estimate_ms(f) for i, (f, _) in enumerate(samples)]
        return {**accuracy(preds, [ms for _, ms in samples]), "n_fit": len(samples) - 1}

    def to_dict(self) -> dict:
        return {"bandwidth_gbs": self.bandwidth_gbs, "tflops": self.tflops, "launch_us": self.launch_us,
                "source": self.source, "coef": list(self.coef) if self.coef else None, "n_fit": self.n_fit,
                "n_history": len(self.history), "prior_coef": list(self.prior_coef)}

    @classmethod
    def from_dict(cls, d: dict) -> "CostModel":
        coef = tuple(d["coef"]) if d.get("coef") else None
        if coef is not None and not 3 <= len(coef) <= len(PRIOR):
            raise ValueError(f"a cost model with {len(coef)} coefficients; this optc reads 3 or {len(PRIOR)}")
        if coef is not None:  # a model stored before the sparse term had three: s = 0, as it assumed
            coef += (0.0,) * (len(PRIOR) - len(coef))
        return cls(d["bandwidth_gbs"], d["tflops"], d["launch_us"], d.get("source", "prior"), coef, d.get("n_fit", 0),
                   prior_coef=tuple(d.get("prior_coef") or PRIOR))


def _target_prior(tgt) -> tuple[float, ...]:
    """PRIOR with the target's measured sparse-kernel cost as s."""
    return (*PRIOR[:3], float(tgt.sparse_read_cost))


def holdout_accuracy(samples: list, k_fit: int, seed: int = 0, *, model: CostModel | None = None) -> dict:
    """`model.holdout_accuracy` (the detected target's priors by default)."""
    return (model or CostModel.prior("auto")).holdout_accuracy(samples, k_fit, seed)


def leave_one_out(samples: list, *, model: CostModel | None = None) -> dict:
    """`model.leave_one_out` (the detected target's priors by default)."""
    return (model or CostModel.prior("auto")).leave_one_out(samples)


def _nonneg_lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin ||a w - b|| subject to w >= 0, for a few columns: the best feasible
    least-squares solution over every set of columns held at zero (the optimum of a
    convex problem lies on one of these faces)."""
    k = a.shape[1]
    best, best_err = np.zeros(k), float(np.sum(b**2))
    for mask in range(1, 1 << k):
        cols = [j for j in range(k) if mask >> j & 1]
        sol = np.linalg.lstsq(a[:, cols], b, rcond=None)[0]
        if np.all(sol >= 0):
            w = np.zeros(k)
            w[cols] = sol
            err = float(np.sum((a @ w - b) ** 2))
            if err < best_err:
                best, best_err = w, err
    return best


# ---------------------------------------------------------------------------- accuracy


def _ranks(v: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the average of the ranks they span."""
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(len(v))
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def accuracy(predicted: list[float], measured: list[float]) -> dict:
    """spearman (rank correlation; None when undefined), mape (mean |pred - meas| / meas),
    within_10pct (share with |pred / meas - 1| <= 0.10), n."""
    p, m = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    if p.shape != m.shape:
        raise ValueError(f"{len(p)} predictions for {len(m)} measurements")
    n = len(m)
    if n == 0:
        return {"spearman": None, "mape": None, "within_10pct": None, "n": 0}
    rp, rm = _ranks(p), _ranks(m)
    spearman = None
    if n > 1 and rp.std() > 0 and rm.std() > 0:
        spearman = float(np.corrcoef(rp, rm)[0, 1])
    rel = np.abs(p / m - 1)
    return {"spearman": spearman, "mape": float(rel.mean()), "within_10pct": float(np.mean(rel <= 0.10 + 1e-12)),
            "n": n}


__all__ = ["program_features", "CostModel", "accuracy", "holdout_accuracy", "leave_one_out", "calibrate_device",
           "realised_share", "mark_against_dense", "PAYS_SHARE"]
