"""How a selection candidate is trained in the rungs: :class:`RungTrainer`, and the spec that rebuilds it in
another process.

A candidate trains with the recipe and the learning-rate schedule of the retrain it stands for
(:func:`nasloc.training.recipe.fitted_recipe` of ``--retrain-epochs``), stopped at each rung and resumed at
the next, so that its curve is the start of the retrain's. With ``--select-score complete`` each rung is a
training of its own whose schedule ends with the rung (NAS-Bench-201's reduced setting).

CUDA running out of memory in a candidate's training ends the selection with one line
(:class:`nasloc.errors.OutOfMemory`) naming the candidate, its arch, the batch size and half of it: dropping the
candidate would rank the others without it. The rungs already scored and the epochs already trained (each
candidate's ``last.pth``) are kept, and the rerun resumes from them."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import OutOfMemory, TrainingDiverged, out_of_memory
from ..run import SELECT_INITS, arch_folder
from .candidates import Candidate
from .scores import Curve


@dataclass(frozen=True)
class SelectionConfig:
    """How candidates are trained in the rungs (``--select-*``)."""

    epochs: int = 4  # the last rung; rungs are 1, 2, 4, ... up to it
    schedule_epochs: int = 5  # the retrain's length: the lr schedule the candidates train on
    score: str = "val"  # what ranks them (nasloc.selection.scores.score_of)
    top_k: int = 8  # search candidates; the seed designs come on top
    init: str = "scratch"  # "scratch": fresh weights (ranks better, bench/bench_selection.py); "supernet": fine-tune
    reduction_factor: int = 2
    batch_size: int = 64  # as measured in bench/bench_selection.py; more steps per epoch on small data sets
    seed: int = 0


class RungTrainer:
    """``advance`` for :func:`run_selection`: trains a candidate at the supernet's resolution with the
    retraining code (checkpoint every epoch, in ``folder(search trial)``) on the retrain's recipe and
    schedule (see the module), evaluating it on ``splits.val`` after every epoch; returns its curve."""

    def __init__(self, supernet: Any, splits: Any, config: SelectionConfig, folder: Callable[[int], Any],
                 device: str = "auto"):
        if config.init not in SELECT_INITS:
            raise ValueError(f"selection init must be one of {SELECT_INITS}, got {config.init!r}")
        self.supernet, self.splits, self.config, self.folder, self.device = supernet, splits, config, folder, device

    def __call__(self, number: int, candidate: Candidate, epochs: int) -> Curve:
        import torch

        from ..models import LocalityViT
        from ..supernet.train import described
        from ..training.recipe import fitted_recipe
        from ..training.retrain import retrain

        arch = self.supernet.at_resolution(candidate.arch)
        complete = self.config.score == "complete"  # a training of its own per rung, its schedule ends there
        fine_tuning = {"warmup_epochs": 0} if self.config.init == "supernet" else {}  # the weights are trained
        cfg = fitted_recipe(self.config.schedule_epochs, epochs=epochs if complete else self.config.schedule_epochs,
                            batch_size=self.config.batch_size, seed=self.config.seed, img_size=self.supernet.img_size,
                            **fine_tuning)
        torch.manual_seed(self.config.seed)  # the scratch init (a resumed training loads its checkpoint)
        model = (self.supernet.extract(arch) if self.config.init == "supernet"
                 else LocalityViT(arch, drop_path_rate=cfg.drop_path))
        folder = arch_folder(Path(self.folder(candidate.trial)), arch)  # by search trial; resumes this arch only
        if complete:
            folder = folder / f"rung_{epochs}"
        try:
            result = retrain(model, self.splits, cfg, folder, device=self.device, progress=False, stop_epoch=epochs)
        except TrainingDiverged:  # a candidate whose loss blows up is out of the race, not the end of the run
            return Curve((math.nan,), (math.nan,), cfg.epochs)
        except (torch.cuda.OutOfMemoryError, OutOfMemory) as e:  # the epoch it was in is not written
            kept = (f"the rungs already scored and the epochs trained (in {folder}) are kept, and the rerun resumes "
                    "from them")
            raise out_of_memory(f"training selection candidate {candidate.name} ({described(arch)})",
                                self.config.batch_size, kept, e) from None
        return Curve.from_history(result.history[:epochs], cfg.epochs)


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
