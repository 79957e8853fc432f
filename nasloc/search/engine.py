"""The search engine: an Optuna study over a search space under a MACs budget.

One trial = one arch. The objective suggests the arch gene by gene (define-by-run, :meth:`SearchSpace.suggest`),
counts its MACs and parameters analytically, stores the arch on the trial and sets the budget constraint
``macs_budget = macs - budget_macs`` (feasible when <= 0) *before* anything is evaluated; under a latency budget
also ``latency_budget = predicted ms - budget`` (the latency table's prediction, :mod:`nasloc.deploy.latency`). An
arch over budget is not evaluated at all: it gets pessimistic values (top-1 0, its real MACs and params, infinite
latency) and costs only its storage writes. The sampler's random phase (all of random search, TPE's first
trials, NSGA-II's first population) is drawn within the budget and NSGA-II children over budget are
repaired into it (:class:`nasloc.search.sampler.TrialSeededSampler`), so under a tight budget every random-search
and NSGA-II trial is evaluated.

Warm start: ``run_search(warm_start={name: arch})`` queues those archs (the seed designs at the budget,
:func:`nasloc.space.seed_designs.reference_archs`) as the first trials of a new study (:func:`enqueue_warm_start`), so
NSGA-II's first population holds them and its children explore their neighbourhoods.

The study lives in an Optuna storage (:func:`nasloc.storage.factory.open_storage`: SQLite, PostgreSQL or a journal
file, with heartbeats), which makes a search persistent, resumable and shareable.

Resume: ``n_trials`` is the total number of trials the study should hold, finished (COMPLETE or FAIL) or
running in some worker. Rerunning a finished search does nothing; an interrupted one continues to the total
(the trial that Ctrl-C interrupted is FAIL and counts as finished).

Several workers: start the same command several times (on one machine or many) against one journal file
or PostgreSQL database; together they stop at ``n_trials``, with unique trial numbers. ``workers=N`` in one
process is Optuna's ``n_jobs`` (threads): only worth it when ``evaluate`` releases the GIL and is
thread-safe.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from ..arch import Arch
from ..space.search_space import SearchSpace
from ..storage.heartbeat import fail_stale_trials, this_worker
from .budget import LatencyBudget
from .objective import EvaluationError, Objective
from .sampler import TrialSeededSampler, resolve_population_size
from .study import (
    COUNTED_STATES,
    best_feasible_top1,
    enqueue_warm_start,
    finished_trials,
    is_feasible,
    open_study,
    optuna_quiet,
    trials_to_start,
)


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
    """Callback: stop when ``n_trials`` are finished or running (all workers together; queued trials are still
    to be run); drive the progress bar."""

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
        if trials_to_start(study, self.n_trials) <= 0:
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
    latency_budget: LatencyBudget | None = None,
    progress: bool = True,
    workers: int = 1,
    population_size: int | None = None,
    warm_start: dict[str, Arch] | None = None,
) -> optuna.Study:
    """Search ``space`` under ``budget_macs`` until the study holds ``n_trials`` trials; returns the study.

    ``storage``: a URL or path for :func:`open_storage`, or an Optuna storage. ``n_trials`` counts the
    trials already in the study (finished or running): a rerun resumes, a finished study is returned as
    is. ``workers`` threads share this process (Optuna's ``n_jobs``); for more processes start this
    again against the same journal file or database. NSGA-II's population defaults to
    :func:`nasloc.search.sampler.default_population_size` and is kept in the study so that a resumed search keeps it.
    A NaN accuracy fails its trial and the search goes on; any other exception from ``evaluate``
    stops the search (the trial is FAIL, rerun to resume). ``warm_start`` ({name: arch}, e.g. the seed
    designs at the budget) become the first trials of a new study (:func:`enqueue_warm_start`).
    ``latency_budget`` is a second budget (the latency table's prediction), kept like the MACs one: by the
    sampler, and by a constraint set before any evaluation.
    """
    if n_trials < 0:
        raise ValueError("n_trials must be >= 0")
    if workers < 1:
        raise ValueError("workers must be >= 1")
    objective = Objective(space, evaluate, budget_macs=budget_macs, objectives=objectives, latency=latency,
                          latency_budget=latency_budget)
    limit_ms = None if latency_budget is None else latency_budget.limit_ms
    study = open_study(storage, study_name, objectives=objective.objectives, budget_macs=budget_macs,
                       meta={"space": space.name, "sampler": sampler, "seed": seed}, latency_budget_ms=limit_ms)
    study.sampler = TrialSeededSampler(sampler, seed, resolve_population_size(study, sampler, population_size, n_trials),
                                       space=space, budget_macs=budget_macs, latency_budget=latency_budget)
    fail_stale_trials(study)
    enqueue_warm_start(study, space, warm_start or {}, n_trials)
    remaining = trials_to_start(study, n_trials)
    if remaining <= 0:
        return study
    after = _AfterTrial(study, n_trials, progress)
    try:
        with optuna_quiet(progress):
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
