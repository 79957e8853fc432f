"""Phase 4: the selection of a run (successive halving of the search's best and the seed designs)."""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import optuna
import torch

from ..console import say
from ..report.tables import write_csv
from ..run import SELECTION_CSV, RunDir, RunRecord
from ..search.ray import trial_resources
from ..selection.candidates import search_candidates
from ..selection.halving import SelectionResult, tied_note
from ..selection.pool import RungPool
from ..selection.study import run_selection, selection_rows, stored_schedule
from ..selection.trainer import RungTrainer, SelectionConfig, TrainerSpec
from ..space.band import search_band
from ..space.search_space import SearchSpace
from ..storage.factory import open_storage
from ..supernet.proxy import EvaluatorSpec
from ..supernet.supernet import Supernet
from ..training.checkpoint import drop_checkpoints
from ..training.data import DataSplits


def selection_phase(study: optuna.Study, supernet: Supernet, splits: DataSplits, space: SearchSpace, checkpoint: Path,
                    record: RunRecord, run: RunDir) -> SelectionResult:
    """Successive halving of the search's best candidates and the seed designs (:mod:`nasloc.selection`),
    scored on the selection half of the validation split (Ray's ASHA with ``--backend ray``); writes
    ``selection.csv``."""
    options = record.options
    candidates = search_candidates(study, options.budget, options.select_top_k, search_band(space, options.budget).lo)
    storage = open_storage(options.storage, heartbeat_interval=None)  # no Study.optimize to beat for
    config = SelectionConfig(epochs=options.select_epochs, top_k=options.select_top_k, init=options.select_init,
                             schedule_epochs=stored_schedule(storage, record.selection_study) or options.retrain_epochs,
                             score=options.select_score, batch_size=options.batch_size, seed=options.seed)
    say(f"[nasloc] 4/6 selection: {len(candidates)} candidates ({sum(not c.source.isdigit() for c in candidates)} "
        f"seed designs), rungs up to {config.epochs} epochs of the {config.schedule_epochs}-epoch retrain from "
        f"{config.init}, ranked by {config.score} on {len(splits.val)} held-out images"
        + (f", {options.workers} trainings at a time" if options.workers > 1 else ""))
    device = next(supernet.parameters()).device
    spec = TrainerSpec(EvaluatorSpec.for_run(record, checkpoint, str(device)), config, str(run.home))
    # Ties are what the held-out images cannot tell apart: a training-loss score (tse) has none to speak of.
    held_out = 0 if config.score == "tse" else len(splits.val)
    if options.backend == "ray":
        from ..selection.ray import run_ray_selection

        result = run_ray_selection(candidates, spec, storage, max_epochs=config.epochs,
                                   reduction_factor=config.reduction_factor, ray_address=options.ray_address,
                                   max_concurrent=options.workers, results_dir=run.ray_dir,
                                   resources_per_trial=trial_resources(device.type), held_out=held_out,
                                   score=config.score, schedule_epochs=config.schedule_epochs, say=say,
                                   study_name=record.selection_study)
    else:  # one training at a time, or --workers processes that rebuild the trainer from the spec (threads shared)
        release = (lambda search_trial: drop_checkpoints(run.selection_dir(search_trial))) \
            if options.keep_checkpoints == "needed" else None
        trainer = (RungPool(spec, options.workers, max(1, torch.get_num_threads() // options.workers))
                   if options.workers > 1 else
                   nullcontext(RungTrainer(supernet, splits, config, run.selection_dir, device=options.device)))
        with trainer as advance:
            result = run_selection(candidates, advance, storage, max_epochs=config.epochs,
                                   reduction_factor=config.reduction_factor, held_out=held_out,
                                   score=config.score, schedule_epochs=config.schedule_epochs, say=say,
                                   progress=True, release=release, study_name=record.selection_study)
    if options.keep_checkpoints == "needed":  # the retrain starts from scratch: no candidate's weights go on
        for trial in result.study.get_trials(deepcopy=False):
            drop_checkpoints(run.selection_dir(trial.user_attrs["search_trial"]))
    write_csv(selection_rows(result.study), run.home / SELECTION_CSV)
    note = tied_note(result, options.retrain_top_k)
    if note:
        say(f"[nasloc]   {note}")
    return result
