"""The search's space and worker loop on a toy pass and a fake session: no model, so
these run in seconds. The search must find a pass only through its declared space."""

import time
from dataclasses import dataclass
from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState

from optc.compiler import passes, pipeline
from optc.compiler.config import Choice, Float, Int, PassConfig, config_hash, knob
from optc.compiler.search import report, storage as st, study as sy
from optc.compiler.search.space import SearchSpace
from optc.errors import InternalError, UsageError

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass(frozen=True)
class ToyConfig(PassConfig):
    level: int = knob(0, low=0, high=100, search=Int(0, 50, bound="blocks"))
    strength: float = knob(0.0, low=0.0, high=1.0, search=Float(0.0, 0.8, step=0.1))
    flavour: str = knob("a", choices=("a", "b"), search=Choice(("a", "b"), when=("strength", ">", 0)))

    def active(self):
        return self.enabled and (self.level > 0 or self.strength > 0)


@pytest.fixture(scope="module", autouse=True)
def toy_pass():
    passes.load_all()
    if "toy_pass" not in passes.REGISTRY:
        @passes.register_pass("toy_pass", ToyConfig, lossy=True)
        def toy_pass(gm, anatomy, cfg, plan):
            """A pass the search has never heard of."""
            return passes.PassResult(True)
    pipeline.PIPELINES["toy"] = [pipeline.Step("toy_pass", "exists for the test")]
    yield
    pipeline.PIPELINES.pop("toy")


ANATOMY = SimpleNamespace(blocks=[0] * 6)  # "blocks" bounds level to 5


class FakeSession:
    """What the worker needs of a CompileSession: resolve, run, quality. Latency and
    loss are functions of the settings, so the study's figures can be checked."""

    def __init__(self, fail_on=None, error=UsageError):
        self.runs, self.fail_on, self.error = 0, fail_on, error

    def resolve(self, settings, pipeline_name="toy"):
        config = pipeline.resolve(pipeline_name, settings)
        config["hash"] = config_hash(config)
        return config

    def run(self, config, export_on_use=False):
        self.runs += 1
        toy = config["passes"]["toy_pass"]
        if self.fail_on is not None and toy["level"] == self.fail_on:
            raise self.error(f"level {toy['level']} " + ("crashed" if self.error is InternalError else
                                                           "cannot apply to this model"))
        # level 1 alone rounds to nothing: the pass does not apply and the programs are dense
        applied = toy["level"] > 1 or toy["strength"] > 0
        manifest = {"passes": [{"name": "toy_pass", "applied": applied, "plan": {}}]}
        return SimpleNamespace(toy=toy, primary_gm=toy, manifest=manifest)

    def quality(self, gm, n=None):
        loss = 0.02 * gm["level"] + 0.1 * gm["strength"]
        return {"loss": loss, "windows": n or 8, "of": 8, "spread": 0.0, "metric": "toy"}


class FakeCost:
    def __init__(self):
        self.fitted = 0

    def estimate_ms(self, feats):
        return feats["bytes"] / 100

    def fit(self, samples):
        self.fitted = len(samples)
        return self


def _features(compiled):
    toy = compiled.toy
    return {"bytes": 1000 - 100 * toy["level"] - 300 * toy["strength"], "launches": 10}


def _measure(compiled):
    return _features(compiled)["bytes"] / 90  # the estimate is off by a constant factor


def _study():
    return optuna.create_study(directions=["minimize", "minimize"], sampler=sy.make_sampler(seed=0))


def test_toy_pass_joins_the_search_through_its_declared_space():
    space = SearchSpace(ANATOMY, "toy")
    assert list(space.params) == ["toy_pass.level", "toy_pass.strength", "toy_pass.flavour"]
    assert space.params["toy_pass.level"][2].high == 5  # bounded by the anatomy, not 50
    seeds = space.seeds()
    assert seeds[0] == {"toy_pass.level": 0, "toy_pass.strength": 0.0}  # dense first
    assert {"toy_pass.level": 5, "toy_pass.strength": 0.0} in seeds  # the first key alone
    study = _study()
    trial = study.ask()
    settings = space.suggest(trial)
    toy = settings.get("toy_pass", {})
    assert 0 <= toy["level"] <= 5 and 0.0 <= toy["strength"] <= 0.8
    assert ("flavour" in toy) == (toy["strength"] > 0)  # conditional: only when it matters


def test_fixed_settings_leave_the_space_and_unknown_keys_are_refused():
    space = SearchSpace(ANATOMY, "toy", fixed={"toy_pass": {"level": 2}})
    assert "toy_pass.level" not in space.params
    with pytest.raises(UsageError, match="toy_pass.nope"):
        SearchSpace(ANATOMY, "toy", fixed={"toy_pass": {"nope": 1}})
    with pytest.raises(UsageError, match="nothing to search"):
        SearchSpace(SimpleNamespace(blocks=[0]), "toy", fixed={"toy_pass": {"strength": 0.5, "flavour": "a"}})


def test_a_key_whose_condition_cannot_hold_leaves_the_space():
    assert "toy_pass.flavour" not in SearchSpace(ANATOMY, "toy", fixed={"toy_pass": {"strength": 0.0}}).params
    assert "toy_pass.flavour" in SearchSpace(ANATOMY, "toy", fixed={"toy_pass": {"strength": 0.5}}).params


@pytest.mark.parametrize("name, merges", [("tiny-llama", False), ("tiny-bert", True)])
def test_token_merging_is_searched_on_encoders_only(name, merges):
    from optc.compiler.session import CompileSession
    from optc.models import zoo

    entry = zoo.get(name)
    session = CompileSession(entry.load(), entry.example_inputs(), target="cpu", entry=entry, log=lambda m: None)
    params = SearchSpace(session.anatomy, "default").params
    assert ("merge_tokens.r" in params) == merges and ("merge_tokens.kernels" in params) == merges
    assert ("merge_tokens.proportional_attention" in params) == merges


def test_seeds_try_each_lossless_choice_and_a_pass_fixed_off_is_not_searched():
    from optc.compiler.session import CompileSession
    from optc.models import zoo

    entry = zoo.get("tiny-bert")
    session = CompileSession(entry.load(), entry.example_inputs(), target="cpu", entry=entry, log=lambda m: None)
    seeds = SearchSpace(session.anatomy, "default").seeds()
    # Second, right after dense: the dense model with q/k/v merged (lossless; pays on some workloads).
    assert seeds[1] == {**seeds[0], "merge_projections.ops": "all"} and seeds[0]["merge_projections.ops"] == "sparse"
    for value in (False, "false", 0):  # as --set and --config may give it
        off = SearchSpace(session.anatomy, "default", fixed={"merge_projections": {"enabled": value}})
        assert not any(p.startswith("merge_projections.") for p in off.params), value
        assert all("merge_projections.ops" not in seed for seed in off.seeds())
    on = SearchSpace(session.anatomy, "default", fixed={"merge_projections": {"enabled": "true"}})
    assert "merge_projections.ops" in on.params


def test_worker_measures_the_first_then_estimates_and_keeps_the_limit_as_a_constraint():
    space, study, cost = SearchSpace(ANATOMY, "toy"), _study(), FakeCost()
    sy.enqueue_seeds(study, space)
    opts = sy.WorkerOptions(n_trials=12, max_quality_loss=0.05, subsample=4, min_measured=3)
    sy.run_worker(study, space, FakeSession(), measure=_measure, features=_features, cost=cost, opts=opts,
                  log=lambda m: None)
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 12
    sources = [t.user_attrs["latency_source"] for t in trials]
    assert sources[:3] == ["measured"] * 3 and "measured" in sources
    for t in trials:
        expected = _features(SimpleNamespace(toy=dict(level=t.params.get("toy_pass.level", 0),
                                                      strength=t.params.get("toy_pass.strength", 0.0))))
        if t.user_attrs.get("copy_of") is None:
            ms = expected["bytes"] / (90 if t.user_attrs["latency_source"] == "measured" else 100)
            assert t.values[0] == pytest.approx(ms)
        assert t.constraints["quality"] == pytest.approx(t.values[1] - 0.05)
    assert cost.fitted >= 3
    summary = report.summarise(study, 0.05)
    assert summary["best"] is not None and summary["best"]["quality_loss"] <= 0.05
    assert summary["dense"]["config"] == {"toy_pass": {"level": 0, "strength": 0.0}}
    for row in summary["pareto"]:  # no measured row beats a front row on both objectives
        assert not any(r["latency_ms"] < row["latency_ms"] and r["quality_loss"] < row["quality_loss"]
                       for r in summary["pareto"])


def test_configurations_that_save_less_than_their_removed_work_would_are_reported():
    """toy_pass.strength removes bytes (the features) but no time (this measure): those
    configurations do not pay; level removes both in proportion and pays."""
    space, study = SearchSpace(ANATOMY, "toy"), _study()
    study.set_user_attr("optc", {"workload": {"kind": "decode"}})
    sy.enqueue_seeds(study, space)
    opts = sy.WorkerOptions(n_trials=10, max_quality_loss=0.5, subsample=4, measure_all=True)
    sy.run_worker(study, space, FakeSession(), measure=lambda c: (1000 - 100 * c.toy["level"]) / 90,
                  features=_features, cost=FakeCost(), opts=opts, log=lambda m: None)
    summary = report.summarise(study, 0.5)
    not_paying = {r["trial"] for r in summary["not_paying"]}
    measured = [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if t.user_attrs.get("copy_of") is None]
    strength_only = [t.number for t in measured if t.params.get("toy_pass.strength", 0) > 0
                     and t.params.get("toy_pass.level", 0) == 0]
    level_only = [t.number for t in measured if t.params.get("toy_pass.level", 0) > 1
                  and t.params.get("toy_pass.strength", 0) == 0]
    assert strength_only and level_only, "the seeds time each knob alone"
    assert set(strength_only) <= not_paying and not not_paying & set(level_only)


def test_a_finished_configuration_is_not_run_again_and_inapplicable_ones_are_recorded():
    space, study = SearchSpace(ANATOMY, "toy"), _study()
    for level in (2, 2, 3, 3):
        study.enqueue_trial({"toy_pass.level": level, "toy_pass.strength": 0.0})
    session = FakeSession(fail_on=3)
    opts = sy.WorkerOptions(n_trials=4, max_quality_loss=0.05, min_measured=5)
    sy.run_worker(study, space, session, measure=_measure, features=_features, cost=FakeCost(), opts=opts,
                  log=lambda m: None)
    t0, t1, t2, t3 = study.get_trials()
    assert session.runs == 2  # neither twin was compiled again
    assert t1.user_attrs["copy_of"] == 0 and t1.values == t0.values
    assert t2.state == TrialState.FAIL and "cannot apply" in t2.user_attrs["inapplicable"]
    assert t3.state == TrialState.FAIL and "as in trial 2" in t3.user_attrs["inapplicable"]


def test_a_pass_that_crashes_is_recorded_as_a_failure_with_its_traceback_not_as_inapplicable():
    """The pipeline wraps an exception a pass did not mean to raise in InternalError: a
    bug, which the report lists apart from configurations that cannot apply."""
    space, study = SearchSpace(ANATOMY, "toy"), _study()
    for level in (2, 3, 3, 3, 3):
        study.enqueue_trial({"toy_pass.level": level, "toy_pass.strength": 0.0})
    session = FakeSession(fail_on=3, error=InternalError)
    opts = sy.WorkerOptions(n_trials=5, max_quality_loss=0.05, min_measured=5)
    sy.run_worker(study, space, session, measure=_measure, features=_features, cost=FakeCost(), opts=opts,
                  log=lambda m: None)
    crashed = study.get_trials()[1]
    assert crashed.state == TrialState.FAIL and "inapplicable" not in crashed.user_attrs
    assert "InternalError" in crashed.user_attrs["error"]
    # the same configuration again is not run again, and does not count as a new crash
    # (three crashes in a row would end the search)
    assert session.runs == 2
    assert [t.user_attrs["error"] for t in study.get_trials()[2:]] == ["as in trial 1"] * 3
    summary = report.summarise(study, 0.05)
    assert summary["inapplicable"] == []
    assert [r["trial"] for r in summary["failed"]][0] == 1 and "level 3 crashed" in summary["failed"][0]["error"]


def test_settings_that_change_nothing_reuse_the_dense_measurement():
    space, study = SearchSpace(ANATOMY, "toy"), _study()
    for level in (0, 1, 2):
        study.enqueue_trial({"toy_pass.level": level, "toy_pass.strength": 0.0})
    timed = []
    opts = sy.WorkerOptions(n_trials=3, max_quality_loss=0.05, min_measured=5)
    sy.run_worker(study, space, FakeSession(), measure=lambda c: timed.append(c.toy["level"]) or _measure(c),
                  features=_features, cost=FakeCost(), opts=opts, log=lambda m: None)
    dense, noop, pruned = study.get_trials()
    assert timed == [0, 2]  # level 1 compiled, found to be the dense programs, and not timed
    assert noop.user_attrs["copy_of"] == 0 and noop.values == dense.values
    assert noop.user_attrs["program_hash"] == dense.user_attrs["program_hash"] != pruned.user_attrs["program_hash"]


def test_a_configuration_another_worker_is_running_is_waited_for_not_measured_again():
    import threading

    space, study = SearchSpace(ANATOMY, "toy"), _study()
    first = study.ask({"toy_pass.level": optuna.distributions.IntDistribution(0, 5)})
    config_hash = FakeSession().resolve({"toy_pass": {"level": first.params["toy_pass.level"]}})["hash"]
    first.set_user_attr("config_hash", config_hash)
    first.set_user_attr("claimed_at", time.time() - 1)
    threading.Timer(0.5, lambda: study.tell(first, [1.0, 0.01])).start()  # the other worker finishes
    second = study.ask()
    assert sy._claim(study, second, config_hash, log=lambda m: None, poll_s=0.05).number == first.number
    third = study.ask()
    assert sy._claim(study, third, "another hash", log=lambda m: None) is None


def test_stale_trials_are_failed_and_their_configuration_queued_again():
    study = _study()
    trial = study.ask({"toy_pass.level": optuna.distributions.IntDistribution(0, 5)})
    study._storage.set_trial_user_attr(trial._trial_id, "heartbeat", time.time() - 100)
    fresh = study.ask({"toy_pass.level": optuna.distributions.IntDistribution(0, 5)})
    st.Heartbeat(study, fresh._trial_id, interval=60).stop()  # beats once, now
    assert st.reap_stale(study, grace=10, log=lambda m: None) == 1
    states = {t.number: t.state for t in study.get_trials()}
    assert states[trial.number] == TrialState.FAIL and states[fresh.number] == TrialState.RUNNING
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].user_attrs["retry_of"] == trial.number
    assert st.reap_stale(study, grace=10, log=lambda m: None) == 0  # reaped once only


def test_an_interrupted_trial_is_failed_and_its_configuration_queued_again():
    """Ctrl-C or SIGTERM in the dense seed's measurement: the trial fails, its settings
    (those it was enqueued with) wait for the next run, and the interrupt goes on up."""
    space, study = SearchSpace(ANATOMY, "toy"), _study()
    sy.enqueue_seeds(study, space)

    def interrupted(compiled):
        raise KeyboardInterrupt

    opts = sy.WorkerOptions(n_trials=3, max_quality_loss=0.05)
    with pytest.raises(KeyboardInterrupt):
        sy.run_worker(study, space, FakeSession(), measure=interrupted, features=_features, cost=FakeCost(),
                      opts=opts, log=lambda m: None)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 1 and failed[0].user_attrs["failed"] == "its worker was stopped"
    retry = sy._ask(study)
    assert retry.user_attrs.get("retry_of") == failed[0].number
    assert retry.suggest_int("toy_pass.level", 0, 5) == 0  # the dense seed, not a sampled configuration


def test_a_retry_runs_before_trials_queued_earlier():
    study = _study()
    dead = study.ask({"toy_pass.level": optuna.distributions.IntDistribution(0, 5)})
    study.enqueue_trial({"toy_pass.level": 4}, user_attrs={"seed": True})  # queued before the retry
    study._storage.set_trial_user_attr(dead._trial_id, "heartbeat", time.time() - 100)
    st.reap_stale(study, grace=10, log=lambda m: None)
    retry = sy._ask(study)
    assert retry.user_attrs.get("retry_of") == dead.number
    assert retry.suggest_int("toy_pass.level", 0, 5) == dead.params["toy_pass.level"]
    assert study.ask().user_attrs.get("seed")  # the seed comes next


def test_a_study_made_for_another_model_is_refused(tmp_path):
    storage, _ = st.open_storage(None, tmp_path / "s.journal")
    st.open_study(storage, "s", {"model": "a", "target": "cpu"}, sy.make_sampler())
    st.open_study(storage, "s", {"model": "a", "target": "cpu"}, sy.make_sampler())  # the same: joins
    with pytest.raises(UsageError, match="another model"):
        st.open_study(storage, "s", {"model": "b", "target": "cpu"}, sy.make_sampler())


def test_a_crash_record_keeps_the_python_frames_and_drops_a_cpp_errors_native_frames():
    from optc.errors import InternalError

    def the_crashing_frame():
        raise RuntimeError("Cannot call numel() on tensor with symbolic sizes/strides\n"
                           "Exception raised from throw_cannot_call_with_symbolic at TensorImpl.cpp:289\n"
                           + "".join(f"frame #{i}: at::native::op{i}(...) + 0x9d (0x7f in libtorch_cpu.so)\n"
                                     for i in range(80)))

    try:
        try:
            the_crashing_frame()
        except RuntimeError as exc:
            raise InternalError(f"pass x failed after []: RuntimeError: {str(exc).splitlines()[0]}") from exc
    except InternalError:
        record = sy.error_record()
    assert "the_crashing_frame" in record and "frame #" not in record and "Exception raised from" not in record
    assert record.rstrip().endswith("pass x failed after []: RuntimeError: Cannot call numel() on tensor with "
                                    "symbolic sizes/strides")
