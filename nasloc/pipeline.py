"""The whole job behind ``run_search.py``: supernet -> search -> report -> selection -> retrain -> export.

Every phase writes into the run folder (:class:`nasloc.run.RunDir`) and is resumable: the supernet from its
last epoch checkpoint, the search from its Optuna storage (a rerun continues to ``trials``), the selection
from its own study and each candidate's last epoch, retraining from each subnet's last epoch, and a
finished phase is not redone. The validation split is halved: the search scores its proxy on one half, the
selection its short trainings on the other. Options come as :class:`nasloc.run.RunOptions`
(validated by :mod:`nasloc.cli.main`, or made in Python).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from .console import say
from .phases.export import export_phase
from .phases.inputs import check_resources, load_inputs
from .phases.plan import PhaseTimes, Plan, make_plan
from .phases.report import final_report, reference_points, report_phase
from .phases.retrain import retrain_phase
from .phases.search import queue_seed_designs, search_phase
from .phases.selection import selection_phase
from .phases.supernet import PhaseError, require_trained_supernet, train_phase, trained_checkpoint
from .report.dashboard import serve_dashboard
from .report.family import BudgetResult, write_family
from .report.summary import write_family_summary, write_summary
from .run import RunDir, RunOptions, RunRecord
from .selection.halving import finalists
from .space.search_space import SearchSpace
from .storage.disk_full import storage_disk_full
from .supernet.supernet import Supernet
from .training.data import DataSplits, halve_val
from .training.distributed import resolve_device
from .units import format_macs


def run_pipeline(options: RunOptions) -> Path:
    """Run (or resume) every phase; returns the run folder. A model family (``options.family``) trains one
    supernet over its budgets' bands, then searches, selects, retrains and exports at each budget in turn."""
    started = time.time()
    space, splits, record = _checked_inputs(options)
    options = record.options  # with the image sizes chosen
    run = RunDir(options.run_dir)
    # Under torchrun the other ranks only train the supernet: the record, the dashboard and the queued seed
    # designs are rank 0's (two ranks would queue them twice and race for the dashboard's port).
    main_process = int(os.environ.get("RANK", "0")) == 0
    if options.phase != "search" and main_process:  # extra search workers leave the run's record alone
        run.write_record(record)
    device = resolve_device(options.device)
    lo, hi = space.macs_range()
    budgets = ", ".join(options.family) if options.family else format_macs(options.budget)
    say(f"[nasloc] run {run.root} | budget{'s' * bool(options.family)} {budgets} at {space.img_size} px | "
        f"space {space.name} ({format_macs(lo)} - {format_macs(hi)}) | "
        f"proxy {options.proxy_img_size} px on {options.dataset} | device {device}")
    plan = make_plan(record, space, splits) if options.phase == "all" and main_process else None
    for line in plan.lines() if plan else ():
        say(line)
    took = PhaseTimes()
    dashboard = serve_dashboard(options.storage, options.dashboard_port) if options.dashboard and main_process else None
    try:
        with storage_disk_full(options.storage):  # SQLite or journal file on a full disk: one line
            torch.manual_seed(options.seed)
            supernet = Supernet(space, options.proxy_img_size).to(device)
            with took("supernet"):
                if options.phase == "search":
                    checkpoint = trained_checkpoint(supernet, run, device)
                else:
                    checkpoint = train_phase(supernet, splits, space, options, run, device)
            if not main_process:
                return run.root
            if options.phase != "search":  # once per run, before any search worker (--phase search) starts
                for member in record.members():
                    queue_seed_designs(space, member)
            if options.phase == "supernet":
                return run.root
            members = [_run_member(member, run.member_dir(member.member), supernet, space, splits, checkpoint, took)
                       for member in record.members()]
            if options.phase == "search":
                return run.root
            if options.family:
                write_family(run, members, planned=plan and plan.by_phase(), took=took.seconds)
                write_family_summary(run, record, members, time.time() - started, len(splits.val),
                                     plan and plan.by_phase(), took.seconds)
            else:
                write_summary(run, record, space, members[0], time.time() - started, len(splits.val),
                              plan and plan.by_phase(), took.seconds)
    finally:
        if dashboard is not None:
            dashboard.shutdown()
            dashboard.server_close()
    say(f"[nasloc] done in {time.time() - started:.0f} s: {run.summary}")
    return run.root


def _run_member(record: RunRecord, run: RunDir, supernet: Supernet, space: SearchSpace, splits: DataSplits,
                checkpoint: Path, took: PhaseTimes) -> BudgetResult | None:
    """Search, report, selection, retrain and export at one budget (a family's member, or the run's budget);
    a member's summary too. Returns what they gave (None after a search alone, ``--phase search``)."""
    started = time.time()
    options = record.options
    if record.member:
        say(f"[nasloc] budget {record.member} ({format_macs(options.budget)}): {run.relative(run.home)}/")
    search_data, select_data = halve_val(splits, options.seed)
    with took("search"):
        study = search_phase(supernet, search_data, space, checkpoint, record, run)
    if options.phase == "search":
        return None
    references = reference_points(study)
    pareto = report_phase(study, options, run, references)
    with took("selection"):
        if options.select_top_k:
            selection = selection_phase(study, supernet, select_data, space, checkpoint, record, run)
            by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
            chosen = [by_number[t.user_attrs["search_trial"]] for t in finalists(selection, options.retrain_top_k)]
        else:
            selection = None
            chosen = sorted(pareto, key=lambda t: t.user_attrs["top1"], reverse=True)[: options.retrain_top_k]
    with took("retrain"):
        retrained = retrain_phase(chosen, space, splits, record, run)
    with took("export"):
        export_dir = export_phase(retrained, options, run, splits, space.img_size)
    final_report(study, options, run, references, selection, retrained)
    result = BudgetResult(record.member, options.budget, study, pareto, selection, retrained, references, export_dir)
    if record.member:
        write_summary(run, record, space, result, time.time() - started, len(splits.val))
    return result


def dry_run(options: RunOptions) -> Plan:
    """What :func:`run_pipeline` would do with ``options`` and what it would cost: every input checked as the run
    checks it, nothing written."""
    space, splits, record = _checked_inputs(options)
    return make_plan(record, space, splits)


def _checked_inputs(options: RunOptions) -> tuple[SearchSpace, DataSplits, RunRecord]:
    """Every check before anything is written (a refused run leaves nothing behind), and the run's inputs."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and options.phase != "supernet":
        # The search, retraining and export run in one process; DDP serves supernet training.
        raise PhaseError("under torchrun only --phase supernet runs (DDP supernet training); "
                         "then run the search without torchrun (same options)")
    check_resources(options)
    space, splits, record = load_inputs(options)
    run = RunDir(record.options.run_dir)
    run.check_resumable(record)
    if options.phase == "search":
        require_trained_supernet(run, options.supernet_epochs)
    return space, splits, record
