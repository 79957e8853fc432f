"""A run's Optuna study and its trials, opened from the run's record (what ``nasloc export`` and ``RUN:TRIAL``
models read)."""
from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial

from ..run import RunDir, RunError, RunRecord
from .factory import open_storage


def load_run_study(run: RunDir, record: RunRecord) -> optuna.Study:
    """The run's Optuna study. Creates nothing: a storage file that is not there (here, or relative to the run
    folder) is a :class:`nasloc.errors.StorageError`, a missing study a :class:`nasloc.run.RunError`."""
    storage = open_storage(record.options.storage, create=False, base=run.root, heartbeat_interval=None)
    try:
        return optuna.load_study(study_name=record.study_name, storage=storage)
    except KeyError:
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage=storage))
        raise RunError(f"study {record.study_name} does not exist in {record.options.storage} "
                       f"(studies: {', '.join(names) or 'none'})") from None


def load_run_trial(run: RunDir, record: RunRecord, number: int) -> FrozenTrial:
    """Trial ``number`` of the run's study; :class:`nasloc.run.RunError` when there is none."""
    trials = {t.number: t for t in load_run_study(run, record).get_trials(deepcopy=False)}
    if number not in trials:
        span = f"trials: {min(trials)}-{max(trials)}" if trials else "it has no trials"
        raise RunError(f"trial {number} does not exist in study {record.study_name} ({span})")
    return trials[number]
