"""`optc search`: the compile session, the runtime's latency measurement and the cost
model wired into an Optuna study; the front, its plot and the best configuration's
artifact at the end.

With `workers > 1` the host runs one worker process per visible GPU (each sees one,
through CUDA_VISIBLE_DEVICES), all on the same study; any number of hosts can join
the same study with `--storage postgresql://... --study NAME`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from optc.errors import CompileError, NoConfigError, UsageError
from optc.fileio import atomic_open
from optc.search_ship import confirm_against_dense, lost_to_dense, ship_fastest, side_by_side


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class SearchRequest:
    model: str
    target: str = "auto"
    trials: int = 20
    max_quality_loss: float = 0.05
    storage: str | None = None
    study: str | None = None
    workers: int = 1
    pipeline: str = "default"
    fixed: dict = field(default_factory=dict)
    out_dir: str = "optc-search"
    tokens: int = 32
    batch: int | None = None
    measure_all: bool = False
    compile_best: bool = True
    package: str = "aoti"  # the shipped artifact's AOTInductor packages, as `optc compile --package`
    confirm_rounds: int = 3  # the shipped configuration and dense timed again, alternating
    seed: int | None = None
    time_limit_s: float | None = None
    lowering: str = "target"  # "plain": Inductor defaults for trials (faster), not the target's tuning
    calibration: str | None = None  # a --calibration file instead of the zoo's data
    tuning_from: str | None = None  # an artifact whose chosen kernel configurations every trial starts from


def search(req: SearchRequest, *, worker_only: bool = False, log=_log) -> dict:
    """Run the search (this process's worker, or one worker per GPU) and report."""
    from optc.compiler import targets
    from optc.compiler.search import storage as st, study as sy
    from optc.compiler.search.space import SearchSpace

    if req.trials < 0 or req.workers < 1:
        raise UsageError("--trials must be >= 0 and --workers >= 1")
    if not 0 <= req.max_quality_loss:
        raise UsageError(f"--max-quality-loss must be >= 0, got {req.max_quality_loss}")
    from optc.api import check_package

    check_package(req.package, "--package ")  # before any trial, not at the ship
    if req.lowering not in ("target", "plain"):
        raise UsageError(f"--lowering {req.lowering!r}: expected target or plain")
    target = targets.get(req.target)
    if not targets.available(target):
        raise UsageError(f"target {target.name} is not present on this machine: a search measures latency, "
                         "so run it where the target is (or use --target cpu)")
    st.check_url(req.storage)  # before the model loads and is captured (minutes for a large one)
    if req.tuning_from and not worker_only:  # workers of this host read the same Inductor cache
        from optc.runtime.tuning import carry_tuning

        carry_tuning(req.tuning_from, target, log=lambda msg: log(f"search: {msg}"))
    out_dir = Path(req.out_dir)
    study_name = req.study or f"{Path(req.model.split(':')[0]).name}-{target.name}"
    if req.workers > 1 and not worker_only:
        return _run_workers(req, target, study_name, log)
    session, entry, prompt = _session(req, target, log)
    measured_on, lowering = trial_lowering(req.lowering, target, decoder=session.is_lm)
    space = SearchSpace(session.anatomy, req.pipeline, settled_by_lowering(req.fixed, measured_on, session.is_lm, log))
    workload = _workload(session, req, prompt)
    signature = {"model": session.model_name, "target": target.name, "workload": workload.to_dict(),
                 "lowering": lowering,
                 "space": space.signature(), "calibration": session.calibration_source()}
    store, where = st.open_storage(req.storage, out_dir / f"{study_name}.journal")
    study = st.open_study(store, study_name, signature, sy.make_sampler(req.seed))
    sy.enqueue_seeds(study, space)
    cost = _cost_model(target, study, workload, lowering)
    log(f"search: study '{study_name}' in {where}; {len(space.params)} searched settings: "
        f"{', '.join(space.params)}; cost model {cost.source}, {len(cost.history)} samples of the device's history")
    measure_one = _measurer(measured_on, workload, prompt, log, autotune=req.lowering != "plain")

    def measure(compiled) -> float:
        return measure_one(compiled).timing.median_ms

    def features(compiled):
        program = compiled.programs["decode" if session.is_lm else "forward"]
        return _plain(_features(program, compiled.manifest, workload))

    n_sub = _subsample(session)
    opts = sy.WorkerOptions(req.trials, req.max_quality_loss, subsample=n_sub, measure_all=req.measure_all,
                            time_limit_s=req.time_limit_s, **_liveness_from_env())
    start = time.perf_counter()
    try:
        sy.run_worker(study, space, session, measure=measure, features=features, cost=cost, opts=opts, log=log,
                      remember=_remember(target, workload, lowering, session.model_name))
    except (CompileError, KeyboardInterrupt) as exc:  # trials kept crashing, or the search was stopped
        # (Ctrl-C, SIGTERM): report what the study holds (nothing compiled), then stop
        if not worker_only:
            if isinstance(exc, KeyboardInterrupt):
                log("search: stopped before its trials ended; reporting what the study holds "
                    "(the same command resumes it)")
            try:
                _finish(replace(req, compile_best=False), study, study_name, where, target, session,
                        time.perf_counter() - start, log)
            except NoConfigError:
                pass
            except Exception as failure:  # noqa: BLE001 - what ended the trials is the error to raise
                log(f"search: the report could not be written: {type(failure).__name__}: {failure}")
        raise
    if worker_only:
        return {"study": study_name, "worker_trials": req.trials}
    confirm = side_by_side(measure_one, rounds=req.confirm_rounds)
    return _finish(req, study, study_name, where, target, session, time.perf_counter() - start, log, confirm)


def _liveness_from_env() -> dict:
    """OPTC_SEARCH_HEARTBEAT_S / OPTC_SEARCH_GRACE_S: how often a running trial says it is
    alive, and after how long without a word another worker takes it for dead."""
    out = {}
    for key, name in (("heartbeat_s", "OPTC_SEARCH_HEARTBEAT_S"), ("grace_s", "OPTC_SEARCH_GRACE_S")):
        if os.environ.get(name):
            try:
                out[key] = float(os.environ[name])
            except ValueError:
                raise UsageError(f"{name}={os.environ[name]!r} is not a number of seconds") from None
    return out


def _subsample(session) -> int:
    from optc.compiler.session import SUBSAMPLE

    return SUBSAMPLE["causal-lm" if session.is_lm else "other"]


def trial_lowering(kind: str, target, *, decoder: bool = True):
    """(the target trials are lowered for, the study's and the device history's label of
    that lowering). "plain" trials drop the target's Inductor options (its decoder
    programs' too); a model that is not a decoder LM (`decoder=False`) has no decoder
    programs, so their options are not part of its lowering either. The label names the
    lowering in full, so that trials measured before a target's lowering changed (a
    kernel turned on) join neither a study nor a cost model after it."""
    from optc.compiler import targets

    if not decoder:
        target = replace(target, decoder_inductor={})
    measured_on = replace(target, inductor={}, decoder_inductor={}) if kind == "plain" else target
    return measured_on, f"{kind}: {targets.lowering_words(measured_on)}"


def settled_by_lowering(fixed: dict, measured_on, decoder: bool, log) -> dict:
    """`fixed` plus the settings the trials' lowering makes pointless to search: where it
    merges a forward program's dense sibling linears itself (`merge_gemms`), an encoder runs
    the same GEMMs with merge_projections.ops "all" as with "sparse", so that trial would
    repeat dense. A setting the user fixed stays theirs."""
    if decoder or not measured_on.merge_gemms or "ops" in fixed.get("merge_projections", {}):
        return fixed
    log(f"search: merge_projections.ops not searched: {measured_on.name}'s lowering merges an encoder's "
        "dense q/k/v itself")
    return {**fixed, "merge_projections": {**fixed.get("merge_projections", {}), "ops": "sparse"}}


def _session(req, target, log):
    from optc.api import read_calibration
    from optc.compiler.session import CompileSession
    from optc.models.user import resolve

    log(f"loading {req.model} on {target.device} ...")
    entry, model, example_inputs = resolve(req.model, device=target.device,
                                           dtype=None if target.device == "cpu" else target.dtype)
    calibration = read_calibration(req.calibration, model, example_inputs, entry=entry)
    session = CompileSession(model, example_inputs, target=target.name, entry=entry, calibration=calibration,
                             log=log)
    prompt = example_inputs[0][:, :16].contiguous() if session.is_lm else example_inputs
    return session, entry, prompt


def _workload(session, req, inputs):
    from optc.runtime.measure import workload_for

    # An encoder is measured at the batch of its example inputs (the zoo's benchmark batch).
    batch = req.batch if session.is_lm else int(inputs[0].shape[0])
    return workload_for(session.task, batch=batch, tokens=req.tokens)


def _cost_model(target, study, workload, lowering):
    from optc.compiler.search import device_db
    from optc.compiler.search.cost_model import CostModel
    from optc.compiler.search.study import _measured

    cost = CostModel.for_device(target.device, target, calibrate=target.device == "cuda")
    past = device_db.history(target.device, kind=workload.kind, lowering=lowering)
    cost.with_history([(s["features"], s["ms"]) for s in past if s["workload"] == workload.to_dict()])
    return cost.fit([(t.user_attrs["features"], t.values[0]) for t in _measured(study)])


def _remember(target, workload, lowering, model_name):
    from optc.compiler.search import device_db

    def remember(features, ms):
        device_db.append_sample(target.device, {"workload": workload.to_dict(), "lowering": lowering,
                                                "features": features, "ms": ms, "model": model_name})

    return remember


def _features(program, manifest, workload):
    from optc.compiler.search.cost_model import program_features

    return program_features(program, manifest, batch=workload.batch)


def _measurer(target, workload, inputs, log, autotune: bool):
    """Lowers and times a compiled configuration's program (runtime.measure.Measurement,
    which can time it again). `autotune=False` ("plain" trials) also lowers encoders'
    forward programs without max-autotune: a merged encoder has other shapes in every
    layer, and tuning each costs minutes on the GPU."""
    from optc.runtime.loaded import Artifact
    from optc.runtime.measure import measure

    def run(compiled):
        # Lowered here like every trial, never run from a shipped configuration's packages or
        # kernel cache: the side-by-side timing compares two fresh lowerings.
        art = Artifact(compiled.programs, compiled.manifest, packages=False, kernel_cache=False)
        return measure(art, target, workload, inputs=inputs, autotune=None if autotune else False, log=log)

    return run


def _finish(req, study, study_name, where, target, session, seconds, log, confirm=None) -> dict:
    from optc.compiler.search import report

    summary = report.summarise(study, req.max_quality_loss)
    summary["limit"] = req.max_quality_loss
    out_dir = Path(req.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{study_name}-front.png"
    report.plot(summary, png, f"{session.model_name} on {target.name}: {summary['n_measured']} measured trials")
    from optc.runtime.timing import result_envelope

    result = {"study": study_name, "storage": where, "model": session.model_name, "target": target.name,
              "max_quality_loss": req.max_quality_loss, "seconds": round(seconds, 1), "plot": str(png),
              **{k: v for k, v in summary.items() if k != "limit"}, **result_envelope(target.device)}
    result.pop("candidates")
    best = summary["best"]
    failure = None
    result.update(not_shipped=[], confirmed=None)  # with --no-artifact, best is neither compiled nor checked
    try:
        if best is not None and req.compile_best:
            shipped = ship_fastest(session, summary["candidates"], out_dir, study_name, log, package=req.package)
            result.update(best=shipped.row, not_shipped=shipped.not_shipped)
            failure = shipped.failure
            if shipped.row is not None:
                result["confirmed"] = confirm_against_dense(session, shipped, result.get("dense"), confirm, log)
    finally:  # whatever failed while shipping, the study's report is written
        _print(result, log)
        with atomic_open(out_dir / f"{study_name}.json", "w", encoding="utf-8") as fh:
            fh.write(json.dumps(result, indent=2, default=str))
    if failure is not None:
        failure.result = result  # --json still prints the report
        raise failure
    if best is None:
        err = NoConfigError(f"no measured configuration meets --max-quality-loss {req.max_quality_loss} "
                               f"(of {summary['n_trials']} trials); raise the limit or run more trials")
        err.result = result
        raise err
    return result


def _run_workers(req, target, study_name, log) -> dict:
    """One worker process per visible GPU (or per CPU worker on the cpu target), all on
    one study; the trials split between them; this process reports at the end."""
    if req.storage is None:
        req.storage = str(Path(req.out_dir) / f"{study_name}.journal")
    gpus = _visible_gpus() if target.device == "cuda" else [None] * req.workers
    if len(gpus) < req.workers:
        raise UsageError(f"--workers {req.workers} but {len(gpus)} GPU(s) are visible; one worker per GPU")
    share = [req.trials // req.workers + (i < req.trials % req.workers) for i in range(req.workers)]
    procs = []
    for i in range(req.workers):
        env = dict(os.environ)
        if gpus[i] is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i]
        argv = _worker_argv(req, study_name, share[i])
        log(f"search: worker {i} ({'GPU ' + gpus[i] if gpus[i] is not None else 'cpu'}): {share[i]} trials")
        procs.append(subprocess.Popen(argv, env=env))
    report = SearchRequest(**{**req.__dict__, "trials": 0, "workers": 1, "study": study_name})
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:  # stopped: stop the workers (each fails its running trial for a retry), report
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        log("search: stopped; reporting what the study holds (the same command resumes it)")
        try:
            search(replace(report, compile_best=False, confirm_rounds=0), log=log)
        except NoConfigError:
            pass  # the report is written; nothing under the limit yet
        raise
    if any(codes):
        log(f"search: worker exit codes {codes}; reporting what the study holds")
    return search(report, log=log)


def _visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _worker_argv(req, study_name: str, trials: int) -> list[str]:
    argv = [sys.executable, "-m", "optc.cli", "search", req.model, "--target", req.target, "--trials", str(trials),
            "--max-quality-loss", str(req.max_quality_loss), "--storage", req.storage, "--study", study_name,
            "--pipeline", req.pipeline, "-o", req.out_dir, "--tokens", str(req.tokens), "--worker"]
    for name, values in req.fixed.items():
        for key, value in values.items():
            argv += ["--set", f"{name}.{key}={json.dumps(value)}"]
    if req.batch:
        argv += ["--batch", str(req.batch)]
    if req.measure_all:
        argv.append("--measure-all")
    if req.time_limit_s:
        argv += ["--time-limit", str(req.time_limit_s)]
    argv += ["--lowering", req.lowering]
    if req.calibration:
        argv += ["--calibration", req.calibration]
    return argv


def _plain(value):
    """JSON-able copy (numpy and torch scalars to Python)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def _print(result: dict, log) -> None:
    log(f"\noptc search: study {result['study']} ({result['storage']}): {result['n_trials']} trials, "
        f"{result['n_measured']} measured, {result['n_estimated']} estimated, {result['seconds']} s")
    log(f"  {'latency ms':>10} {'quality loss':>12}  configuration")
    from optc.compiler.search.study import describe

    for row in result["pareto"]:
        log(f"  {row['latency_ms']:>10.4g} {row['quality_loss']:>12.4f}  {describe(row['config'])}")
    for row in result.get("not_paying", []):
        log(f"  does not pay here: {describe(row['config'])} ({row['latency_ms']:.4g} ms) saved "
            f"{100 * row['realised']:.0f}% of what its removed work would save")
    acc = result["cost_model"]
    if acc.get("spearman") is not None:
        log(f"  cost model on {acc['n']} later-measured trials: Spearman {acc['spearman']:.3f}, "
            f"MAPE {100 * acc['mape']:.1f}%, {100 * acc['within_10pct']:.0f}% within 10%")
    for row in result.get("failed", []):
        log(f"  failed (a bug; its traceback is in the study): trial {row['trial']}: {row['error']}")
    for row in result.get("not_shipped", []):
        log(f"  not shipped: {describe(row['config'])} ({row['latency_ms']:.4g} ms): {row['error'][:300]}")
    best = result.get("best")
    log(f"  best under loss {result['max_quality_loss']}: " + (
        f"{best['latency_ms']:.4g} ms, loss {best['quality_loss']:.4f}" + (
            f", artifact {best['artifact']}" if "artifact" in best else "") if best else "none"))
    confirmed = result.get("confirmed")
    if confirmed and "error" in confirmed:
        log(f"  timing it again beside dense failed: {confirmed['error'][:300]}")
    elif confirmed:
        log(f"  timed again side by side: {confirmed['best_ms']:.4g} ms against dense {confirmed['dense_ms']:.4g} ms, "
            f"{confirmed['speedup_vs_dense']:.3f}x")
        if lost_to_dense(confirmed):
            log(f"  {lost_to_dense(confirmed)}")
    log(f"  plot: {result['plot']}")
