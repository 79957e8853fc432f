"""Augmentation and loss of the recipe.

Images that are decoded lazily (large, PIL) go through ``timm.data.create_transform``'s ImageNet stages
(RandomResizedCrop + flip, then RandAugment, then to-tensor + normalise; resize + centre crop 0.875 at
eval). For the in-memory uint8 datasets (small images) each image goes through timm's RandAugment
(``rand_augment_transform``, on a PIL view of the tensor), then the loader does the CIFAR-style padded
random crop and flip batch-wise on the device: a random-resized crop at scale 0.08 would leave ~9 px of a
32 px image. Both use one RandAugment guarded against a timm/Pillow 13 crash (see :func:`rand_augment`)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageOps
from timm.data import Mixup, create_transform, rand_augment_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch.utils.data import Dataset
from torchvision import transforms

from ..models.locality_vit import EVAL_CROP_PCT
from .data import DataSplits, LazyImageDataset
from .recipe import RetrainConfig


def train_dataset(splits: DataSplits, cfg: RetrainConfig, img_size: int) -> tuple[Dataset, str]:
    """The training set with the recipe's augmentation, and the loader's own augmentation to add."""
    if isinstance(splits.train, LazyImageDataset):
        # timm's ImageNet pipeline with our RandAugment in the middle (see rand_augment for why ours).
        crop_flip, _, to_tensor = create_transform(img_size, is_training=True, interpolation="bicubic",
                                                   color_jitter=None, mean=splits.mean, std=splits.std,
                                                   separate=True)
        middle = [rand_augment(cfg.randaugment, img_size, splits.mean)] if cfg.randaugment else []
        return splits.train.with_transform(transforms.Compose([crop_flip, *middle, to_tensor])), "none"
    if not cfg.randaugment:
        return splits.train, "weak"
    # The image is augmented at its stored size; the loader may resize it afterwards.
    return _PilTransformed(splits.train, rand_augment(cfg.randaugment, splits.img_size, splits.mean)), "weak"


def rand_augment(spec: str, img_size: int, mean: tuple[float, ...]) -> Callable[[Image.Image], Image.Image]:
    """timm's RandAugment with the hyper-parameters create_transform would give it.

    Its Posterize ops ask for 0 bits at the ends of their magnitude range (PosterizeIncreasing at
    magnitude 10, which rand-m9-mstd0.5 draws ~2% of the time); Pillow >= 13 raises on that, killing a
    run mid-epoch, so those ops keep at least 1 bit here.
    """
    hparams = dict(translate_const=int(img_size * 0.45), img_mean=tuple(round(255 * m) for m in mean),
                   interpolation=Image.Resampling.BICUBIC)
    augment = rand_augment_transform(spec, hparams)
    for op in augment.ops:
        if op.name.startswith("Posterize"):
            op.aug_fn = _posterize_at_least_1_bit
    return augment


def _posterize_at_least_1_bit(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    return img if bits_to_keep >= 8 else ImageOps.posterize(img, max(1, bits_to_keep))


def eval_dataset(dataset: Dataset, splits: DataSplits, img_size: int) -> Dataset:
    """``dataset`` as retraining evaluates it (``nasloc evaluate`` too): lazily decoded images through timm's
    eval transform (resize, centre crop), in-memory ones as they are (the loader resizes them)."""
    if isinstance(dataset, LazyImageDataset):
        return dataset.with_transform(create_transform(img_size, is_training=False, interpolation="bicubic",
                                                       crop_pct=EVAL_CROP_PCT, mean=splits.mean, std=splits.std))
    return dataset


class _PilTransformed(Dataset):
    """Applies a PIL-image transform (timm's RandAugment) to a dataset of uint8 (3, H, W) tensors."""

    def __init__(self, base: Dataset, transform: Callable[[Image.Image], Image.Image]):
        self.base = base
        self.transform = transform
        self.hflip = getattr(base, "hflip", True)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img, label = self.base[i]
        out = self.transform(Image.fromarray(img.permute(1, 2, 0).numpy()))
        return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1), label


def mixup_and_loss(cfg: RetrainConfig, num_classes: int) -> tuple[Mixup | None, nn.Module]:
    if cfg.mixup > 0 or cfg.cutmix > 0:
        if cfg.batch_size % 2:
            raise ValueError(f"mixup/cutmix need an even batch_size, got {cfg.batch_size}")
        # Mixup folds label smoothing into its soft targets.
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                      num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    if cfg.label_smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=cfg.label_smoothing)
    return None, nn.CrossEntropyLoss()
