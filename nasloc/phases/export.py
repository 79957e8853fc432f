"""Phase 6: the best retrained finalist exported as a timm model."""
from __future__ import annotations

from pathlib import Path

from ..console import say
from ..deploy.export import export_model
from ..run import RunDir, RunOptions
from ..training.data import DataSplits
from ..training.retrain import Retrained


def export_phase(retrained: list[Retrained], options: RunOptions, run: RunDir, splits: DataSplits,
                 deploy_size: int) -> Path | None:
    if not retrained:
        return None
    best = max(retrained, key=lambda r: r.val_top1)
    info = dict(trial=best.trial, macs_at_deploy=best.macs, params=best.params, proxy_top1=best.proxy_top1,
                retrained_top1=best.val_top1, budget_macs=options.budget, dataset=options.dataset)
    say(f"[nasloc] 6/6 export: trial {best.trial} -> {run.best_export}")
    return export_model(best.model, run.best_export, img_size=deploy_size, info=info,
                        mean=splits.mean, std=splits.std, label_names=splits.class_names, overwrite=True)
