"""`optc search` end to end on tiny-llama on the CPU: resuming a study, refusing a
study made for something else, exit 3, and workers sharing a study on a real
PostgreSQL server while one of them is killed with SIGKILL mid-trial."""

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from cli_process import optc_cli

pytestmark = pytest.mark.slow

# Decode steps timed per measurement: the tests check what a study keeps and reports, not
# the latency, and every run on one study must time the same workload.
TOKENS = ["--tokens", "8"]


def test_search_resumes_the_same_study_and_reports_a_front(tmp_path):
    args = ["search", "tiny-llama", "--target", "cpu", "--trials", "2", "-o", str(tmp_path), "--json", "--seed", "1",
            *TOKENS]
    first = optc_cli(*args, "--no-artifact", timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    second = optc_cli(*args, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    out = json.loads(second.stdout)
    assert out["n_trials"] == 4 and out["study"] == "tiny-llama-cpu"
    assert out["storage"].endswith("tiny-llama-cpu.journal")
    assert out["pareto"] and all({"config", "latency_ms", "quality_loss"} <= set(r) for r in out["pareto"])
    assert out["dense"] is not None and out["dense"]["latency_source"] == "measured"
    assert out["best"]["quality_loss"] <= 0.05 and os.path.exists(out["best"]["artifact"])
    assert out["best"]["quality_full"]["windows"] == out["best"]["quality_full"]["of"]
    shipped = optc_cli("inspect", out["best"]["artifact"], "--json", timeout=300)  # its members' hashes checked
    assert shipped.returncode == 0, shipped.stderr[-2000:]
    carried = json.loads(shipped.stdout)  # what `optc compile` ships: the kernel cache, the CPU packages
    assert carried["kernel_cache"]["member"] and carried["packages"]["format"] == "aoti"
    assert all("member" in rec for rec in carried["packages"]["programs"].values())
    assert os.path.getsize(out["plot"]) > 1000
    assert "trial 2 of 2 in this worker" in second.stderr
    if out["best"]["passes"]:  # timed again beside dense, alternating, in this process
        confirmed = out["confirmed"]
        assert len(confirmed["round_medians_ms"]["best"]) == len(confirmed["round_medians_ms"]["dense"]) == 3
        assert confirmed["best_ms"] > 0 and confirmed["dense_ms"] > 0
        assert "timed again side by side" in second.stderr
    else:
        assert out["confirmed"] is None
    assert out["not_shipped"] == []


def test_a_study_for_another_space_is_refused_and_no_feasible_result_exits_3(tmp_path):
    base = ["search", "tiny-llama", "--target", "cpu", "-o", str(tmp_path), "--json", *TOKENS]
    empty = optc_cli(*base, "--trials", "0", timeout=900)
    assert empty.returncode == 3, empty.stderr[-2000:]
    assert "no measured configuration meets" in empty.stderr
    other = optc_cli(*base, "--trials", "1", "--set", "skip_layers.granularity=block", timeout=900)
    assert other.returncode == 2, other.stderr[-2000:]
    assert "was created for another space" in other.stderr
    bad = optc_cli("search", "tiny-llama", "--target", "cpu", "--storage", "ftp://nowhere", "--trials", "1",
                   timeout=900)
    assert bad.returncode == 2 and "--storage ftp://nowhere" in bad.stderr


def test_workers_on_postgres_lose_no_trial_when_one_is_killed(tmp_path, postgres_db_url):
    env = {"OPTC_SEARCH_HEARTBEAT_S": "1", "OPTC_SEARCH_GRACE_S": "6"}
    argv = [sys.executable, "-m", "optc.cli", "search", "tiny-llama", "--target", "cpu", "--storage",
            postgres_db_url, "--study", "shared", "-o", str(tmp_path), "--worker", "--seed", "3", *TOKENS]
    # Two workers on two cores: the victim, and one that carries on while it dies.
    workers = [subprocess.Popen(argv + ["--trials", "2"], env={**os.environ, **env}, stderr=subprocess.DEVNULL)
               for _ in range(2)]
    victim = workers[0]
    study = _wait_for_study(postgres_db_url)
    killed_trial = _wait_running(study, f":{victim.pid}")
    before = {t.number for t in study.get_trials(states=(TrialState.COMPLETE,))}
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = time.time()
    for w in workers[1:]:
        assert w.wait(timeout=900) == 0
    # Past the grace period since the kill: the killed worker's trial is stale now (the
    # other worker's trials usually took longer than that already).
    time.sleep(max(0.0, killed_at + 7 - time.time()))
    again = optc_cli("search", "tiny-llama", "--target", "cpu", "--storage", postgres_db_url, "--study", "shared",
                     "-o", str(tmp_path), "--trials", "1", "--no-artifact", "--json", *TOKENS, env=env, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    trials = {t.number: t for t in study.get_trials()}
    assert before <= {n for n, t in trials.items() if t.state == TrialState.COMPLETE}  # nothing completed was lost
    assert trials[killed_trial].state == TrialState.FAIL and "stale heartbeat" in trials[killed_trial].user_attrs["failed"]
    retries = [t for t in trials.values() if t.user_attrs.get("retry_of") == killed_trial]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == trials[killed_trial].params
    assert not [t for t in trials.values() if t.state == TrialState.RUNNING]
    measured = [t.user_attrs["config_hash"] for t in trials.values()
                if t.state == TrialState.COMPLETE and t.user_attrs.get("latency_source") == "measured"
                and "copy_of" not in t.user_attrs]
    assert len(measured) == len(set(measured))  # no finished configuration measured twice


def _wait_for_study(url, timeout=300):
    storage = optuna.storages.RDBStorage(url)
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            return optuna.load_study(study_name="shared", storage=storage)
        except KeyError:
            time.sleep(0.5)
    raise AssertionError("no worker created the study")


def _wait_running(study, worker_suffix, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        for t in study.get_trials(states=(TrialState.RUNNING,)):
            # killed once its configuration is fully chosen (config_hash is written after suggest)
            if t.user_attrs.get("worker", "").endswith(worker_suffix) and "config_hash" in t.user_attrs:
                return t.number
        time.sleep(0.2)
    raise AssertionError("the worker never ran a trial")


def test_workers_split_the_trials_and_share_one_journal(tmp_path):
    out = optc_cli("search", "tiny-llama", "--target", "cpu", "--workers", "2", "--trials", "2", "-o", str(tmp_path),
                   "--no-artifact", "--json", *TOKENS, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["n_trials"] == 2 and result["storage"].endswith("tiny-llama-cpu.journal")
    assert "worker 0 (cpu): 1 trials" in out.stderr and "worker 1 (cpu): 1 trials" in out.stderr
    study = optuna.load_study(study_name="tiny-llama-cpu", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(result["storage"])))
    assert len({t.user_attrs["worker"] for t in study.get_trials(states=(TrialState.COMPLETE,))}) == 2


def test_one_worker_per_visible_gpu(monkeypatch):
    from optc import search

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert search._visible_gpus() == ["0", "1"]
    req = search.SearchRequest("llama-1b", target="h200", trials=5, storage="postgresql://h/db", workers=2,
                               fixed={"skip_layers": {"granularity": "block"}})
    argv = search._worker_argv(req, "s", 3)
    assert argv[argv.index("--trials") + 1] == "3" and "--worker" in argv
    assert argv[argv.index("--set") + 1] == 'skip_layers.granularity="block"'
