"""Phase 6: the best retrained finalist exported as a timm model."""
from __future__ import annotations

from pathlib import Path

from ..console import say
from ..deploy.export import export_model
from ..deploy.model_card import RECIPE_KEYS
from ..report.family import exported_finalist
from ..run import RunDir, RunOptions
from ..training.data import DataSplits
from ..training.retrain import Retrained
from .retrain import run_recipe


def export_phase(retrained: list[Retrained], options: RunOptions, run: RunDir, splits: DataSplits,
                 deploy_size: int) -> Path | None:
    if not retrained:
        return None
    best = exported_finalist(retrained)
    recipe = run_recipe(options, len(splits.train))  # what the finalists were retrained with
    info = dict(trial=best.trial, design=best.design, macs_at_deploy=best.macs, params=best.params,
                proxy_top1=best.proxy_top1, retrained_top1=best.val_top1, val_images=len(splits.val),
                budget_macs=options.budget, dataset=options.dataset, space=Path(options.space).stem,
                retrain_epochs=options.retrain_epochs, seed=options.seed,
                recipe={key: getattr(recipe, key) for key in RECIPE_KEYS})
    say(f"[nasloc] 6/6 export: trial {best.trial} -> {run.best_export}")
    return export_model(best.model, run.best_export, img_size=deploy_size, info=info,
                        mean=splits.mean, std=splits.std, label_names=splits.class_names, overwrite=True)
