"""The search engine: an Optuna study over a search space under a MACs budget.

One trial = one arch. The objective suggests the arch gene by gene (define-by-run, :meth:`SearchSpace.suggest`),
counts its MACs and parameters analytically, stores the arch on the trial and sets the budget constraint
``macs_budget = macs - budget_macs`` (feasible when <= 0) *before* anything is evaluated; under a latency budget
also ``latency_budget = predicted ms - budget`` (the latency table's prediction, :mod:`nasloc.latency`). An arch over
budget is not evaluated at all: it gets pessimistic values (top-1 0, its real MACs and params, infinite
latency) and costs only its storage writes. The sampler's random phase (all of random search, TPE's first
trials, NSGA-II's first population) is drawn within the budget and NSGA-II children over budget are
repaired into it (:class:`nasloc.sampler.TrialSeededSampler`), so under a tight budget every random-search
and NSGA-II trial is evaluated.

Warm start: ``run_search(warm_start={name: arch})`` queues those archs (the seed designs at the budget,
:func:`nasloc.seeds.reference_archs`) as the first trials of a new study (:func:`enqueue_warm_start`), so
NSGA-II's first population holds them and its children explore their neighbourhoods.

The study lives in an Optuna storage (:func:`nasloc.storage.open_storage`: SQLite, PostgreSQL or a journal
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

import math
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.samplers import BaseSampler
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from .arch import Arch
from .errors import NaslocError
from .flops import count
from .sampler import LatencyBudget, TrialSeededSampler, resolve_population_size
from .space import RecordingChooser, SearchSpace, option_label
from .storage import fail_stale_trials, open_storage, this_worker

#: Objective names and their directions. top1 is the proxy top-1 accuracy (%) with supernet weights.
OBJECTIVES: dict[str, str] = {"top1": "maximize", "macs": "minimize", "params": "minimize", "latency": "minimize"}
CONSTRAINT = "macs_budget"
LATENCY_CONSTRAINT = "latency_budget"  # predicted ms - the latency budget, with --latency-budget
#: User attribute naming the seed design a warm-start trial was queued for.
SEED_DESIGN_ATTR = "seed_design"
#: States that count towards ``n_trials``: done, or being run by some worker (or queued).
COUNTED_STATES = (TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING)


class EvaluationError(RuntimeError):
    """``evaluate`` gave no usable accuracy (NaN or infinite): the trial fails, the search goes on."""


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


def record_arch(trial: Any, arch: Arch, budget_macs: float,
                latency_budget: LatencyBudget | None = None) -> tuple[int, int, bool]:
    """Store the arch and its cost on ``trial`` and set the budget constraint(s); returns (macs, params, whether
    the arch is within every budget).

    With ``latency_budget``, the predicted latency (ms) is stored as ``latency`` and constrained too. Shared by
    the plain objective and the Ray backend, so both leave the same user attributes.
    """
    cost = count(arch)
    trial.set_user_attr("arch", arch.to_dict())
    trial.set_user_attr("arch_json", arch.to_json())
    trial.set_user_attr("macs", int(cost.macs))
    trial.set_user_attr("params", int(cost.params))
    trial.set_constraint(CONSTRAINT, float(cost.macs - budget_macs))
    within = cost.macs <= budget_macs
    if latency_budget is not None:
        excess = latency_budget.excess(arch)
        trial.set_user_attr("latency", excess + latency_budget.limit_ms)
        trial.set_constraint(LATENCY_CONSTRAINT, excess)
        within = within and excess <= 0
    return int(cost.macs), int(cost.params), within


class Objective:
    """The Optuna objective of a search (picklable when ``evaluate`` and ``latency`` are).

    ``evaluate(arch) -> top-1 %`` (proxy accuracy; NaN allowed, the trial then fails) and the optional
    ``latency(arch) -> float`` (the latency table's prediction in ms) run only for archs within budget: the MACs
    budget and, when given, ``latency_budget``. User attributes left on every trial: ``arch`` (dict),
    ``arch_json``, ``macs``, ``params``, ``worker`` (host:pid), ``evaluated`` (and ``latency`` under a latency
    budget); and, when evaluated, ``top1``, ``eval_seconds`` (and ``latency``); ``fail_reason`` for a failed
    evaluation.
    """

    def __init__(
        self,
        space: SearchSpace,
        evaluate: Callable[[Arch], float],
        *,
        budget_macs: float,
        objectives: Sequence[str] = ("top1", "macs"),
        latency: Callable[[Arch], float] | None = None,
        latency_budget: LatencyBudget | None = None,
    ):
        self.space, self.evaluate, self.latency = space, evaluate, latency
        self.budget_macs, self.latency_budget = float(budget_macs), latency_budget
        self.objectives = check_objectives(objectives, latency)

    def __call__(self, trial: optuna.Trial) -> list[float]:
        arch = self.space.suggest(trial)
        # the constraints are set before evaluating
        macs, params, within = record_arch(trial, arch, self.budget_macs, self.latency_budget)
        if not within:
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


# ------------------------------------------------------------------------------------------- warm start
class _ArchChooser:
    """Chooses, for every gene :meth:`SearchSpace.build` asks, the option that ``arch`` took (so that the
    recorded decisions rebuild it). Gene names as in :mod:`nasloc.space`; skeleton-wide genes are the arch's
    fields of that name."""

    def __init__(self, arch: Arch):
        self.arch = arch
        self.shortcuts = {s.start: s for s in arch.shortcuts}
        self.offsets = [sum(stage.depth for stage in arch.stages[:i]) for i in range(len(arch.stages))]

    def __call__(self, name: str, options: tuple) -> Any:
        try:
            value = self._value(name, options)
        except (IndexError, AttributeError):  # a stage, block or head the arch does not have
            value = None
        if value not in options:
            raise ValueError(f"the arch has no choice among {[option_label(o) for o in options]} for gene {name}")
        return options[options.index(value)]  # the space's own option (2, not the arch's 2.0)

    def _value(self, name: str, options: tuple) -> Any:
        parts = name.split(".")
        if len(parts) == 1:
            return getattr(self.arch, name)
        i = int(parts[0][1:])
        stage = self.arch.stages[i]
        if len(parts) == 2:
            return getattr(stage, parts[1])
        j, gene = int(parts[1][1:]), parts[-1]
        block = stage.blocks[j]
        if gene == "dilation":
            return block.dilations[int(parts[2][1:])]
        if gene == "shortcut_kernels":
            return self.shortcuts[self.offsets[i] + j].kernels
        if gene == "shortcut":
            shortcut = self.shortcuts.get(self.offsets[i] + j)
            span, left = (shortcut.span if shortcut else 0), stage.depth - j
            # build() shortens a span to the blocks left in the stage: any option it shortens to this span will do.
            return next((o for o in options if min(o, left) == span), span)
        return getattr(block, gene)


def arch_params(space: SearchSpace, arch: Arch) -> dict[str, Any]:
    """The Optuna parameters (choice labels) with which ``space.suggest`` builds exactly ``arch``.

    ValueError (naming the gene) when the space cannot build it.
    """
    chooser = RecordingChooser(_ArchChooser(arch))
    if space.build(chooser) != arch:
        raise ValueError(f"the space {space.name} does not build this arch (same genes, other skeleton)")
    return {name: option_label(value) for name, value in chooser.decisions.items()}


def enqueue_warm_start(study: optuna.Study, space: SearchSpace, warm_start: dict[str, Arch], n_trials: int) -> int:
    """Queue the archs of ``warm_start`` ({name: arch}) as the first trials of a study that has none yet.

    Each queued trial holds every gene fixed and the user attribute ``seed_design`` = its name. A study
    that has trials (a resumed search) is left alone, so a rerun does not queue them twice; at most
    ``n_trials`` are queued, since queued trials count towards it. Returns how many were queued. With
    several processes on one study, only one of them should pass ``warm_start``.
    """
    if study.get_trials(deepcopy=False):
        return 0
    chosen = list(warm_start.items())[: max(n_trials, 0)]
    for name, arch in chosen:
        study.enqueue_trial(arch_params(space, arch), user_attrs={SEED_DESIGN_ATTR: name})
    return len(chosen)


# ------------------------------------------------------------------------------------------- study
def open_study(
    storage: str | Path | BaseStorage,
    study_name: str,
    *,
    objectives: Sequence[str],
    budget_macs: float,
    sampler: BaseSampler | None = None,
    meta: dict[str, Any] | None = None,
    latency_budget_ms: float | None = None,
) -> optuna.Study:
    """Create the study, or load it to resume; a resumed study must have the same objectives and budgets.

    The budgets, objectives and ``meta`` are stored as study user attributes when it is created. A
    different budget (MACs or latency) is refused: the feasibility of every stored trial was set against the old one.
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
        raise NaslocError(f"study {study_name!r} has objectives {study.metric_names}, not {list(objectives)}; "
                         "use another study (run) name")
    expected = [optuna.study.StudyDirection[OBJECTIVES[o].upper()] for o in objectives]
    if list(study.directions) != expected:
        raise NaslocError(f"study {study_name!r} has {len(study.directions)} objective directions that do not match "
                         f"{list(objectives)}; use another study (run) name")
    stored = study.user_attrs.get("budget_macs")
    if stored is not None and not math.isclose(float(stored), float(budget_macs), rel_tol=1e-9):
        raise NaslocError(f"study {study_name!r} was searched with a budget of {float(stored):.6g} MACs, not "
                         f"{float(budget_macs):.6g}: its trials' feasibility is set against the old budget; "
                         "use another study (run) name")
    if study.metric_names is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            study.set_metric_names(list(objectives))
    stored_latency = study.user_attrs.get("latency_budget_ms") if stored is not None else latency_budget_ms
    if stored_latency != latency_budget_ms:
        raise NaslocError(f"study {study_name!r} was searched with a latency budget of {stored_latency} ms, not "
                         f"{latency_budget_ms} ms: its trials' feasibility is set against the old budget; "
                         "use another study (run) name")
    if stored is None:
        study.set_user_attr("budget_macs", float(budget_macs))
        study.set_user_attr("latency_budget_ms", latency_budget_ms)
        study.set_user_attr("macs_convention", "1 multiply-add = 1 FLOP, per image at the space's deploy resolution")
        for key, value in (meta or {}).items():
            study.set_user_attr(key, value)
    return study


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


@contextmanager
def optuna_quiet(quiet: bool) -> Iterator[None]:
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
    :func:`nasloc.sampler.default_population_size` and is kept in the study so that a resumed search keeps it.
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


# ------------------------------------------------------------------------------------------- results
def is_feasible(trial: FrozenTrial, budget_macs: float | None = None) -> bool | None:
    """Within budget? Against ``budget_macs`` when given (from the stored MACs), else the stored constraints
    (MACs, and latency under a latency budget).

    None when the trial has no MACs yet (it failed or was cut before its arch was suggested).
    """
    macs = trial.user_attrs.get("macs")
    if budget_macs is not None:
        return None if macs is None else macs <= budget_macs
    constraints = trial.constraints
    return None if CONSTRAINT not in constraints else all(value <= 0 for value in constraints.values())


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
