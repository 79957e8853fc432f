"""Phase 2: the search of a run, with plain Optuna (one or several processes) or Ray Tune."""
from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any, Callable

import optuna
import torch

from ..arch import Arch
from ..console import say
from ..deploy.latency import LatencyFactory
from ..run import RunDir, RunOptions, RunRecord
from ..search.budget import LatencyBudget
from ..search.engine import run_search
from ..search.ray import trial_resources
from ..search.study import enqueue_warm_start, open_study, optuna_quiet
from ..space.search_space import SearchSpace
from ..space.seed_designs import reference_archs
from ..storage.reconnect import storage_errors_unmasked
from ..supernet.proxy import EvaluatorSpec, make_evaluator
from ..supernet.supernet import Supernet
from ..training.data import DataSplits


def queue_seed_designs(space: SearchSpace, record: RunRecord) -> None:
    """Create the study and queue the seed designs at the budget as its first trials (a new study only), so
    NSGA-II's first population holds them. Done once per run, by the supernet phase: workers that share the
    study (``--phase search``) would race to queue them twice."""
    options = record.options
    with optuna_quiet(True):
        study = open_study(options.storage, record.study_name, objectives=options.objectives,
                           budget_macs=options.budget, latency_budget_ms=options.latency_budget,
                           meta={"space": space.name, "sampler": options.sampler, "seed": options.seed})
    enqueue_warm_start(study, space, reference_archs(space, options.budget), options.trials)


def search_phase(supernet: Supernet, splits: DataSplits, space: SearchSpace, checkpoint: Path, record: RunRecord,
                 run: RunDir) -> optuna.Study:
    """Add trials to the study until it holds ``trials``.

    ``workers`` N: with Ray, N concurrent Ray trials; with plain Optuna, N processes (this one and
    N - 1 spawned ones, each rebuilding the evaluator from an :class:`EvaluatorSpec`) sharing the study's
    storage, each with its share of the CPU threads. Optuna's own ``n_jobs`` threads would only contend
    for the GIL and for the same intra-op thread pool.
    """
    options = record.options
    workers = options.workers
    say(f"[nasloc] 2/6 search: {options.trials} trials, {options.sampler}, storage {options.storage}"
         + (f", {workers} {'Ray trials' if options.backend == 'ray' else 'processes'} at a time" if workers > 1 else ""))
    device = next(supernet.parameters()).device
    spec = EvaluatorSpec.for_run(record, checkpoint, str(device))
    latency = LatencyFactory(str(options.space), device.type, record.num_classes, torch.get_num_threads())
    settings = _search_settings(record)
    if options.backend == "ray":
        from ..search.ray import run_ray_search

        if "latency" in options.objectives:
            latency()  # the table is built here, once, with a progress bar; the workers read it
        return run_ray_search(space, spec, ray_address=options.ray_address, max_concurrent=workers,
                              results_dir=str(run.ray_dir), resources_per_trial=trial_resources(device.type),
                              latency_factory=latency if "latency" in options.objectives else None, **settings)
    settings.update(_latency_settings(options, latency))
    evaluate = make_evaluator(supernet, splits, seed=options.seed)
    if workers == 1:
        return _search(space, evaluate, settings)

    # queue_seed_designs made the study before the workers start, so that they do not race to create it.
    threads = max(1, torch.get_num_threads() // workers)
    context = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools mid-use
    processes = [context.Process(target=_search_worker, args=(spec, settings, threads), daemon=True,
                                 name=f"nasloc-search-{i}") for i in range(1, workers)]
    for process in processes:
        process.start()
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        study = _search(space, evaluate, settings)
        for process in processes:
            process.join()
    finally:
        torch.set_num_threads(saved_threads)
        for process in processes:
            if process.is_alive():  # this process failed or was interrupted
                process.terminate()
                process.join()
    failed = [p.name for p in processes if p.exitcode != 0]
    if failed:
        say(f"[nasloc] warning: search worker(s) {', '.join(failed)} exited with an error (see above); "
             f"their running trials are FAIL; rerun the same command to add the missing trials")
    return study


def _search_settings(record: RunRecord) -> dict[str, Any]:
    """The keyword arguments of the study that every search process shares."""
    options = record.options
    return dict(budget_macs=options.budget, storage=options.storage, study_name=record.study_name, n_trials=options.trials,
                sampler=options.sampler, seed=options.seed, objectives=options.objectives)


def _latency_settings(options: RunOptions, factory: LatencyFactory) -> dict[str, Any]:
    """The latency objective and budget of the plain search: the latency table's predictions (the table is built
    here, before any worker starts, with a progress bar the first time)."""
    if "latency" not in options.objectives and options.latency_budget is None:
        return {}
    model = factory()
    budget = None if options.latency_budget is None else LatencyBudget(options.latency_budget, model)
    return dict(latency=model if "latency" in options.objectives else None, latency_budget=budget)


def _search(space: SearchSpace, evaluate: Callable[[Arch], float], settings: dict[str, Any],
            progress: bool = True) -> optuna.Study:
    """The plain Optuna search in this process (one trial at a time)."""
    with storage_errors_unmasked():  # a database server that stayed away: one line, not Optuna's UnboundLocalError
        return run_search(space, evaluate, workers=1, progress=progress, **settings)


def _search_worker(spec: EvaluatorSpec, settings: dict[str, Any], threads: int) -> None:
    """A spawned search process of ``workers`` N: the same study, evaluator, supernet weights and latency table."""
    torch.set_num_threads(threads)
    evaluate = spec()
    _search(evaluate.supernet.space, evaluate, settings, progress=False)
