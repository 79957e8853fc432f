"""Trials whose worker died: Optuna's heartbeat for journal files, and the processes of this host that are
gone."""
from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from typing import Any, Callable

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import JournalStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial, TrialState

from .disk_full import disk_full_cause

_logger = logging.getLogger(__name__)


HEARTBEAT_ATTR = "nasloc:heartbeat"


# ------------------------------------------------------------------------------------------- heartbeats
def log_stale_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Heartbeat-stale callback: the trial is already FAIL (it counts as finished); say so."""
    _logger.warning("trial %d of study %r was left RUNNING by a worker that stopped sending heartbeats; "
                    "marked FAIL", trial.number, study.study_name)


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """A journal storage with Optuna's heartbeat protocol (Optuna 5 only gives it to ``RDBStorage``).

    ``study.optimize`` runs a thread that calls :meth:`record_heartbeat` every ``heartbeat_interval``
    seconds while a trial runs; here that writes the wall-clock time into the trial's system attribute
    ``nasloc:heartbeat`` (one short journal line per interval). Before each trial, Optuna asks for
    :meth:`_get_stale_trial_ids` and marks those FAIL. Workers on several machines need roughly
    synchronised clocks (the grace period absorbs small skews). Trials that never recorded a
    heartbeat (created by ask/tell, e.g. by Ray) are never considered stale, as in ``RDBStorage``.
    """

    def __init__(
        self,
        backend: Any,
        *,
        heartbeat_interval: int = 30,
        grace_period: int | None = None,
        heartbeat_stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None,
    ) -> None:
        if heartbeat_interval <= 0:
            raise ValueError("heartbeat_interval must be a positive number of seconds")
        if grace_period is not None and grace_period <= 0:
            raise ValueError("grace_period must be a positive number of seconds")
        super().__init__(backend)
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.heartbeat_stale_trial_callback = heartbeat_stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
        except UpdateFinishedTrialError:
            pass  # another worker already declared this trial stale; the result will be rejected
        except OSError as e:  # a full disk: the search's next write stops the run in one line (storage.disk_full)
            if disk_full_cause(e) is None:
                raise

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        grace = self.grace_period if self.grace_period is not None else 2 * self.heartbeat_interval
        now = time.time()
        return [
            trial._trial_id
            for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
            if HEARTBEAT_ATTR in trial.system_attrs and now - trial.system_attrs[HEARTBEAT_ATTR] > grace
        ]

    def get_heartbeat_interval(self) -> int:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self.heartbeat_stale_trial_callback


# ------------------------------------------------------------------------------------------- stale trials
def fail_stale_trials(study: optuna.Study) -> None:
    """Mark FAIL the RUNNING trials whose worker is gone: a process of this host that no longer
    exists (at once), or any worker that stopped sending heartbeats (after the grace period)."""
    fail_orphaned_trials(study)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def this_worker() -> str:
    """This process as ``host:pid``, the ``worker`` user attribute of the trials it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


def fail_orphaned_trials(study: optuna.Study) -> None:
    """RUNNING trials started on this host by a process that has died (e.g. killed with SIGKILL) are
    marked FAIL right away, so an immediate rerun neither waits for the heartbeat grace period nor
    counts them as live. Other hosts' trials are left to the heartbeat."""
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker_host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
        if worker_host == host and pid.isdigit() and not process_alive(int(pid)):
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            _logger.warning("trial %d was left RUNNING by process %s, which has exited; marked FAIL", trial.number, pid)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
