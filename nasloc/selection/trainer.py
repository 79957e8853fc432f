"""How a selection candidate is trained in the rungs: :class:`RungTrainer`, and the spec that rebuilds it in
another process."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import TrainingDiverged
from ..run import SELECT_INITS, arch_folder
from .candidates import Candidate


@dataclass(frozen=True)
class SelectionConfig:
    """How candidates are trained in the rungs (``--select-*``)."""

    epochs: int = 4  # the last rung; rungs are 1, 2, 4, ... up to it
    top_k: int = 8  # search candidates; the seed designs come on top
    init: str = "scratch"  # "scratch": fresh weights (ranks better, bench/bench_selection.py); "supernet": fine-tune
    reduction_factor: int = 2
    batch_size: int = 64  # as measured in bench/bench_selection.py; more steps per epoch on small data sets
    seed: int = 0


class RungTrainer:
    """``advance`` for :func:`run_selection`: trains a candidate at the supernet's resolution with the
    retraining code (checkpoint every epoch, one folder per selection trial), on the cosine schedule of
    the last rung, with weak augmentation (crop and flip), and scores it on ``splits.val``."""

    def __init__(self, supernet: Any, splits: Any, config: SelectionConfig, folder: Callable[[int], Any],
                 device: str = "auto"):
        if config.init not in SELECT_INITS:
            raise ValueError(f"selection init must be one of {SELECT_INITS}, got {config.init!r}")
        self.supernet, self.splits, self.config, self.folder, self.device = supernet, splits, config, folder, device

    def __call__(self, number: int, candidate: Candidate, epochs: int) -> float:
        import torch

        from ..models import LocalityViT
        from ..training.recipe import RetrainConfig
        from ..training.retrain import retrain

        arch = self.supernet.at_resolution(candidate.arch)
        torch.manual_seed(self.config.seed)  # the scratch init (a resumed training loads its checkpoint)
        model = self.supernet.extract(arch) if self.config.init == "supernet" else LocalityViT(arch)
        cfg = RetrainConfig(epochs=self.config.epochs, batch_size=self.config.batch_size, seed=self.config.seed,
                            warmup_epochs=0 if self.config.init == "supernet" else 1, mixup=0.0, cutmix=0.0,
                            randaugment="", ema_decay=0.0, img_size=self.supernet.img_size)
        folder = arch_folder(Path(self.folder(number)), arch)  # resumes this arch's training only
        try:
            result = retrain(model, self.splits, cfg, folder, device=self.device, progress=False, stop_epoch=epochs)
        except TrainingDiverged:  # a candidate whose loss blows up is out of the race, not the end of the run
            return math.nan
        return result.history[epochs - 1]["val_top1"]


@dataclass(frozen=True)
class TrainerSpec:
    """Everything a fresh process (a Ray worker) needs to rebuild a run's :class:`RungTrainer`: the proxy
    evaluator's spec (space, supernet checkpoint, data, resolution, seed, device), the selection config and
    the run folder (each candidate trains in ``RunDir.selection_dir``)."""

    evaluator: Any  # nasloc.supernet.proxy.EvaluatorSpec
    config: SelectionConfig
    run_dir: str

    def __call__(self) -> RungTrainer:
        from ..run import RunDir
        from ..training.data import halve_val

        supernet, splits = self.evaluator.load()
        _, selection_half = halve_val(splits, self.evaluator.seed)
        return RungTrainer(supernet, selection_half, self.config, RunDir(Path(self.run_dir)).selection_dir,
                           device=self.evaluator.device)
