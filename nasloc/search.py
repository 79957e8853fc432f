"""The search engine: an Optuna study over a search space under a MACs budget.

One trial = one arch. The objective suggests the arch gene by gene (define-by-run, :meth:`SearchSpace.suggest`),
counts its MACs and parameters analytically, stores the arch on the trial and sets the budget constraint
``macs_budget = macs - budget_macs`` (feasible when <= 0) *before* anything is evaluated. An arch over
budget is not evaluated at all: it gets pessimistic values (top-1 0, its real MACs and params, infinite
latency) and costs only its storage writes. The sampler's random phase (all of random search, TPE's first
trials, NSGA-II's first population) is drawn within the budget and NSGA-II children over budget are
repaired into it (:class:`TrialSeededSampler`), so under a tight budget every random-search and NSGA-II
trial is evaluated.

Storage (:func:`open_storage`) is what makes a search persistent, resumable and shareable:

- ``sqlite:///results/run/study.db`` (the default of the command), ``postgresql://...`` or any SQLAlchemy URL
  → an RDB storage with a heartbeat: a worker killed with SIGKILL leaves its trial RUNNING, and the next
  worker (or rerun) marks it FAIL once it has missed its heartbeats for ``grace_period`` seconds.
- a plain file path (``study.log``, ``trials.jsonl``) → an Optuna journal file, the storage for several
  processes on one machine or on NFS. Optuna 5's ``JournalStorage`` has no heartbeat (only ``RDBStorage``
  and its cache implement ``BaseHeartbeat``), so :class:`HeartbeatJournalStorage` adds one: the heartbeat is
  a trial system attribute, rewritten every ``heartbeat_interval`` seconds while the trial runs.

Resume: ``n_trials`` is the total number of trials the study should hold, finished (COMPLETE or FAIL) or
running in some worker. Rerunning a finished search does nothing; an interrupted one continues to the total
(the trial that Ctrl-C interrupted is FAIL and counts as finished).

Several workers: start the same command several times (on one machine or many) against one journal file
or PostgreSQL database; together they stop at ``n_trials``, with unique trial numbers. ``workers=N`` in one
process is Optuna's ``n_jobs`` (threads): only worth it when ``evaluate`` releases the GIL and is
thread-safe. SQLite is fine for one process, not for several writers.

Seeds: the sampler of trial *k* is seeded with ``(seed, k)`` (:class:`TrialSeededSampler`), so one process
with a given seed always suggests the same archs, a resumed study does not replay the suggestions of its
first trials, and concurrent workers with the same seed do not suggest the same archs.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import random
import socket
import sqlite3
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.samplers import BaseSampler
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from .arch import Arch
from .flops import count
from .space import RandomChooser, ReplayChooser, SearchSpace, option_label

_logger = logging.getLogger(__name__)

#: Objective names and their directions. top1 is the proxy top-1 accuracy (%) with supernet weights.
OBJECTIVES: dict[str, str] = {"top1": "maximize", "macs": "minimize", "params": "minimize", "latency": "minimize"}
SAMPLERS = ("nsga2", "tpe", "random")
TPE_STARTUP_TRIALS = 10  # Optuna's default, set explicitly: the feasible start covers exactly these trials
CONSTRAINT = "macs_budget"
#: States that count towards ``n_trials``: done, or being run by some worker (or queued).
COUNTED_STATES = (TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING)
HEARTBEAT_ATTR = "nasloc:heartbeat"
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


class EvaluationError(RuntimeError):
    """``evaluate`` gave no usable accuracy (NaN or infinite): the trial fails, the search goes on."""


# ------------------------------------------------------------------------------------------- storage
def open_storage(
    url_or_path: str | Path,
    *,
    heartbeat_interval: int | None = 30,
    grace_period: int | None = 120,
) -> BaseStorage:
    """An Optuna storage from a URL or a file path, with a heartbeat either way.

    - Anything with ``://`` is an SQLAlchemy URL (``sqlite:///...``, ``postgresql://...``,
      ``mysql+pymysql://...``) → ``RDBStorage``; for SQLite the parent folder is created.
    - A file ending in .db/.sqlite/.sqlite3, or an existing file with an SQLite header, is SQLite.
    - Any other path (``study.log``, ``trials.jsonl``) is an Optuna journal file
      (``JournalStorage(JournalFileBackend(path))``, with the heartbeat of :class:`HeartbeatJournalStorage`).

    A trial whose worker died is marked FAIL by the next worker, or rerun, once it has missed its
    heartbeat for ``grace_period`` seconds (default 2 x interval when None). The grace period is
    generous because a loaded 2-core machine can starve the heartbeat thread.
    ``heartbeat_interval=None`` turns the heartbeat off (for ask/tell users such as Ray).
    """
    text = str(url_or_path)
    if "://" not in text:
        path = Path(text).expanduser().resolve()
        if path.suffix.lower() in SQLITE_SUFFIXES or _is_sqlite_file(path):
            text = f"sqlite:///{path}"
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            return HeartbeatJournalStorage(
                JournalFileBackend(str(path)),
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=log_stale_trial,
            )
    engine_kwargs: dict[str, Any] = {}
    if text.startswith("sqlite"):
        import sqlalchemy

        database = sqlalchemy.engine.make_url(text).database
        if database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            engine_kwargs = {"creator": functools.partial(_connect_sqlite, str(Path(database).expanduser()))}
    if heartbeat_interval is None:
        grace_period = None  # RDBStorage accepts a grace period only with a heartbeat
    return _rdb_storage(text, engine_kwargs, heartbeat_interval, grace_period)


def _rdb_storage(url: str, engine_kwargs: dict[str, Any], heartbeat_interval: int | None, grace_period: int | None,
                 attempts: int = 8) -> RDBStorage:
    """RDBStorage, retried: workers that open an empty PostgreSQL database at the same moment all try
    to create Optuna's tables, and all but one fail with a duplicate-key error; a retry finds them."""
    import sqlalchemy.exc

    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeat_interval is "experimental"
                return RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                    heartbeat_stale_trial_callback=log_stale_trial,  # Optuna 5's name for failed_trial_callback
                )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(random.uniform(0.2, 1.0) * (attempt + 1))
    raise AssertionError("unreachable")


def _connect_sqlite(database: str) -> sqlite3.Connection:
    """An SQLite connection for Optuna: write-ahead log, no fsync per commit, patient with locks.

    Optuna commits every suggestion and attribute separately (about 40 commits per trial here), and
    with SQLite's defaults each commit is an fsync: 16 ms on these machines, 0.6 s per trial. In WAL
    mode with synchronous=NORMAL a commit is durable against a crash of the process (not of the OS)
    and readers (optuna-dashboard) never block the writer. WAL needs a local disk, as SQLite itself
    does for several processes: use a journal file or PostgreSQL on NFS. The timeout covers the
    heartbeat thread writing while the main thread does.
    """
    connection = sqlite3.connect(database, timeout=60, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    return connection


def _is_sqlite_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


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
        heartbeat_interval: int | None = 30,
        grace_period: int | None = None,
        heartbeat_stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None,
    ) -> None:
        if heartbeat_interval is not None and heartbeat_interval <= 0:
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

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        assert self.heartbeat_interval is not None
        grace = self.grace_period if self.grace_period is not None else 2 * self.heartbeat_interval
        now = time.time()
        return [
            trial._trial_id
            for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
            if HEARTBEAT_ATTR in trial.system_attrs and now - trial.system_attrs[HEARTBEAT_ATTR] > grace
        ]

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self.heartbeat_stale_trial_callback


def fail_stale_trials(study: optuna.Study) -> None:
    """Mark FAIL the RUNNING trials whose worker is gone: a process of this host that no longer
    exists (at once), or any worker that stopped sending heartbeats (after the grace period)."""
    fail_orphaned_trials(study)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def this_worker() -> str:
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


# ------------------------------------------------------------------------------------------- samplers
def make_sampler(name: str, seed: int, population_size: int | None = None) -> BaseSampler:
    """``nsga2`` (NSGAIISampler), ``tpe`` (TPESampler) or ``random`` (RandomSampler), seeded.

    ``population_size`` is NSGA-II's (Optuna's default, 50, when None); the others ignore it.
    """
    if name == "nsga2":
        kwargs = {} if population_size is None else {"population_size": population_size}
        return optuna.samplers.NSGAIISampler(seed=seed, **kwargs)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=TPE_STARTUP_TRIALS)  # keyword-only in Optuna 5
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")


def default_population_size(n_trials: int) -> int:
    """NSGA-II population for a search of ``n_trials``: about four generations, 8 to 50 archs.

    Optuna's default of 50 would make a 60-trial search a random search with 10 children.
    """
    return max(8, min(50, n_trials // 4))


def resolve_population_size(study: optuna.Study, sampler: str, population_size: int | None, n_trials: int) -> int | None:
    """NSGA-II's population: as asked, else as the study was started with, else the default for ``n_trials``.

    Kept in the study (user attribute ``nsga2_population_size``) so that a resumed search keeps its
    generations even when it is resumed with another ``n_trials``.
    """
    if sampler != "nsga2":
        return population_size
    size = population_size or study.user_attrs.get("nsga2_population_size") or default_population_size(n_trials)
    if "nsga2_population_size" not in study.user_attrs:
        study.set_user_attr("nsga2_population_size", int(size))
    return int(size)


def trial_seed(seed: int, number: int) -> int:
    """The sampler seed of trial ``number`` (independent streams for different trials)."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


class TrialSeededSampler(BaseSampler):
    """A sampler whose randomness depends only on (seed, trial number), with an optional feasible start.

    Optuna samplers keep no state between trials but their random generator (populations, TPE
    models and NSGA-II generations are rebuilt from the storage). Each trial therefore gets a fresh
    ``make_sampler(name, trial_seed(seed, trial.number))``: a sequential search is reproducible, a
    resumed one does not replay its first suggestions (a plain ``RandomSampler(seed)`` would) and
    concurrent workers do not suggest the same archs.

    Budget-aware proposals (when ``space`` and ``budget_macs`` are given):

    - feasible start: the trials a sampler would draw uniformly at random (all of random search, TPE's
      first :data:`TPE_STARTUP_TRIALS`, NSGA-II's first population) are drawn at random *within budget*
      (:meth:`SearchSpace.decisions_in_band`);
    - repaired children: a joint proposal (an NSGA-II child) over budget is walked into the budget,
      one gene re-drawn at a time, the fewest changes that get there (the repair of constrained
      evolutionary NAS). TPE proposes gene by gene, so it is left to learn the constraint.

    Under a tight budget most uniform archs and most children are over it and would never be
    evaluated; this way every random-search and NSGA-II trial is evaluated.
    """

    def __init__(self, name: str, seed: int, population_size: int | None = None, *,
                 space: SearchSpace | None = None, budget_macs: float | None = None):
        make_sampler(name, seed, population_size)  # unknown names fail here
        if (space is None) != (budget_macs is None):
            raise ValueError("a feasible start needs both space and budget_macs")
        self.name, self.seed, self.population_size = name, int(seed), population_size
        self.space, self.budget_macs = space, budget_macs
        self._lock = threading.Lock()
        self._samplers: dict[int, BaseSampler] = {}
        self._plans: dict[int, dict[str, Any]] = {}  # in-budget decisions (Optuna labels) per trial number

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        state["_samplers"], state["_plans"] = {}, {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"TrialSeededSampler({self.name!r}, seed={self.seed}, population_size={self.population_size})"

    def _for(self, trial: FrozenTrial, release: bool = False) -> BaseSampler:
        with self._lock:
            sampler = self._samplers.pop(trial.number, None) if release else self._samplers.get(trial.number)
            if sampler is None:
                sampler = make_sampler(self.name, trial_seed(self.seed, trial.number), self.population_size)
                if not release:
                    self._samplers[trial.number] = sampler
                    while len(self._samplers) > 1024:  # trials that never finished (killed)
                        del self._samplers[next(iter(self._samplers))]
            return sampler

    def startup_trials(self) -> float:
        """How many first trials the wrapped sampler draws at random (all of them for random search)."""
        if self.name == "tpe":
            return TPE_STARTUP_TRIALS
        if self.name == "nsga2":
            return self.population_size or 50  # NSGAIISampler's default population
        return math.inf

    def _plan(self, trial: FrozenTrial, proposal: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The trial's in-budget decisions (Optuna labels), planned once: a feasible start, or ``proposal``
        (labels of some genes) completed at random and repaired into the budget. None: nothing planned."""
        with self._lock:
            plan = self._plans.get(trial.number)
        if plan is not None or self.space is None:
            return plan
        if proposal is None and trial.number >= self.startup_trials():
            return None
        rng = random.Random(trial_seed(self.seed, trial.number))
        start = None if proposal is None else ReplayChooser(proposal, RandomChooser(rng), labels=True)
        decisions = self.space.decisions_in_band(rng, 0.0, float(self.budget_macs), start=start)
        plan = {name: option_label(value) for name, value in decisions.items()}
        with self._lock:
            self._plans[trial.number] = plan
            while len(self._plans) > 1024:  # trials that never finished (killed)
                del self._plans[next(iter(self._plans))]
        return plan

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        # Always asked, even when the proposal is not used: NSGA-II records the trial's generation here.
        proposal = self._for(trial).sample_relative(study, trial, search_space)
        if self._plan(trial) is not None:
            return {}  # a feasible start: every gene comes from the plan, through sample_independent
        if self.space is None or not proposal:
            return proposal
        plan = self._plan(trial, proposal)
        return {name: plan.get(name, label) for name, label in proposal.items()}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: Any) -> Any:
        plan = self._plan(trial)
        if plan is not None and plan.get(param_name) in getattr(param_distribution, "choices", ()):
            return plan[param_name]
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._for(trial).before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        with self._lock:
            self._plans.pop(trial.number, None)
        self._for(trial, release=True).after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        pass  # Optuna calls this per thread with n_jobs > 1; the seed is already per trial


# ------------------------------------------------------------------------------------------- objective
def check_objectives(objectives: Sequence[str], latency: Any = None) -> tuple[str, ...]:
    objectives = tuple(objectives)
    unknown = [o for o in objectives if o not in OBJECTIVES]
    if unknown or not objectives or len(set(objectives)) != len(objectives):
        raise ValueError(f"objectives {list(objectives)}: choose distinct names from {', '.join(OBJECTIVES)}")
    if "latency" in objectives and latency is None:
        raise ValueError("the latency objective needs a latency function (arch -> seconds or ms)")
    return objectives


def pessimistic_values(objectives: Sequence[str], macs: int, params: int) -> list[float]:
    """Values of an arch that was not evaluated: real MACs and params, top-1 0 and infinite latency."""
    known = {"top1": 0.0, "macs": float(macs), "params": float(params), "latency": math.inf}
    return [known[o] for o in objectives]


def record_arch(trial: Any, arch: Arch, budget_macs: float) -> tuple[int, int]:
    """Store the arch and its cost on ``trial`` and set the budget constraint; returns (macs, params).

    Shared by the plain objective and the Ray backend, so both leave the same user attributes.
    """
    cost = count(arch)
    trial.set_user_attr("arch", arch.to_dict())
    trial.set_user_attr("arch_json", arch.to_json())
    trial.set_user_attr("macs", int(cost.macs))
    trial.set_user_attr("params", int(cost.params))
    trial.set_constraint(CONSTRAINT, float(cost.macs - budget_macs))
    return int(cost.macs), int(cost.params)


class Objective:
    """The Optuna objective of a search (picklable when ``evaluate`` and ``latency`` are).

    ``evaluate(arch) -> top-1 %`` (proxy accuracy; NaN allowed, the trial then fails) and the optional
    ``latency(arch) -> float`` run only for archs within budget. User attributes left on every trial:
    ``arch`` (dict), ``arch_json``, ``macs``, ``params``, ``worker`` (host:pid), ``evaluated``; and, when evaluated,
    ``top1``, ``eval_seconds`` (and ``latency``); ``fail_reason`` for a failed evaluation.
    """

    def __init__(
        self,
        space: SearchSpace,
        evaluate: Callable[[Arch], float],
        *,
        budget_macs: float,
        objectives: Sequence[str] = ("top1", "macs"),
        latency: Callable[[Arch], float] | None = None,
    ):
        self.space, self.evaluate, self.latency = space, evaluate, latency
        self.budget_macs = float(budget_macs)
        self.objectives = check_objectives(objectives, latency)

    def __call__(self, trial: optuna.Trial) -> list[float]:
        arch = self.space.suggest(trial)
        macs, params = record_arch(trial, arch, self.budget_macs)  # the constraint is set before evaluating
        if macs > self.budget_macs:
            trial.set_user_attr("evaluated", False)
            return pessimistic_values(self.objectives, macs, params)
        start = time.perf_counter()
        top1 = float(self.evaluate(arch))
        trial.set_user_attr("eval_seconds", time.perf_counter() - start)
        trial.set_user_attr("evaluated", True)
        if not math.isfinite(top1):
            reason = f"evaluate returned top-1 {top1}"
            trial.set_user_attr("fail_reason", reason)
            raise EvaluationError(reason)
        trial.set_user_attr("top1", top1)
        values = {"top1": top1, "macs": float(macs), "params": float(params)}
        if "latency" in self.objectives:
            assert self.latency is not None
            values["latency"] = float(self.latency(arch))
            trial.set_user_attr("latency", values["latency"])
        return [values[o] for o in self.objectives]


# ------------------------------------------------------------------------------------------- study
def open_study(
    storage: str | Path | BaseStorage,
    study_name: str,
    *,
    objectives: Sequence[str],
    budget_macs: float,
    sampler: BaseSampler | None = None,
    meta: dict[str, Any] | None = None,
) -> optuna.Study:
    """Create the study, or load it to resume; a resumed study must have the same objectives and budget.

    The budget, objectives and ``meta`` are stored as study user attributes when it is created. A
    different budget is refused: the feasibility of every stored trial was set against the old one.
    """
    objectives = tuple(objectives)
    if not isinstance(storage, BaseStorage):
        storage = open_storage(storage)
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        sampler=sampler,
        directions=[OBJECTIVES[o] for o in objectives],
        load_if_exists=True,
    )
    if study.metric_names is not None and tuple(study.metric_names) != objectives:
        raise ValueError(f"study {study_name!r} has objectives {study.metric_names}, not {list(objectives)}; "
                         "use another study (run) name")
    expected = [optuna.study.StudyDirection[OBJECTIVES[o].upper()] for o in objectives]
    if list(study.directions) != expected:
        raise ValueError(f"study {study_name!r} has {len(study.directions)} objective directions that do not match "
                         f"{list(objectives)}; use another study (run) name")
    stored = study.user_attrs.get("budget_macs")
    if stored is not None and not math.isclose(float(stored), float(budget_macs), rel_tol=1e-9):
        raise ValueError(f"study {study_name!r} was searched with a budget of {float(stored):.6g} MACs, not "
                         f"{float(budget_macs):.6g}: its trials' feasibility is set against the old budget; "
                         "use another study (run) name")
    if study.metric_names is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            study.set_metric_names(list(objectives))
    if stored is None:
        study.set_user_attr("budget_macs", float(budget_macs))
        study.set_user_attr("macs_convention", "1 multiply-add = 1 FLOP, per image at the space's deploy resolution")
        for key, value in (meta or {}).items():
            study.set_user_attr(key, value)
    return study


def counted_trials(study: optuna.Study) -> int:
    """Trials that count towards ``n_trials``: finished (COMPLETE, FAIL), running or waiting."""
    return len(study.get_trials(deepcopy=False, states=COUNTED_STATES))


def trials_to_start(study: optuna.Study, n_trials: int) -> int:
    """How many trials a worker should start so that the study holds ``n_trials``: queued (WAITING) trials
    are not subtracted, since starting a trial runs a queued one first."""
    return n_trials - len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING)))


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)))


class _Budgeted:
    """The objective, guarded so that concurrent workers stop at exactly ``n_trials``.

    A trial numbered k is surplus when the trials numbered below k that count already reach
    ``n_trials`` (two workers asked for a trial at once near the end). It is then PRUNED before
    anything is suggested, does not count, and the worker stops. Trial numbers are assigned by the
    storage, so exactly one of two racing workers wins.
    """

    def __init__(self, objective: Callable[[optuna.Trial], Any], n_trials: int):
        self.objective, self.n_trials = objective, n_trials

    def __call__(self, trial: optuna.Trial) -> Any:
        # First of all, so that a rerun can tell this trial's process died (see fail_orphaned_trials).
        trial.set_user_attr("worker", this_worker())
        before = sum(1 for t in trial.study.get_trials(deepcopy=False, states=COUNTED_STATES) if t.number < trial.number)
        if before >= self.n_trials:
            trial.set_user_attr("surplus", True)
            trial.study.stop()
            raise optuna.TrialPruned(f"surplus: the study already has {self.n_trials} trials")
        return self.objective(trial)


class _AfterTrial:
    """Callback: stop when the study holds ``n_trials`` (all workers together); drive the progress bar."""

    def __init__(self, study: optuna.Study, n_trials: int, progress: bool):
        self.n_trials = n_trials
        self._lock = threading.Lock()
        self.bar = None
        self.best = best_feasible_top1(study)
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=n_trials, initial=finished_trials(study), unit="trial",
                            desc=f"search {study.study_name}", dynamic_ncols=True)
            self._postfix()

    def _postfix(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str("best feasible top1 " + ("-" if self.best is None else f"{self.best:.2f}%"))

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if counted_trials(study) >= self.n_trials:
            study.stop()
        with self._lock:
            top1 = trial.user_attrs.get("top1")
            if trial.state == TrialState.COMPLETE and top1 is not None and is_feasible(trial):
                self.best = top1 if self.best is None else max(self.best, top1)
            if self.bar is not None:
                self.bar.n = min(finished_trials(study), self.n_trials)
                self._postfix()
                self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextmanager
def _optuna_quiet(quiet: bool) -> Iterator[None]:
    """Optuna logs every trial at INFO; with a progress bar that is noise."""
    if not quiet:
        yield
        return
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(max(level, optuna.logging.WARNING))
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


def run_search(
    space: SearchSpace,
    evaluate: Callable[[Arch], float],
    *,
    budget_macs: float,
    storage: str | Path | BaseStorage,
    study_name: str,
    n_trials: int,
    sampler: str = "nsga2",
    seed: int = 0,
    objectives: Sequence[str] = ("top1", "macs"),
    latency: Callable[[Arch], float] | None = None,
    progress: bool = True,
    workers: int = 1,
    population_size: int | None = None,
) -> optuna.Study:
    """Search ``space`` under ``budget_macs`` until the study holds ``n_trials`` trials; returns the study.

    ``storage``: a URL or path for :func:`open_storage`, or an Optuna storage. ``n_trials`` counts the
    trials already in the study (finished or running): a rerun resumes, a finished study is returned as
    is. ``workers`` threads share this process (Optuna's ``n_jobs``); for more processes start this
    again against the same journal file or database. NSGA-II's population defaults to
    :func:`default_population_size` and is kept in the study so that a resumed search keeps it.
    A NaN accuracy fails its trial and the search goes on; any other exception from ``evaluate``
    stops the search (the trial is FAIL, rerun to resume).
    """
    if n_trials < 0:
        raise ValueError("n_trials must be >= 0")
    if workers < 1:
        raise ValueError("workers must be >= 1")
    objective = Objective(space, evaluate, budget_macs=budget_macs, objectives=objectives, latency=latency)
    study = open_study(storage, study_name, objectives=objective.objectives, budget_macs=budget_macs,
                       meta={"space": space.name, "sampler": sampler, "seed": seed})
    study.sampler = TrialSeededSampler(sampler, seed, resolve_population_size(study, sampler, population_size, n_trials),
                                       space=space, budget_macs=budget_macs)
    fail_stale_trials(study)
    remaining = trials_to_start(study, n_trials)
    if remaining <= 0:
        return study
    after = _AfterTrial(study, n_trials, progress)
    try:
        with _optuna_quiet(progress):
            study.optimize(
                _Budgeted(objective, n_trials),
                n_trials=remaining,
                n_jobs=workers,
                catch=(EvaluationError,),
                callbacks=[after],
                gc_after_trial=False,
                show_progress_bar=False,
            )
    finally:
        after.close()
    return study


# ------------------------------------------------------------------------------------------- results
def is_feasible(trial: FrozenTrial, budget_macs: float | None = None) -> bool | None:
    """Within budget? Against ``budget_macs`` when given (from the stored MACs), else the stored constraint.

    None when the trial has no MACs yet (it failed or was cut before its arch was suggested).
    """
    macs = trial.user_attrs.get("macs")
    if budget_macs is not None:
        return None if macs is None else macs <= budget_macs
    constraint = trial.constraints.get(CONSTRAINT)
    return None if constraint is None else constraint <= 0


def evaluated_feasible_trials(study: optuna.Study, budget_macs: float) -> list[FrozenTrial]:
    """COMPLETE trials within ``budget_macs`` that have a proxy accuracy."""
    return [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.user_attrs.get("top1") is not None and is_feasible(t, budget_macs)
    ]


def pareto_trials(study: optuna.Study, budget_macs: float) -> list[FrozenTrial]:
    """Feasible evaluated trials on the Pareto front of (max top1, min MACs), by increasing MACs.

    Computed here (not ``study.best_trials``, whose feasibility handling changed in Optuna 5) over
    the evaluated trials within ``budget_macs``, which may be tighter than the search budget. Of
    several trials with the same MACs and top1 (the same arch twice) the first is kept.
    """
    front: list[FrozenTrial] = []
    best = -math.inf
    for trial in sorted(evaluated_feasible_trials(study, budget_macs),
                        key=lambda t: (t.user_attrs["macs"], -t.user_attrs["top1"], t.number)):
        if trial.user_attrs["top1"] > best:
            front.append(trial)
            best = trial.user_attrs["top1"]
    return front


def best_feasible_top1(study: optuna.Study, budget_macs: float | None = None) -> float | None:
    budget = budget_macs if budget_macs is not None else study.user_attrs.get("budget_macs", math.inf)
    tops = [t.user_attrs["top1"] for t in evaluated_feasible_trials(study, budget)]
    return max(tops) if tops else None
