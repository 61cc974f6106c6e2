"""One search worker: ask a configuration, compile it in the session, score its quality
on a held-out subsample, estimate its latency with the cost model, measure the
promising on the device, tell Optuna (latency, quality loss) with the quality limit as
a constraint.

Measuring is handed in (`measure(compiled) -> ms`): it belongs to the runtime, which
the compiler does not import. Every trial records what it is (settings, config hash,
active passes), its estimate, and whether its latency was measured or estimated.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Callable

import optuna
from optuna.trial import TrialState

from optc.compiler.config import config_hash
from optc.compiler.search import storage as st
from optc.compiler.search.space import SearchSpace, active_passes
from optc.errors import CompileError, InternalError, OptcError, UsageError

# Quality is measured in full for candidates whose subsample loss is within this
# factor of the limit; latency is measured for candidates the cost model puts within
# MEASURE_MARGIN of the fastest feasible measured one, or that would join the front.
FULL_QUALITY_FACTOR = 1.5
MEASURE_MARGIN = 0.10
MAX_ERRORS_IN_A_ROW = 3
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class WorkerOptions:
    n_trials: int
    max_quality_loss: float
    subsample: int | None = None  # held-out batches scored first (None: all)
    min_measured: int = 1  # measure at least this many before trusting the cost model (the dense seed anchors it)
    heartbeat_s: float = st.HEARTBEAT_S
    grace_s: float = st.GRACE_S
    measure_all: bool = False
    time_limit_s: float | None = None  # start no trial after this long


@dataclass
class Outcome:
    latency_ms: float
    source: str  # "measured" | "estimated"
    quality: dict
    extra: dict = field(default_factory=dict)


def make_sampler(seed: int | None = None) -> optuna.samplers.BaseSampler:
    # Optuna 5 leaves multivariate TPE off for multi-objective studies; the passes'
    # settings interact (a removed block changes what sparsity costs), so turn it on,
    # grouped because conditional keys come and go.
    with warnings.catch_warnings():  # `group` is marked experimental since Optuna 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(multivariate=True, group=True, seed=seed, n_startup_trials=8)


def enqueue_seeds(study: optuna.Study, space: SearchSpace) -> None:
    for params in space.seeds():
        study.enqueue_trial(params, user_attrs={"seed": True}, skip_if_exists=True)


def run_worker(study: optuna.Study, space: SearchSpace, session, *, measure: Callable, features: Callable,
               cost, opts: WorkerOptions, log=print, remember: Callable | None = None) -> list[int]:
    """Run `opts.n_trials` trials; returns their numbers. `remember(features, ms)` is
    told every latency measured (the device's history)."""
    done: list[int] = []
    errors_in_a_row = 0
    start = time.monotonic()
    while len(done) < opts.n_trials:
        if opts.time_limit_s is not None and time.monotonic() - start > opts.time_limit_s:
            log(f"[optc] search: time limit of {opts.time_limit_s:g} s reached after {len(done)} trials")
            break
        st.reap_stale(study, opts.grace_s, log)
        trial = _ask(study)
        trial.set_user_attr("worker", WORKER_ID)
        beat = st.Heartbeat(study, trial._trial_id, opts.heartbeat_s)
        try:
            _one_trial(study, trial, space, session, measure, features, cost, opts, log, remember)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the next run of the search runs it again
            beat.stop()
            st.fail_and_requeue(study, trial, "its worker was stopped")
            raise
        except CrashedBefore as exc:
            trial.set_user_attr("error", f"as in trial {exc.args[0]}")
            study.tell(trial, state=TrialState.FAIL)
            log(f"[optc] trial {trial.number}: not run: a pass crashed on this configuration in trial "
                f"{exc.args[0]}")
        except Exception as exc:
            if isinstance(exc, OptcError) and not isinstance(exc, InternalError):
                # the configuration cannot apply here: recorded, never retried
                trial.set_user_attr("inapplicable", str(exc)[:2000])
                study.tell(trial, state=TrialState.FAIL)
                log(f"[optc] trial {trial.number}: cannot apply: {exc}")
            else:  # a bug: recorded with its traceback; the search goes on unless it repeats
                trial.set_user_attr("error", error_record())
                study.tell(trial, state=TrialState.FAIL)
                log(f"[optc] trial {trial.number}: failed: {type(exc).__name__}: {exc}")
                errors_in_a_row += 1
                if errors_in_a_row >= MAX_ERRORS_IN_A_ROW:
                    raise CompileError(f"{errors_in_a_row} trials in a row failed; the last: "
                                       f"{type(exc).__name__}: {exc} (tracebacks are in the trials' 'error' "
                                       "attribute)") from exc
        else:
            errors_in_a_row = 0
        finally:
            beat.stop()
        done.append(trial.number)
        log(_progress(study, len(done), opts))
    return done


def _ask(study: optuna.Study) -> optuna.Trial:
    """A retry of a dead worker's trial first, then Optuna's ask (which takes the oldest
    waiting trial, a seed queued long before the retry). The claim works as Optuna's own:
    the storage moves a waiting trial to running for one caller only."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if "retry_of" not in t.user_attrs:
            continue
        try:
            if study._storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                study._thread_local.cached_all_trials = None
                return optuna.Trial(study, t._trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return study.ask()


def _one_trial(study, trial, space, session, measure, features, cost, opts, log, remember=None):
    settings = space.suggest(trial)
    config = session.resolve(settings, space.pipeline_name)
    trial.set_user_attr("settings", settings)
    trial.set_user_attr("config_hash", config["hash"])
    trial.set_user_attr("active_passes", active_passes(settings))
    earlier = _finished_twin(study, config["hash"], trial.number)
    if earlier is not None:  # another worker (or an earlier run) finished this configuration
        _copy_result(study, trial, earlier, log)
        return
    refused = _failed_twin(study, config["hash"], trial.number)
    if refused is not None:  # known not to apply: say so again without compiling
        raise UsageError(f"as in trial {refused.number}: {refused.user_attrs['inapplicable']}")
    crashed = _failed_twin(study, config["hash"], trial.number, mark="error")
    if crashed is not None:  # a pass crashed on it before: not run again, and not a new crash
        raise CrashedBefore(crashed.number)
    earlier = _claim(study, trial, config["hash"], log, grace_s=opts.grace_s)
    if earlier is not None:  # another worker was already running it: its result, not a second measurement
        _copy_result(study, trial, earlier, log)
        return
    start = time.perf_counter()
    compiled = session.run(config, export_on_use=True)  # an estimated trial exports its timed program only
    trial.set_user_attr("compile_s", round(time.perf_counter() - start, 2))
    programs = program_hash(compiled, config)
    trial.set_user_attr("program_hash", programs)
    earlier = _finished_twin(study, programs, trial.number, key="program_hash")
    if earlier is not None:  # other settings, the same programs (a ratio that removes nothing)
        _copy_result(study, trial, earlier, log)
        return
    quality = session.quality(compiled.primary_gm, opts.subsample)
    feats = features(compiled)
    estimate = cost.estimate_ms(feats)
    trial.set_user_attr("features", feats)
    trial.set_user_attr("estimate_ms", estimate)
    measured = _measured(study)
    near_limit = quality["loss"] <= opts.max_quality_loss * FULL_QUALITY_FACTOR + quality["spread"]
    if opts.measure_all or len(measured) < opts.min_measured or (near_limit and _promising(
            estimate, quality["loss"], measured, opts.max_quality_loss)):
        if quality["windows"] < quality["of"] and near_limit:
            quality = session.quality(compiled.primary_gm)
        if _finished_twin(study, config["hash"], trial.number) is not None:
            _copy_result(study, trial, _finished_twin(study, config["hash"], trial.number), log)
            return
        latency, source = measure(compiled), "measured"
        cost.fit([(t.user_attrs["features"], t.values[0]) for t in measured] + [(feats, latency)])
        if remember is not None:
            remember(feats, latency)
    else:
        latency, source = estimate, "estimated"
    trial.set_user_attr("latency_source", source)
    exported = getattr(getattr(compiled, "programs", None), "seconds", None)  # session.ExportOnUse
    if exported is not None:
        trial.set_user_attr("export_s", round(exported, 2))  # the re-exports this trial read
    trial.set_user_attr("quality", {k: v for k, v in quality.items() if k != "split"})
    trial.set_constraint("quality", quality["loss"] - opts.max_quality_loss)
    study.tell(trial, [latency, quality["loss"]])
    log(f"[optc] trial {trial.number}: {describe(settings)}: {latency:.4g} ms ({source}; estimate "
        f"{estimate:.4g}), quality loss {quality['loss']:.4f} on {quality['windows']}/{quality['of']} batches")


def program_hash(compiled, config: dict) -> str | None:
    """What a configuration changed, whatever it asked for: the passes that applied, with
    their settings and plans. Settings that change nothing (a head ratio that rounds to no
    KV group, a pass that found nothing to do) compile the same programs as the dense
    model, so they share its measurement instead of timing it again."""
    report = getattr(compiled, "manifest", {}).get("passes")
    if report is None:
        return None
    applied = [{"name": e["name"], "settings": config["passes"].get(e["name"]), "plan": e.get("plan")}
               for e in report if e.get("applied")]
    return config_hash({"applied": json.loads(json.dumps(applied, default=str))})


def _finished_twin(study, value: str | None, number: int, key: str = "config_hash"):
    if value is None:
        return None
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.number != number and t.user_attrs.get(key) == value and not t.user_attrs.get("copy_of"):
            return t
    return None


def _claim(study, trial, config_hash: str, log, poll_s: float = 2.0, grace_s: float = st.GRACE_S):
    """Go ahead with `config_hash` only if no running trial claimed it first; else wait
    for that trial and return it once finished (None: it failed, so this one runs).
    The storage orders the writes: of two claims, the later one's read sees the earlier."""
    while True:
        mine = (time.time(), trial.number)
        trial.set_user_attr("claimed_at", mine[0])
        first = min(((t.user_attrs["claimed_at"], t.number) for t in study.get_trials(
            deepcopy=False, states=(TrialState.RUNNING,)) if t.number != trial.number
            and t.user_attrs.get("config_hash") == config_hash and "claimed_at" in t.user_attrs), default=None)
        if first is None or first > mine:
            return None
        log(f"[optc] trial {trial.number}: trial {first[1]} is running the same configuration; waiting for it")
        while study._storage.get_trial(study._storage.get_trial_id_from_study_id_trial_number(
                study._study_id, first[1])).state == TrialState.RUNNING:
            time.sleep(poll_s)
            st.reap_stale(study, grace_s, log)  # its worker may have died meanwhile
        done = _finished_twin(study, config_hash, trial.number)
        if done is not None:
            return done


_NATIVE_FRAME = re.compile(r"^\s*(frame #\d+:|Exception raised from )")


def error_record(limit: int = 4000) -> str:
    """The traceback of the exception being handled, for a failed trial's record: the last
    `limit` characters, without the native frames a C++ error appends to its message
    (dozens of lines that would push the Python frames locating the bug out of the tail)."""
    lines = traceback.format_exc().splitlines(keepends=True)
    return "".join(line for line in lines if not _NATIVE_FRAME.match(line))[-limit:]


def _failed_twin(study, config_hash: str, number: int, mark: str = "inapplicable"):
    """A failed trial of the same configuration carrying `mark`: inapplicable (a pass
    refused it) or error (a pass crashed on it)."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if t.number != number and t.user_attrs.get("config_hash") == config_hash and mark in t.user_attrs:
            return t
    return None


class CrashedBefore(Exception):
    """The configuration crashed a pass in an earlier trial (its number)."""


def _copy_result(study, trial, earlier, log) -> None:
    for key in ("latency_source", "quality", "features", "estimate_ms"):
        if key in earlier.user_attrs:
            trial.set_user_attr(key, earlier.user_attrs[key])
    trial.set_user_attr("copy_of", earlier.number)
    for key, value in earlier.constraints.items():
        trial.set_constraint(key, value)
    study.tell(trial, list(earlier.values))
    same = "programs" if trial.user_attrs.get("program_hash") else "configuration"
    log(f"[optc] trial {trial.number}: same {same} as trial {earlier.number}; its result reused, not measured again")


def _measured(study) -> list:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.user_attrs.get("latency_source") == "measured" and not t.user_attrs.get("copy_of")]


def _promising(estimate: float, loss: float, measured: list, limit: float) -> bool:
    """Worth measuring: faster (within the margin) than the fastest feasible measured
    configuration, or not dominated by any measured one."""
    feasible = [t.values[0] for t in measured if t.values[1] <= limit]
    if feasible and estimate <= min(feasible) * (1 + MEASURE_MARGIN):
        return True
    return not any(t.values[0] <= estimate and t.values[1] <= loss for t in measured)


def describe(settings: dict) -> str:
    """{"skip_layers": {"count": 3}} as "skip_layers.count=3" ("dense" when empty)."""
    parts = [f"{p}.{k}={v}" for p, values in settings.items() for k, v in values.items()]
    return " ".join(parts) or "dense"


def _progress(study, n: int, opts: WorkerOptions) -> str:
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    feasible = [t for t in trials if t.values[1] <= opts.max_quality_loss
                and t.user_attrs.get("latency_source") == "measured"]
    best = min(feasible, key=lambda t: t.values[0], default=None)
    said = (f"best feasible {best.values[0]:.4g} ms (trial {best.number}, loss {best.values[1]:.4f})"
            if best else "no feasible measured configuration yet")
    return f"[optc] search: trial {n} of {opts.n_trials} in this worker; {len(trials)} complete in the study; {said}"

