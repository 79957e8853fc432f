"""The budget-aware sampler of a search: Optuna's samplers, seeded per trial and kept within the MACs budget (and
the latency budget, when there is one).

Seeds: the sampler of trial *k* is seeded with ``(seed, k)`` (:class:`TrialSeededSampler`), so one process
with a given seed always suggests the same archs, a resumed study does not replay the suggestions of its
first trials, and concurrent workers with the same seed do not suggest the same archs.

Budget: under a tight budget most uniform archs and most NSGA-II children are over it and would never be
evaluated. Two strategies, composed by the sampler as Optuna's NSGA-II composes its crossover and selection,
keep proposals within it: :class:`FeasibleStart` draws the trials a sampler would draw uniformly at random
within the budget, and :class:`BudgetRepair` walks an over-budget joint proposal (an NSGA-II child) into it.
Under a :class:`LatencyBudget` too (the latency table's prediction), both draw again under a lower MACs bound
until the arch is within it as well.

Enqueued trials (``study.enqueue_trial``, e.g. the seed designs of a warm start) run as they were queued:
the strategies leave them alone, and NSGA-II counts them in their generation (:meth:`TrialSeededSampler.before_trial`).
"""
from __future__ import annotations

import random
import threading
from typing import Any, Callable, Sequence

import numpy as np
import optuna
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from ..space.search_space import SearchSpace
from .budget import BudgetRepair, FeasibleStart, LatencyBudget

SAMPLERS = ("nsga2", "tpe", "random")
TPE_STARTUP_TRIALS = 10  # Optuna's default, set explicitly: the feasible start covers exactly these trials
_MAX_PENDING = 1024  # per-trial state kept for trials that never finished (killed) before the oldest is dropped


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
    """A sampler whose randomness depends only on (seed, trial number), with optional budget strategies.

    Optuna samplers keep no state between trials but their random generator (populations, TPE
    models and NSGA-II generations are rebuilt from the storage). Each trial therefore gets a fresh
    ``make_sampler(name, trial_seed(seed, trial.number))``: a sequential search is reproducible, a
    resumed one does not replay its first suggestions (a plain ``RandomSampler(seed)`` would) and
    concurrent workers do not suggest the same archs.

    Budget-aware proposals (when ``space`` and ``budget_macs`` are given; within ``latency_budget`` too when
    one is given):

    - :class:`FeasibleStart` for the trials the sampler would draw uniformly at random (all of random
      search, TPE's until :data:`TPE_STARTUP_TRIALS` have finished, NSGA-II's first generation);
    - :class:`BudgetRepair` for joint proposals (NSGA-II children). TPE proposes gene by gene, so it is
      left to learn the constraint.

    This way every random-search and NSGA-II trial is evaluated, even under a tight budget. Enqueued
    trials get neither: their fixed genes are the caller's choice.
    """

    def __init__(self, name: str, seed: int, population_size: int | None = None, *,
                 space: SearchSpace | None = None, budget_macs: float | None = None,
                 latency_budget: LatencyBudget | None = None):
        make_sampler(name, seed, population_size)  # unknown names fail here
        if (space is None) != (budget_macs is None):
            raise ValueError("a feasible start needs both space and budget_macs")
        self.name, self.seed, self.population_size = name, int(seed), population_size
        self.feasible_start = None if space is None else FeasibleStart(space, float(budget_macs), latency_budget)
        self.repair = None if space is None else BudgetRepair(space, float(budget_macs), latency_budget)
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
                    _remember(self._samplers, trial.number, sampler)
            return sampler

    def _draws_at_random(self, study: optuna.Study, proposal: dict[str, Any]) -> bool:
        """Whether the wrapped sampler would draw this trial's genes uniformly: random search always, NSGA-II
        while it proposes nothing (its first generation lasts until a population of trials has finished, which
        with failed trials or several workers takes more trial numbers than the population), TPE before it
        has :data:`TPE_STARTUP_TRIALS` finished trials (it counts the complete and the pruned ones)."""
        if self.name == "random":
            return True
        if self.name == "nsga2":
            return not proposal
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        return len(finished) < TPE_STARTUP_TRIALS

    def _plan(self, trial: FrozenTrial, make: Callable[[random.Random], dict[str, Any]] | None = None,
              ) -> dict[str, Any] | None:
        """The trial's in-budget decisions (Optuna labels): made once by ``make`` (a feasible start or a repair),
        then looked up. None: nothing planned."""
        with self._lock:
            plan = self._plans.get(trial.number)
        if plan is not None or make is None:
            return plan
        plan = make(random.Random(trial_seed(self.seed, trial.number)))
        with self._lock:
            _remember(self._plans, trial.number, plan)
        return plan

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        # Always asked, even when the proposal is not used: NSGA-II records the trial's generation here. Optuna
        # asks it before any sample_independent of the trial, so the plan is made here.
        proposal = self._for(trial).sample_relative(study, trial, search_space)
        if self.feasible_start is None or _enqueued(trial):
            return proposal
        if self._draws_at_random(study, proposal):
            self._plan(trial, self.feasible_start)
            return {}  # a feasible start: every gene comes from the plan, through sample_independent
        if not proposal:
            return proposal  # TPE proposes gene by gene: left to learn the budget
        plan = self._plan(trial, lambda rng: self.repair(proposal, rng))
        return {name: plan.get(name, label) for name, label in proposal.items()}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: Any) -> Any:
        plan = self._plan(trial)
        if plan is not None and plan.get(param_name) in getattr(param_distribution, "choices", ()):
            return plan[param_name]
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        sampler = self._for(trial)
        sampler.before_trial(study, trial)
        if _enqueued(trial):
            # Optuna asks for no relative proposal when every gene is fixed, and that is where NSGA-II records
            # a trial's generation: without it, an enqueued trial would never join a population.
            sampler.sample_relative(study, trial, sampler.infer_relative_search_space(study, trial))

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        with self._lock:
            self._plans.pop(trial.number, None)
        self._for(trial, release=True).after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        pass  # Optuna calls this per thread with n_jobs > 1; the seed is already per trial


def _enqueued(trial: FrozenTrial) -> bool:
    """Queued with fixed genes (``study.enqueue_trial``): it runs as queued, whatever the budget strategies say."""
    return bool(trial.system_attrs.get("fixed_params"))


def _remember(per_trial: dict[int, Any], number: int, value: Any) -> None:
    """Keep ``value`` for trial ``number``, dropping the oldest entries beyond :data:`_MAX_PENDING`."""
    per_trial[number] = value
    while len(per_trial) > _MAX_PENDING:
        del per_trial[next(iter(per_trial))]
