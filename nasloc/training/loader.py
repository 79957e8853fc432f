"""Batches on the device: `make_loader` turns any dataset of :mod:`nasloc.training.data` into batches of normalised
float32 tensors on the target device, resized to the model's input size, with the weak augmentation
(CIFAR-style padded random crop and flip) done there, batch-wise, instead of per image in workers.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..errors import NaslocError
from .data import LazyImageDataset


class BatchSizeError(NaslocError):
    """The batch is larger than the training images of a process."""


def check_batch_size(batch_size: int, train_images: int) -> None:
    """A training loader drops its incomplete last batch: with fewer training images per process than one batch
    it would give no step at all. Commands call this before they write anything, with the split they loaded."""
    if train_images < batch_size:
        raise BatchSizeError(f"--batch-size {batch_size}: the training split has only {train_images} images per "
                             "process; lower the batch size")


class _ShardSampler(Sampler[int]):
    """Every world-th index from rank: each sample evaluated exactly once across ranks (no padding)."""

    def __init__(self, n: int, rank: int, world: int):
        self.indices = range(rank, n, world)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class DeviceLoader:
    """Batches as normalised float32 (B, 3, S, S) on `device`, with labels.

    uint8 batches travel to the device as uint8 (4x less copying), are resized there if their size isn't
    `img_size`, augmented batch-wise and normalised. Float batches are taken as already normalised by the
    dataset's own transform (e.g. timm's) and are only moved. Call `set_epoch` before each epoch so the
    shuffle and the augmentation differ per epoch yet are reproducible.
    """

    def __init__(self, loader: DataLoader, device: torch.device, img_size: int, mean: Sequence[float],
                 std: Sequence[float], augment: str, hflip: bool, seed: int, rank: int):
        self.loader = loader
        self.device = device
        self.img_size = img_size
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.augment = augment
        self.hflip = hflip
        self.seed = seed
        self.rank = rank
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if isinstance(self.loader.sampler, DistributedSampler):
            self.loader.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed * 1_000_003 + self.epoch * 1_009 + self.rank)
        non_blocking = self.device.type == "cuda"
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=non_blocking)
            y = y.to(self.device, non_blocking=non_blocking)
            if x.dtype == torch.uint8:
                x = x.float().div_(255)
                if x.shape[-2:] != (self.img_size, self.img_size):
                    x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear",
                                      align_corners=False, antialias=True)
                if self.augment == "weak":
                    x = weak_augment(x, self.hflip, gen)
                x = (x - self.mean) / self.std
            yield x, y


def weak_augment(x: torch.Tensor, hflip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image random crop after zero padding by S/8 (4 px at 32), plus a random horizontal flip.

    One gather for the whole batch, so it runs on the GPU without a per-image Python loop.
    """
    b, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1)  # (B, H+2p, W+2p, C)
    dy = torch.randint(0, 2 * pad + 1, (b, 1), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), device=x.device, generator=generator)
    rows = dy + torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device).expand(b, w)
    if hflip:
        flip = torch.rand(b, 1, device=x.device, generator=generator) < 0.5
        cols = torch.where(flip, cols.flip(1), cols)
    cols = cols + dx
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


DECODING_WORKERS = 2  # loader processes for images decoded from their files on every pass (ImageNet folders)


def default_workers(dataset: Dataset) -> int:
    """Loader processes for ``dataset``: :data:`DECODING_WORKERS` for images decoded from files on every pass,
    none for images held in memory (a worker would only copy them)."""
    return DECODING_WORKERS if isinstance(dataset, LazyImageDataset) else 0


def make_loader(dataset: Dataset, batch_size: int, train: bool, img_size: int, mean: Sequence[float],
                std: Sequence[float], augment: str = "weak", num_workers: int | None = None, seed: int = 0,
                distributed: bool = False, device: str | torch.device = "cpu") -> DeviceLoader:
    """A loader of normalised float batches on `device`, decoding in ``num_workers`` processes (None:
    :func:`default_workers`).

    train=True: shuffled per epoch (seeded by seed and epoch), incomplete last batch dropped, and with
    augment="weak" a random padded crop plus horizontal flip (no flip for datasets whose `hflip` is
    False, e.g. digits). train=False: in order, never augmented. distributed=True shards the data over
    the ranks of the initialised process group (training: equal shards; evaluation: each sample once).
    """
    if augment not in ("weak", "none"):
        raise ValueError(f"augment must be 'weak' or 'none', got {augment!r}")
    device = torch.device(device)
    num_workers = default_workers(dataset) if num_workers is None else num_workers
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    if train:
        # DistributedSampler also serves a single process: one code path for a seeded per-epoch shuffle.
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                     drop_last=True)
        check_batch_size(batch_size, len(sampler))
    else:
        sampler = _ShardSampler(len(dataset), rank, world)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=train,
                        num_workers=num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=num_workers > 0,
                        generator=torch.Generator().manual_seed(seed))
    return DeviceLoader(loader, device, img_size, mean, std, augment if train else "none",
                        getattr(dataset, "hflip", True), seed, rank)
