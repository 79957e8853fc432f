"""Phase 5: the finalists retrained from scratch, with the recipe that fits the retrain's length
(:func:`nasloc.training.recipe.fitted_recipe`: DeiT's from 100 epochs on, the short recipe below)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from optuna.trial import FrozenTrial

from ..arch import Arch
from ..console import say
from ..fileio import atomic_path
from ..models import LocalityViT
from ..run import RunDir, RunOptions, RunRecord
from ..search.study import SEED_DESIGN_ATTR
from ..space.flops import count
from ..space.search_space import SearchSpace
from ..training.checkpoint import finish_checkpoint
from ..training.data import DataSplits, load_dataset
from ..training.recipe import RetrainConfig, fitted_recipe
from ..training.retrain import RESUMED, Retrained, retrain


def run_recipe(options: RunOptions, train_images: int, **overrides: object) -> RetrainConfig:
    """The recipe the run's retrain step trains with (:func:`~nasloc.training.recipe.fitted_recipe`), at the
    run's --batch-size where the recipe's batch is larger than the training split (a data set of a few dozen
    images would otherwise give no step at all; the learning rate scales with the batch)."""
    cfg = fitted_recipe(options.retrain_epochs, seed=options.seed, **overrides)
    return cfg if cfg.batch_size <= train_images else replace(cfg, batch_size=options.batch_size)


def retrain_phase(chosen: list[FrozenTrial], space: SearchSpace, splits: DataSplits, record: RunRecord, run: RunDir) -> list[Retrained]:
    """Retrain the chosen search trials (the selection's finalists, or the Pareto front's best by proxy) from
    scratch."""
    options = record.options
    size = options.retrain_img_size
    if chosen:
        say(f"[nasloc] 5/6 retrain: {len(chosen)} finalists at {size} px, {options.retrain_epochs} epochs each")
    data = splits if size == splits.img_size else load_dataset(options.dataset, options.data_dir, size, seed=options.seed)
    results = []
    for trial in chosen:
        arch = Arch.from_dict(trial.user_attrs["arch"]).replace(img_size=size)
        cfg = run_recipe(options, len(data.train), img_size=size)
        model = LocalityViT(arch, drop_path_rate=cfg.drop_path)
        folder = run.write_retrained_arch(trial.number, arch)
        result = retrain(model, data, cfg, folder, device=options.device)  # resumes; all epochs done: only reads
        weights = run.retrained_weights(trial.number)
        if result.epochs_run > 0 or not weights.exists():
            _save_weights(model, weights)
        if options.keep_checkpoints == "needed":  # finished: a rerun reads its weights and history only
            finish_checkpoint(result.checkpoint, keep=RESUMED)
        if result.start_epoch:
            say(f"[nasloc]   trial {trial.number}: " + ("already retrained" if result.epochs_run == 0 else f"resumed after epoch {result.start_epoch}"))
        at_deploy = count(arch.replace(img_size=space.img_size))  # as the export and the Pareto table count
        results.append(Retrained(trial.number, model, trial.user_attrs["top1"], result.val_top1,
                                 macs=at_deploy.macs, params=at_deploy.params,
                                 design=trial.user_attrs.get(SEED_DESIGN_ATTR, "searched")))
    return results


def _save_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save

    with atomic_path(path) as tmp:  # bytes written by Python: a full disk is an OSError that atomic_path reports
        tmp.write_bytes(save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}))
