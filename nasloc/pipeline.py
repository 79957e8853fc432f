"""The whole job behind ``run_search.py``: supernet -> search -> report -> selection -> retrain -> export.

Every phase writes into the run folder (:class:`nasloc.run.RunDir`) and is resumable: the supernet from its
last epoch checkpoint, the search from its Optuna storage (a rerun continues to ``trials``), the selection
from its own study and each candidate's last epoch, retraining from each subnet's last epoch, and a
finished phase is not redone. The validation split is halved: the search scores its proxy on one half, the
selection its short trainings on the other. Options come as :class:`nasloc.run.RunOptions`
(validated by :mod:`nasloc.cli`, or made in Python).
"""
from __future__ import annotations

import multiprocessing
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import optuna
import torch
from optuna.trial import FrozenTrial

from .arch import Arch, total_stride
from .checkpoint import load_checkpoint, save_checkpoint
from .data import DataSplits, halve_val, load_dataset
from .errors import NaslocError
from .evaluate import EvaluatorSpec, make_evaluator
from .export import export_model
from .fileio import atomic_path
from .flops import count
from .latency import LatencyFactory
from .loader import check_batch_size
from .models import LocalityViT
from .report import serve_dashboard, write_csv, write_pareto_html, write_summary, write_tables
from .rung_pool import RungPool
from .run import PARETO_CSV, PARETO_HTML, SELECTION_CSV, TRIALS_CSV, RunDir, RunOptions, RunRecord
from .search import SEED_DESIGN_ATTR, enqueue_warm_start, open_study, optuna_quiet, pareto_trials, run_search
from .seeds import reference_archs
from .selection import (RungTrainer, SelectionConfig, SelectionResult, TrainerSpec, finalists, run_selection,
                        search_candidates, selection_rows, tied_note)
from .space import SearchSpace
from .reconnect import storage_errors_unmasked
from .sampler import LatencyBudget
from .storage import check_storage, open_storage
from .supernet import Supernet
from .supernet_train import Band, SupernetConfig, fingerprint, load_supernet, train_supernet
from .train import RetrainConfig, resolve_device, retrain
from .units import format_macs

# The supernet trains on archs with MACs in [BAND_LOW * budget, budget]: the part of the space the
# search cares about (NASViT/ElasticViT sample inside the FLOPs band too).
BAND_LOW = 0.5


class BudgetError(NaslocError):
    """The budget lies outside what the search space can build."""


class PhaseError(NaslocError):
    """A phase was asked for before the one it needs."""


@dataclass(frozen=True)
class Retrained:
    """A finalist (search trial ``trial``) retrained from scratch."""

    trial: int
    model: LocalityViT
    proxy_top1: float
    val_top1: float
    macs: int  # at the space's deploy resolution
    params: int  # at the deploy resolution too (absolute position tables grow with it)


def run_pipeline(options: RunOptions) -> Path:
    """Run (or resume) every phase; returns the run folder."""
    started = time.time()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and options.phase != "supernet":
        # The search, retraining and export run in one process; DDP serves supernet training.
        raise PhaseError("under torchrun only --phase supernet runs (DDP supernet training); "
                         "then run the search without torchrun (same options)")
    check_storage(options.storage)  # a misspelled or unreachable storage fails now, not after the training
    space, splits, record = load_inputs(options)  # checks the budget before anything is written
    options = record.options  # with the image sizes chosen
    run = RunDir(options.run_dir)
    # Under torchrun the other ranks only train the supernet: the record, the dashboard and the queued seed
    # designs are rank 0's (two ranks would queue them twice and race for the dashboard's port).
    main_process = int(os.environ.get("RANK", "0")) == 0
    run.check_resumable(record)
    if options.phase == "search":
        require_trained_supernet(run, options.supernet_epochs)
    elif main_process:  # extra search workers (--phase search) leave the run's record alone
        run.write_record(record)
    device = resolve_device(options.device)
    lo, hi = space.macs_range()
    _say(f"[nasloc] run {run.root} | budget {format_macs(options.budget)} at {space.img_size} px | "
         f"space {space.name} ({format_macs(lo)} - {format_macs(hi)}) | "
         f"proxy {options.proxy_img_size} px on {options.dataset} | device {device}")
    # Up from the start: a busy port fails the run now, not after hours of supernet training.
    dashboard = serve_dashboard(options.storage, options.dashboard_port) if options.dashboard and main_process else None
    try:
        torch.manual_seed(options.seed)
        supernet = Supernet(space, options.proxy_img_size).to(device)
        if options.phase == "search":
            checkpoint = trained_checkpoint(supernet, run, device)
        else:
            checkpoint = train_phase(supernet, splits, space, options, run, device)
        if not main_process:
            return run.root
        if options.phase != "search":  # once per run, before any search worker (--phase search) starts
            queue_seed_designs(space, record)
        if options.phase == "supernet":
            return run.root
        search_data, select_data = halve_val(splits, options.seed)
        study = search_phase(supernet, search_data, space, checkpoint, record, run)
        if options.phase == "search":
            return run.root
        references = reference_points(study)
        pareto = report_phase(study, options, run, references)
        if options.select_top_k:
            selection = selection_phase(study, supernet, select_data, space, checkpoint, record, run)
            by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
            chosen = [by_number[t.user_attrs["search_trial"]] for t in finalists(selection, options.retrain_top_k)]
        else:
            selection = None
            chosen = sorted(pareto, key=lambda t: t.user_attrs["top1"], reverse=True)[: options.retrain_top_k]
        retrained = retrain_phase(chosen, space, splits, record, run)
        export_dir = export_phase(retrained, options, run, splits, space.img_size)
        write_summary(run, record, space, study, pareto, selection, retrained, references, export_dir,
                      time.time() - started)
    finally:
        if dashboard is not None:
            dashboard.shutdown()
            dashboard.server_close()
    _say(f"[nasloc] done in {time.time() - started:.0f} s: {run.summary}")
    return run.root


def load_inputs(options: RunOptions) -> tuple[SearchSpace, DataSplits, RunRecord]:
    """The search space (for the data set's classes), the data splits and the run's record.

    The budget is checked against the space before the data is loaded (cheap, and the common
    mistake) and again for the data set's number of classes (the classifier head counts too).
    """
    space = SearchSpace.load(options.space)
    check_budget(space, options.budget)
    proxy_size = options.proxy_img_size or default_proxy_size(space)
    splits = load_dataset(options.dataset, options.data_dir, proxy_size, seed=options.seed)
    check_batch_size(options.batch_size, len(splits.train))  # under torchrun the loader checks each rank's shard
    space = space.for_classes(splits.num_classes)
    check_budget(space, options.budget)
    retrain_size = options.retrain_img_size or default_retrain_size(space, options.dataset, proxy_size)
    chosen = replace(options, proxy_img_size=proxy_size, retrain_img_size=retrain_size)
    return space, splits, RunRecord(chosen, splits.num_classes, splits.mean, splits.std)


# ------------------------------------------------------------------------------------ checks
def check_budget(space: SearchSpace, budget: float) -> None:
    lo, hi = space.macs_range()
    if not lo <= budget <= hi:
        raise BudgetError(
            f"budget {format_macs(budget)} is outside the space {space.name}: its archs span "
            f"{format_macs(lo)} to {format_macs(hi)} at {space.img_size} px"
        )


def default_proxy_size(space: SearchSpace) -> int:
    """The smallest size >= 32 px at which every arch of the space is valid (and at most the
    deploy size): a multiple of the total stride of stem and downsampling."""
    stride = total_stride(int(space.skeleton.get("patch_size", 16)), len(space.stages))
    size = stride * max(1, -(-32 // stride))
    return min(size, space.img_size)


def default_retrain_size(space: SearchSpace, dataset: str, proxy_size: int) -> int:
    """The deploy resolution, except for the embedded 8x8 digits: upsampling them to 224 px would
    cost CPU hours for nothing, so they retrain at the proxy resolution."""
    return proxy_size if dataset == "digits" else space.img_size


# ------------------------------------------------------------------------------------ supernet
def train_phase(supernet: Supernet, splits: DataSplits, space: SearchSpace, options: RunOptions, run: RunDir,
                device: torch.device) -> Path:
    band = search_band(space, options.budget)
    cfg = SupernetConfig(epochs=options.supernet_epochs, batch_size=options.batch_size, seed=options.seed)
    _say(f"[nasloc] 1/6 supernet: {cfg.epochs} epochs, sandwich rule in the band {format_macs(band.lo)} - {format_macs(band.hi)}")
    result = train_supernet(supernet, splits, band, cfg, run.supernet_dir, device=str(device))
    if cfg.epochs == 0 and not result.checkpoint.exists():
        return save_untrained(supernet, run)
    return result.checkpoint


def require_trained_supernet(run: RunDir, epochs: int) -> None:
    """For --phase search: refuse (before anything is written) a run whose supernet is not trained."""
    path = run.supernet_checkpoint
    done = load_checkpoint(path, keys=("epoch",))["epoch"] + 1 if path.exists() else 0
    if done < epochs:
        raise PhaseError(f"the supernet of {run.root} has {done}/{epochs} epochs; train it first with --phase supernet (same options)")


def trained_checkpoint(supernet: Supernet, run: RunDir, device: torch.device) -> Path:
    """The finished supernet checkpoint of the run, loaded into ``supernet`` (for --phase search, after
    :func:`require_trained_supernet` has checked it)."""
    path = run.supernet_checkpoint
    if not path.exists():  # --supernet-epochs 0: the seeded initial weights
        path = run.untrained_checkpoint
        if not path.exists():
            return save_untrained(supernet, run)
    load_supernet(path, supernet, device)
    return path


def save_untrained(supernet: Supernet, run: RunDir) -> Path:
    """With --supernet-epochs 0 nothing is trained and train_supernet saves nothing, but worker
    processes (--workers, Ray) load the supernet from a file: save the initial weights in the format
    :func:`load_supernet` reads."""
    path = run.untrained_checkpoint
    save_checkpoint(path, {"model": supernet.state_dict(), "fingerprint": fingerprint(supernet), "img_size": supernet.img_size, "epoch": -1},
                    keep_previous=False)
    return path


# ------------------------------------------------------------------------------------ search
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
    _say(f"[nasloc] 2/6 search: {options.trials} trials, {options.sampler}, storage {options.storage}"
         + (f", {workers} {'Ray trials' if options.backend == 'ray' else 'processes'} at a time" if workers > 1 else ""))
    device = next(supernet.parameters()).device
    spec = EvaluatorSpec.for_run(record, checkpoint, str(device))
    latency = LatencyFactory(str(options.space), device.type, record.num_classes, torch.get_num_threads())
    settings = _search_settings(record)
    if options.backend == "ray":
        from .ray_search import run_ray_search

        if "latency" in options.objectives:
            latency()  # the table is built here, once, with a progress bar; the workers read it
        return run_ray_search(space, spec, ray_address=options.ray_address, max_concurrent=workers,
                              results_dir=str(run.ray_dir), resources_per_trial=_ray_trial_resources(device),
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
        _say(f"[nasloc] warning: search worker(s) {', '.join(failed)} exited with an error (see above); "
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


# ------------------------------------------------------------------------------------ report
def reference_points(study: optuna.Study) -> dict[str, tuple[float, float]]:
    """Each seed mechanism alone in the space at the budget (queued first in the search), with its MACs and
    proxy top-1: the reference points of the Pareto plot."""
    return {t.user_attrs[SEED_DESIGN_ATTR]: (t.user_attrs["macs"], t.user_attrs["top1"])
            for t in study.get_trials(deepcopy=False) if SEED_DESIGN_ATTR in t.user_attrs and "top1" in t.user_attrs}


def report_phase(study: optuna.Study, options: RunOptions, run: RunDir, references: dict[str, tuple[float, float]]) -> list[FrozenTrial]:
    _say(f"[nasloc] 3/6 report: {TRIALS_CSV}, {PARETO_CSV}, {PARETO_HTML}")
    write_tables(study, options.budget, run.root)
    write_pareto_html(study, options.budget, run.root, references)
    return pareto_trials(study, options.budget)


# ------------------------------------------------------------------------------------ selection
def selection_phase(study: optuna.Study, supernet: Supernet, splits: DataSplits, space: SearchSpace, checkpoint: Path,
                    record: RunRecord, run: RunDir) -> SelectionResult:
    """Successive halving of the search's best candidates and the seed designs (:mod:`nasloc.selection`),
    scored on the selection half of the validation split (Ray's ASHA with ``--backend ray``); writes
    ``selection.csv``."""
    options = record.options
    candidates = search_candidates(study, options.budget, options.select_top_k, search_band(space, options.budget).lo)
    config = SelectionConfig(epochs=options.select_epochs, top_k=options.select_top_k, init=options.select_init,
                             batch_size=options.batch_size, seed=options.seed)
    _say(f"[nasloc] 4/6 selection: {len(candidates)} candidates ({sum(not c.source.isdigit() for c in candidates)} "
         f"seed designs), rungs up to {config.epochs} epochs from {config.init}, {len(splits.val)} "
         f"held-out images" + (f", {options.workers} trainings at a time" if options.workers > 1 else ""))
    storage = open_storage(options.storage, heartbeat_interval=None)  # no Study.optimize to beat for
    device = next(supernet.parameters()).device
    spec = TrainerSpec(EvaluatorSpec.for_run(record, checkpoint, str(device)), config, str(run.root))
    if options.backend == "ray":
        from .ray_selection import run_ray_selection

        result = run_ray_selection(candidates, spec, storage, max_epochs=config.epochs,
                                   reduction_factor=config.reduction_factor, ray_address=options.ray_address,
                                   max_concurrent=options.workers, results_dir=run.ray_dir,
                                   resources_per_trial=_ray_trial_resources(device), held_out=len(splits.val), say=_say)
    else:  # one training at a time, or --workers processes that rebuild the trainer from the spec (threads shared)
        trainer = (RungPool(spec, options.workers, max(1, torch.get_num_threads() // options.workers))
                   if options.workers > 1 else
                   nullcontext(RungTrainer(supernet, splits, config, run.selection_dir, device=options.device)))
        with trainer as advance:
            result = run_selection(candidates, advance, storage, max_epochs=config.epochs,
                                   reduction_factor=config.reduction_factor, held_out=len(splits.val), say=_say,
                                   progress=True)
    write_csv(selection_rows(result.study), run.root / SELECTION_CSV)
    note = tied_note(result, options.retrain_top_k)
    if note:
        _say(f"[nasloc]   {note}")
    return result


# ------------------------------------------------------------------------------------ retrain + export
def retrain_phase(chosen: list[FrozenTrial], space: SearchSpace, splits: DataSplits, record: RunRecord, run: RunDir) -> list[Retrained]:
    """Retrain the chosen search trials (the selection's finalists, or the Pareto front's best by proxy) from
    scratch."""
    options = record.options
    size = options.retrain_img_size
    if chosen:
        _say(f"[nasloc] 5/6 retrain: {len(chosen)} finalists at {size} px, {options.retrain_epochs} epochs each")
    data = splits if size == splits.img_size else load_dataset(options.dataset, options.data_dir, size, seed=options.seed)
    results = []
    for trial in chosen:
        arch = Arch.from_dict(trial.user_attrs["arch"]).replace(img_size=size)
        model = LocalityViT(arch, drop_path_rate=0.1)
        cfg = RetrainConfig(epochs=options.retrain_epochs, img_size=size, seed=options.seed, mixup=0.0, cutmix=0.0, ema_decay=0.0)
        folder = run.write_retrained_arch(trial.number, arch)
        result = retrain(model, data, cfg, folder, device=options.device)  # resumes; all epochs done: only reads
        weights = run.retrained_weights(trial.number)
        if result.epochs_run > 0 or not weights.exists():
            _save_weights(model, weights)
        if result.start_epoch:
            _say(f"[nasloc]   trial {trial.number}: " + ("already retrained" if result.epochs_run == 0 else f"resumed after epoch {result.start_epoch}"))
        at_deploy = count(arch.replace(img_size=space.img_size))  # as the export and the Pareto table count
        results.append(Retrained(trial.number, model, trial.user_attrs["top1"], result.val_top1,
                                 macs=at_deploy.macs, params=at_deploy.params))
    return results


def export_phase(retrained: list[Retrained], options: RunOptions, run: RunDir, splits: DataSplits,
                 deploy_size: int) -> Path | None:
    if not retrained:
        return None
    best = max(retrained, key=lambda r: r.val_top1)
    info = dict(trial=best.trial, macs_at_deploy=best.macs, params=best.params, proxy_top1=best.proxy_top1,
                retrained_top1=best.val_top1, budget_macs=options.budget, dataset=options.dataset)
    _say(f"[nasloc] 6/6 export: trial {best.trial} -> {run.best_export}")
    return export_model(best.model, run.best_export, img_size=deploy_size, info=info,
                        mean=splits.mean, std=splits.std, label_names=splits.class_names, overwrite=True)


def search_band(space: SearchSpace, budget: float) -> Band:
    """The MACs band the supernet trains and the selection draws its candidates from: the budget down to
    :data:`BAND_LOW` of it (or the space's smallest arch)."""
    return Band(max(space.macs_range()[0], BAND_LOW * budget), budget)


def _ray_trial_resources(device: torch.device) -> dict[str, int]:
    return {"cpu": 1, "gpu": 1} if device.type == "cuda" else {"cpu": 1}


def _save_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save

    with atomic_path(path) as tmp:  # bytes written by Python: a full disk is an OSError that atomic_path reports
        tmp.write_bytes(save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}))


def _say(message: str) -> None:
    print(message, flush=True)
