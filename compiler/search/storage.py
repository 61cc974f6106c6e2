"""Where a study lives, and keeping it whole when workers die.

- A journal file (the default, no server) or any SQLAlchemy URL Optuna's RDBStorage
  takes (postgresql://... for many hosts, sqlite:///... for one).
- A study remembers what it was created for (model, target, search space): opening it
  for anything else is refused, never mixed.
- Heartbeats: Optuna's own work with `optimize()` only and not on journals, and the
  search drives trials with ask/tell, so each running trial writes a timestamp into its
  user attributes; any worker fails the trials whose timestamp went stale (their worker
  was killed) and enqueues the same configuration again.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from optc.errors import UsageError

HEARTBEAT_S = 10.0
GRACE_S = 60.0  # a trial whose heartbeat is older than this is taken for dead


def check_url(url: str | None) -> None:
    """Refuse a --storage URL of a kind optc does not open (cheap: before a model loads)."""
    if url is not None and "://" in url and not url.startswith(("postgresql", "sqlite", "mysql")):
        raise UsageError(f"--storage {url}: expected a journal file path, postgresql://..., or sqlite:///...")


def open_storage(url: str | None, default_path: Path):
    """An Optuna storage for `url`: None or a file path -> a journal file."""
    check_url(url)
    if url is None or "://" not in url:
        path = Path(url) if url else default_path
        path.parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(str(path))), str(path)
    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    except Exception as exc:  # a bad URL, no server, no driver: say which
        raise UsageError(f"--storage {url}: cannot open the study database ({type(exc).__name__}: {exc})") from None
    return storage, url


def open_study(storage, name: str, signature: dict, sampler) -> optuna.Study:
    """Create or join the study `name`; refuse one created for another model, target or
    search space (exit 2)."""
    study = optuna.create_study(storage=storage, study_name=name, directions=["minimize", "minimize"],
                                sampler=sampler, load_if_exists=True)
    theirs = study.user_attrs.get("optc")
    if theirs is None:
        study.set_user_attr("optc", signature)
        theirs = signature
    if theirs != signature:
        diff = sorted(k for k in set(theirs) | set(signature) if theirs.get(k) != signature.get(k))
        raise UsageError(f"study '{name}' was created for another {', '.join(diff)} "
                         f"({', '.join(f'{k}={theirs.get(k)!r}' for k in diff if k != 'space')}); "
                         "use another --study name or storage")
    return study


class Heartbeat:
    """Writes `heartbeat` into a running trial's user attributes every HEARTBEAT_S."""

    def __init__(self, study: optuna.Study, trial_id: int, interval: float = HEARTBEAT_S):
        self._storage, self._id, self._interval = study._storage, trial_id, interval
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _beat(self):
        try:
            self._storage.set_trial_user_attr(self._id, "heartbeat", time.time())
        except Exception:  # the trial finished meanwhile, or the database blinked: next beat
            pass

    def _run(self):
        while not self._stop.wait(self._interval):
            self._beat()

    def stop(self):
        self._stop.set()
        self._thread.join()


def reap_stale(study: optuna.Study, grace: float = GRACE_S, log=print) -> int:
    """Fail the running trials whose heartbeat is older than `grace` and enqueue their
    configuration again; returns how many. Exactly one worker wins each trial: the
    storage refuses to finish a trial twice."""
    now, reaped = time.time(), 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beat = trial.user_attrs.get("heartbeat")
        if beat is None and trial.datetime_start is not None:
            beat = trial.datetime_start.timestamp()
        if beat is None or now - beat <= grace:
            continue
        if not fail_and_requeue(study, trial, "its worker stopped (stale heartbeat)"):
            continue  # another worker reaped it, or it finished just now
        log(f"[optc] trial {trial.number}: its worker stopped; failed it and queued its configuration again")
        reaped += 1
    return reaped


def fail_and_requeue(study: optuna.Study, trial, why: str) -> bool:
    """Fail a running trial (a Trial or FrozenTrial) and enqueue its configuration again
    (`retry_of`): its suggested settings and those it was enqueued with, so an interrupted
    seed (the dense model) runs again. False when it was finished by someone else first."""
    try:
        study._storage.set_trial_user_attr(trial._trial_id, "failed", why)
        study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    frozen = study._storage.get_trial(trial._trial_id)
    params = {**frozen.system_attrs.get("fixed_params", {}), **frozen.params}
    study.enqueue_trial(params, user_attrs={"retry_of": frozen.number})
    return True
