"""The retraining recipe (:class:`RetrainConfig`) and the one that fits a training's length (:func:`fitted_recipe`).

The defaults are the DeiT / DW recipe of the seed papers: AdamW, lr 5e-4 per 512 images scaled linearly with the
global batch, weight decay 0.05 (not on norms, biases or the model's ``no_weight_decay()``), cosine schedule with
linear warm-up, label smoothing 0.1, mixup 0.8 / cutmix 1.0, RandAugment rand-m9-mstd0.5-inc1, drop path 0.1,
gradient clipping at 5. It is tuned for 300 epochs: its regularisation and small learning rate pay off only
over hundreds of epochs and slow a short training down a lot.
"""
from __future__ import annotations

from dataclasses import dataclass

# Trainings shorter than this take the short recipe (see fitted_recipe).
SHORT_RUN_EPOCHS = 100
# The short recipe: DeiT's without its heavy regularisation, at a learning rate that converges within tens of
# epochs (1e-3 at batch 128, the CIFAR-10 evidence's recipe at 10 and 30 epochs, results/benchmarks.md).
SHORT_RECIPE = dict(lr=4e-3, warmup_epochs=1, mixup=0.0, cutmix=0.0, randaugment="", ema_decay=0.0, drop_path=0.0)


@dataclass
class RetrainConfig:
    """Retraining recipe; defaults are the DeiT / DW recipe of the seed papers (see module docstring)."""

    epochs: int = 300
    batch_size: int = 128  # per process; the global batch is batch_size * world size
    lr: float = 5e-4  # per 512 images: the lr used is lr * global_batch / 512 (DeiT's linear scaling)
    weight_decay: float = 0.05
    warmup_epochs: float = 5  # at most a tenth of the run is warm-up (see _Optimization)
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    label_smoothing: float = 0.1
    mixup: float = 0.8  # mixup alpha, 0 = off
    cutmix: float = 1.0  # cutmix alpha, 0 = off
    randaugment: str = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec, "" = off
    ema_decay: float = 0.0  # 0 = no EMA of the weights
    grad_clip: float = 5.0  # max gradient norm, 0 = off
    drop_path: float = 0.1  # stochastic depth of the model: whoever builds the model for retrain() builds it so
    amp: bool | None = None  # None = on exactly when training on CUDA
    img_size: int | None = None  # None = the size the data was loaded at
    num_workers: int = 2
    seed: int = 0


def fitted_recipe(run_epochs: int, **overrides: object) -> RetrainConfig:
    """The recipe for a training of ``run_epochs`` epochs: DeiT's from :data:`SHORT_RUN_EPOCHS` on, else the short
    recipe (:data:`SHORT_RECIPE`); ``overrides`` (any field; ``epochs`` too, for a part of such a training) win."""
    fitted = {} if run_epochs >= SHORT_RUN_EPOCHS else SHORT_RECIPE
    return RetrainConfig(**{"epochs": run_epochs, **fitted, **overrides})
