"""The search's Optuna study: made or resumed, its warm start (the seed designs), and what it holds
(trials within budget, the Pareto front)."""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.samplers import BaseSampler
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from ..arch import Arch
from ..errors import NaslocError
from ..space.search_space import SearchSpace
from ..storage.factory import open_storage
from .objective import CONSTRAINT, OBJECTIVES, arch_params

#: User attribute naming the seed design a warm-start trial was queued for.
SEED_DESIGN_ATTR = "seed_design"


#: States that count towards ``n_trials``: done, or being run by some worker (or queued).
COUNTED_STATES = (TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING)


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
