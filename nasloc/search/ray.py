"""Ray Tune backend: the same search (space, constraint, sampler, Optuna study) with Ray running the trials.

For many workers, GPUs or nodes. Ray Tune's ``OptunaSearch`` asks the Optuna study for a trial in the driver
and runs our define-by-run function there (:class:`DefineByRun`): it suggests the arch, counts its MACs,
stores the arch and cost as user attributes and sets the budget constraint, all *before* any evaluation,
exactly as the plain objective does. Ray then runs :func:`ray_trial` in a worker process, which rebuilds
the arch, evaluates it (unless it is over budget) and reports the metrics.

Through Ray, the define-by-run function gets Ray's ``_OptunaTrialSuggestCaptor``, which forwards every
attribute but ``suggest_*`` to the real Optuna trial, so ``set_user_attr`` and ``set_constraint`` reach the
study unchanged (checked by the test). What the *worker* measures (top1, eval time, evaluated) can only be
written by the driver: an Optuna trial cannot be changed once it is finished, and the worker may not see
the storage at all (SQLite on the driver's disk). :class:`NaslocOptunaSearch` therefore writes those user
attributes from the reported result just before OptunaSearch tells the study, so trials look the same as
with the plain backend and the tables, plot and optuna-dashboard work unchanged.

Costs: Ray needs ~1 GB and ~7 s to start and a worker process per concurrent trial (with ``reuse_actors`` the
worker, and the evaluator built by ``evaluate_factory``, is reused for the next trial). An over-budget arch
is not evaluated, but still costs one Ray trial dispatch (milliseconds with reused actors).
One Ray driver per study: RUNNING trials that an interrupted Ray run left behind are marked FAIL at start.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import optuna
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from ..arch import Arch
from ..space.flops import count
from ..storage.factory import open_storage
from ..storage.heartbeat import fail_stale_trials
from .objective import OBJECTIVES, check_objectives, pessimistic_values, record_arch
from .sampler import TrialSeededSampler, resolve_population_size
from .study import enqueue_warm_start, open_study, trials_to_start

if TYPE_CHECKING:
    from ..space.search_space import SearchSpace

_logger = logging.getLogger(__name__)
BACKEND_ATTR = "backend"


#: Results that are copied into the Optuna trial's user attributes (worker side measurements).
RESULT_ATTRS = ("evaluated", "top1", "eval_seconds", "latency", "fail_reason")


class DefineByRun:
    """OptunaSearch's ``space``: suggest the arch, record it and its cost, set the constraint (driver side)."""

    def __init__(self, space: SearchSpace, budget_macs: float):
        self.space, self.budget_macs = space, float(budget_macs)

    def __call__(self, trial: Any) -> dict[str, Any]:
        # First: a driver that dies while the ~40 records below are written leaves a trial that a rerun must
        # recognise as Ray's (and fail), not one that stays RUNNING and counts towards --trials forever.
        trial.set_user_attr(BACKEND_ATTR, "ray")
        arch = self.space.suggest(trial)
        record_arch(trial, arch, self.budget_macs)  # user attrs + set_constraint, before any evaluation
        return {"arch": arch.to_dict()}


_EVALUATORS: dict[bytes, Callable[[Arch], float]] = {}


def cached(factory: Callable[[], Callable[[Arch], float]] | None) -> Callable[[Arch], float] | None:
    """``factory()`` once per worker process (reused actors keep e.g. a loaded supernet)."""
    if factory is None:
        return None
    try:
        key = pickle.dumps(factory)
    except Exception:  # only cloudpickle can pickle it (a lambda, a local class): no caching
        return factory()
    if key not in _EVALUATORS:
        _EVALUATORS[key] = factory()
    return _EVALUATORS[key]


def ray_trial(
    config: dict[str, Any],
    *,
    evaluate_factory: Callable[[], Callable[[Arch], float]],
    latency_factory: Callable[[], Callable[[Arch], float]] | None,
    budget_macs: float,
    objectives: Sequence[str],
) -> None:
    """The Ray function trainable: rebuild the arch, evaluate it if within budget, report once."""
    import torch
    from ray import tune

    torch.set_num_threads(1)  # one CPU per trial; more threads only fight on a shared machine
    arch = Arch.from_dict(config["arch"])
    cost = count(arch)
    result: dict[str, Any] = {"macs": float(cost.macs), "params": float(cost.params), "evaluated": False}
    if cost.macs > budget_macs:  # the driver set the constraint; the same count tells the worker
        result.update(zip(objectives, pessimistic_values(objectives, cost.macs, cost.params)))
        tune.report(result)
        return
    evaluate = cached(evaluate_factory)
    start = time.perf_counter()
    top1 = float(evaluate(arch))
    result.update(top1=top1, eval_seconds=time.perf_counter() - start, evaluated=True)
    if not math.isfinite(top1):
        result["fail_reason"] = f"evaluate returned top-1 {top1}"
    elif "latency" in objectives:
        result["latency"] = float(cached(latency_factory)(arch))
    tune.report(result)


def _searcher_class() -> type:
    from ray.tune.search.optuna import OptunaSearch

    class NaslocOptunaSearch(OptunaSearch):
        """OptunaSearch that copies the worker's measurements into the trial's user attributes before
        telling the study, and fails (rather than tells NaN to) trials without a finite top-1."""

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            ot_trial = self._ot_trials.get(trial_id)
            if ot_trial is None or trial_id in self._completed_trials:
                return super().on_trial_complete(trial_id, result, error)
            result = result or {}
            for key in RESULT_ATTRS:
                if result.get(key) is not None and (key != "top1" or result.get("evaluated")):
                    ot_trial.set_user_attr(key, result[key])
            top1 = result.get("top1")
            if error or top1 is None or not math.isfinite(top1):
                if error and "fail_reason" not in result:
                    ot_trial.set_user_attr("fail_reason", "the Ray trial raised an error (see the Ray logs)")
                self._ot_study.tell(ot_trial, state=TrialState.FAIL)
                self._completed_trials.add(trial_id)
                return None
            return super().on_trial_complete(trial_id, result, error)

    return NaslocOptunaSearch


def _fail_orphans(study: optuna.Study) -> None:
    """RUNNING trials of an earlier Ray driver of this study: nobody will ever tell them."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get(BACKEND_ATTR) == "ray":
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            _logger.warning("trial %d was left RUNNING by an earlier Ray run; marked FAIL", trial.number)


def run_ray_search(
    space: SearchSpace,
    evaluate_factory: Callable[[], Callable[[Arch], float]],
    *,
    budget_macs: float,
    storage: str | Path | BaseStorage,
    study_name: str,
    n_trials: int,
    sampler: str = "nsga2",
    seed: int = 0,
    objectives: Sequence[str] = ("top1", "macs"),
    ray_address: str | None = None,
    max_concurrent: int = 2,
    results_dir: str | Path,
    latency_factory: Callable[[], Callable[[Arch], float]] | None = None,
    population_size: int | None = None,
    resources_per_trial: dict[str, float] | None = None,
    warm_start: dict[str, Arch] | None = None,
) -> optuna.Study:
    """Search with Ray Tune + OptunaSearch until the study holds ``n_trials`` trials; returns the study.

    Same study, user attributes, constraint, sampler and resume semantics as :func:`nasloc.search.engine.run_search`.
    ``evaluate_factory()`` (picklable; cloudpickle) runs in each worker and returns ``evaluate(arch) -> top1``,
    so a worker can load a supernet checkpoint itself. ``ray_address=None`` starts a local Ray with
    ``max_concurrent`` CPUs (token auth off, no dashboard) and shuts it down afterwards; an address joins
    that cluster. Ray's own files go to ``results_dir``. ``resources_per_trial`` defaults to one CPU
    (``{"cpu": 1, "gpu": 1}`` for GPU evaluation). ``warm_start`` ({name: arch}) become the first trials of
    a new study, as with :func:`nasloc.search.engine.run_search`.
    """
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    objectives = check_objectives(objectives, latency_factory)
    if max_concurrent < 1:
        raise ValueError("max_concurrent must be >= 1")
    if not isinstance(storage, BaseStorage):
        # No heartbeat: trials are asked and told by the driver (Study.optimize alone runs heartbeats,
        # and ask() warns about a heartbeat storage); _fail_orphans stands in for it.
        storage = open_storage(storage, heartbeat_interval=None)
    study = open_study(storage, study_name, objectives=objectives, budget_macs=budget_macs,
                       meta={"space": space.name, "sampler": sampler, "seed": seed, "backend": "ray"})
    population_size = resolve_population_size(study, sampler, population_size, n_trials)
    fail_stale_trials(study)
    _fail_orphans(study)
    enqueue_warm_start(study, space, warm_start or {}, n_trials)  # OptunaSearch asks the queued trials first
    remaining = trials_to_start(study, n_trials)
    if remaining <= 0:
        return study

    with ray_session(ray_address, max_concurrent):
        searcher = _searcher_class()(
            space=DefineByRun(space, budget_macs),
            metric=list(objectives),
            mode=["max" if OBJECTIVES[o] == "maximize" else "min" for o in objectives],
            sampler=TrialSeededSampler(sampler, seed, population_size, space=space, budget_macs=budget_macs),
            storage=storage,
            study_name=study_name,
        )
        trainable = tune.with_resources(
            tune.with_parameters(ray_trial, evaluate_factory=evaluate_factory, latency_factory=latency_factory,
                                 budget_macs=float(budget_macs), objectives=tuple(objectives)),
            resources_per_trial or {"cpu": 1},
        )
        tuner = tune.Tuner(
            trainable,
            # metric/mode stay on the searcher: TuneConfig rejects lists (multi-objective).
            tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=max_concurrent),
                                        num_samples=remaining, reuse_actors=True),
            run_config=tune.RunConfig(name=f"{study_name}-{time.strftime('%Y%m%d-%H%M%S')}",
                                      storage_path=str(Path(results_dir).expanduser().resolve()), verbose=0),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")
            # OptunaSearch warns when the define-by-run function takes > 1 s: ours writes ~40 storage
            # records (SQLite on a loaded machine can take that long) but computes nothing heavy.
            warnings.filterwarnings("ignore", "Define-by-run function passed in the `space` argument took")
            grid = tuner.fit()
        for error in grid.errors:
            _logger.warning("a Ray trial failed: %s", error)
    return study


@contextlib.contextmanager
def ray_session(ray_address: str | None, max_concurrent: int) -> Iterator[None]:
    """Ray for the duration of the block: ``ray_address`` None starts a local Ray with ``max_concurrent`` CPUs
    (token auth off, no dashboard) and shuts it down afterwards; an address joins that cluster. A Ray that is
    already up is used as it is."""
    import ray

    if ray.is_initialized():
        yield
        return
    if ray_address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # token auth (default since 2.59) is for clusters
    ray.init(address=ray_address or None, num_cpus=None if ray_address else max(1, max_concurrent),
             include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def trial_resources(device_type: str) -> dict[str, int]:
    """What one Ray trial asks for: a CPU, and a GPU when the run is on CUDA."""
    return {"cpu": 1, "gpu": 1} if device_type == "cuda" else {"cpu": 1}
