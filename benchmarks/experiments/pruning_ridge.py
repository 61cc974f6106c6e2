"""Choosing lstsq's ridge (and calibration size) on calibration data only: each
configuration is planned on the first N calibration windows and scored on calibration
windows 64..79, which no plan here reads (the held-out split stays for reporting).

    python benchmarks/experiments/pruning_ridge.py MODEL '{"prune_heads.ratio":0.33,"prune_heads.repair":"lstsq",
        "prune_heads.calibration_samples":32,"_ridges":[0.03,0.1,0.3,1.0]}' [...]

Prints one JSON line per configuration (validation perplexity, calibration losses).
"""
import json, sys, time
import torch
from optc.models.user import resolve
from optc.compiler.session import CompileSession
from optc.compiler.heldout import HeldOut
from optc.compiler import pipeline, capture as cap
from optc.compiler.calibration import CalibrationContext
from optc.compiler.passes import prune_mlp, prune_heads

torch.set_num_threads(2)
from optc.compiler import passes as _p; _p.load_all()
model = sys.argv[1]
VAL0, VALN = 64, 16
entry, module, ex = resolve(model, device="cpu", dtype=None)
s = CompileSession(module, ex, target="cpu", entry=entry, log=lambda m: None)
allc = s.calibration_inputs(VAL0 + VALN)
assert all(torch.equal(a[1]["input_ids"] if s.is_lm else a[0][0], b[1]["input_ids"] if s.is_lm else b[0][0])
           for a, b in zip(s.calibration_inputs(32), allc))
val_batches = [tuple(kw.values())[:1] if s.is_lm else args for args, kw in allc[VAL0:]]
metric = "perplexity" if s.is_lm else entry.metric
t = time.time()
val = HeldOut(s.task, metric, val_batches, s.original)
print("val ref", time.time() - t, flush=True)

def run(passes, ridge=None):
    if ridge is not None:
        prune_mlp.RIDGE = prune_heads.RIDGE = ridge
        s.cache.plans.clear()
    config = s.resolve(passes)
    gms = {s.primary: cap.graph_module(s.captured.programs[s.primary])}
    n = pipeline_samples = max([4] + [v.get("calibration_samples", 0) for v in config["passes"].values() if isinstance(v.get("calibration_samples"), int)])
    t = time.time()
    report = pipeline.run(gms, s.primary, config, lambda gm: CalibrationContext(s.task, gm, s.calibration_inputs(n)),
                          log=lambda m: None, cache=s.cache)
    plan_s = time.time() - t
    q = val.loss(gms[s.primary])
    e = next(r for r in report if r["applied"] and r["lossy"])
    out = {"passes": passes, "ridge": ridge, "val_after": q["after"], "val_before": q["before"], "plan_s": round(plan_s, 1),
           "repair_used": e["plan"].get("repair"), "calib": e["plan"].get("calibration_loss"), "local": e["plan"].get("local_rel_err")}
    print(json.dumps(out), flush=True)
    return out

for line in sys.argv[2:]:
    spec = json.loads(line)
    ridges = spec.pop("_ridges", [None])
    for r in ridges:
        run(spec, r)
