"""The retraining recipe (:class:`RetrainConfig`): the DeiT / DW recipe of the seed papers.

AdamW, lr 5e-4 per 512 images scaled linearly with the global batch, weight decay 0.05 (not on norms,
biases or the model's ``no_weight_decay()``), cosine schedule with linear warm-up, label smoothing 0.1,
mixup 0.8 / cutmix 1.0, RandAugment rand-m9-mstd0.5-inc1, gradient clipping at 5. That recipe is tuned
for 300 epochs; for short CPU runs lower ``mixup``/``cutmix`` (or set them to 0), which otherwise slow
learning a lot."""
from __future__ import annotations

from dataclasses import dataclass


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
    amp: bool | None = None  # None = on exactly when training on CUDA
    img_size: int | None = None  # None = the size the data was loaded at
    num_workers: int = 2
    seed: int = 0
