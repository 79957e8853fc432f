"""Supernet training: the sandwich rule with in-place distillation, inside the search's MACs band.

Every step trains the largest arch of the band on the labels, then the smallest arch of the band and
``random_subnets`` random archs of the band on the largest one's soft predictions (NASViT,
ElasticViT): gradients of all of them are summed before one optimizer step. Sampling only inside the
band the search will use keeps the supernet from spending capacity on archs the search never
evaluates, which is the documented failure mode of ViT supernets (gradient conflict between very
different subnets). Within the band, random archs are spread evenly over its MACs (sub-bands, as in
AttentiveNAS and NASViT), not where random archs are dense: the MACs the search will pick from are
all trained alike. AdamW with a per-step cosine schedule and warm-up (timm's components), weak
augmentation, gradient clipping.

Checkpoints ``last.pth`` every epoch (written to a temp file, then renamed; the epoch before kept as
``previous.pth``) and resumes from it (:mod:`nasloc.training.checkpoint`). CUDA running out of memory in a step
ends the training with one line (:class:`nasloc.errors.OutOfMemory`) naming the arch, the batch size and half of
it; the completed epochs stay, and the rerun resumes from them.
Under ``torchrun`` every rank samples the same archs (seeded by epoch and step), sees its own shard
of the data, and gradients are averaged over ranks before the step.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from tqdm import tqdm

from ..arch import Arch
from ..arch_view import locality
from ..errors import NaslocError, TrainingDiverged, out_of_memory
from ..space.band import Band
from ..space.choosers import FREE
from ..space.files import SpaceError
from ..space.flops import count
from ..space.search_space import SearchSpace
from ..training.checkpoint import load_checkpoint, resume_checkpoint, save_checkpoint
from ..training.data import DataSplits
from ..training.distributed import amp_dtype, resolve_device, setup_distributed
from ..training.loader import make_loader
from .supernet import Supernet

_logger = logging.getLogger(__name__)


@dataclass
class SupernetConfig:
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr: float = 1e-5
    random_subnets: int = 1  # besides the largest and the smallest
    sub_bands: int = 4  # random archs come from one of this many equal MACs parts of the band; 1: the whole band
    label_smoothing: float = 0.1
    grad_clip: float = 5.0
    seed: int = 0
    num_workers: int | None = None  # None: by the data (training.loader.default_workers)
    amp: bool | None = None  # mixed precision: None = on CUDA only (bf16 where supported, else fp16 + GradScaler)


@dataclass
class SupernetResult:
    checkpoint: Path
    epochs_run: int
    seconds: float
    last_loss: float


class SandwichSampler:
    """The archs of one training step: largest and smallest of the band, plus random ones spread over it.

    Each random arch comes from one of ``sub_bands`` equal parts of the band, chosen uniformly (AttentiveNAS,
    NASViT). Uniform archs of the whole band would follow the space's density instead (in the cifar space at
    0.03 GMACs: half of them in the band's top quarter, 4 % in its lowest). Parts that the space cannot
    reach are left out (none left: the whole band); a draw that misses its part takes an arch of the whole band.

    In a space that searches the stem, the largest and smallest archs are those of one stem per step, drawn in
    turn (:attr:`extremes` holds each stem's pair). The stem changes what every shared block sees, and the
    extremes are the most trained subnets (the largest also teaches the others): left to MACs alone both would
    always take the cheap patch stem, and a supernet trained so rated conv-stem archs 2-4 points below their
    patch-stem twins while short trainings from scratch ranked them first (results/evidence_full/README.md).
    """

    def __init__(self, supernet: Supernet, band: Band, random_subnets: int, sub_bands: int = SupernetConfig.sub_bands,
                 buckets: Sequence[Band] = ()):
        space = supernet.space
        self.space, self.band, self.random_subnets = space, band, random_subnets
        self.extremes = _extremes_per_stem(space, band)
        # A model family's budgets are buckets of equal share (as AttentiveNAS's FLOPs bins), each split alike.
        per_bucket = max(1, sub_bands // len(buckets)) if buckets else sub_bands
        parts = [part for bucket in (buckets or [band]) for part in bucket.split(per_bucket)]
        parts = [part for part in parts if _reachable(space, part)] if len(parts) > 1 else []
        self.parts = parts or [band]

    def step(self, rng: random.Random) -> list[Arch]:
        largest, smallest = rng.choice(self.extremes) if len(self.extremes) > 1 else self.extremes[0]
        randoms = [self._random(rng) for _ in range(self.random_subnets)]
        return [largest, smallest, *randoms]

    def _random(self, rng: random.Random) -> Arch:
        # One part draws nothing for its choice: sub_bands=1 gives the same archs as sampling the whole band.
        part = rng.choice(self.parts) if len(self.parts) > 1 else self.parts[0]
        try:
            return self.space.sample_in_band(rng, part.lo, part.hi)
        except SpaceError:
            return self.space.sample_in_band(rng, self.band.lo, self.band.hi)


def _extremes_per_stem(space: SearchSpace, band: Band) -> list[tuple[Arch, Arch]]:
    """(largest, smallest) arch of the band for each stem the space searches that can reach the band (one pair
    for a space that does not search the stem)."""
    pairs = []
    for stem in space.stem or (None,):
        fixed = None if stem is None else (lambda name, options, stem=stem: stem if name == "stem" else FREE)
        try:
            pairs.append(tuple(space.extreme(largest, lo=band.lo, hi=band.hi, fixed=fixed) for largest in (True, False)))
        except SpaceError:  # this stem has no arch in the band
            continue
    if not pairs:
        raise SpaceError(f"{space.source}: no arch found with MACs in [{band.lo:.4g}, {band.hi:.4g}]")
    return pairs


def _reachable(space: SearchSpace, band: Band) -> bool:
    """Whether the space has an arch in ``band`` (as far as a deterministic search finds one)."""
    try:
        space.decisions_in_band(random.Random(0), band.lo, band.hi)
    except SpaceError:
        return False
    return True


def fingerprint(supernet: Supernet) -> str:
    """Identifies what a checkpoint was trained for (space file content and resolution)."""
    text = f"{dataclasses.replace(supernet.space, source='')}|{supernet.img_size}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def train_supernet(
    supernet: Supernet,
    splits: DataSplits,
    band: Band,
    cfg: SupernetConfig,
    out_dir: Path,
    device: str = "auto",
    progress: bool = True,
    buckets: Sequence[Band] = (),
) -> SupernetResult:
    """Train ``supernet`` in place (resuming from ``out_dir/last.pth``); returns where it was saved. ``buckets``: a
    model family's budget bands inside ``band``, which share its random archs equally."""
    dist_info = setup_distributed()
    dev = resolve_device(device)
    supernet.to(dev)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "last.pth"
    loader = make_loader(
        splits.train, cfg.batch_size, train=True, img_size=supernet.img_size, mean=splits.mean, std=splits.std,
        augment="weak", num_workers=cfg.num_workers, seed=cfg.seed, distributed=dist_info.world_size > 1, device=dev,
    )
    optimizer = create_optimizer_v2(supernet, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * len(loader)
    scheduler = CosineLRScheduler(
        optimizer, t_initial=max(steps, 1), lr_min=cfg.min_lr, warmup_t=int(cfg.warmup_epochs * len(loader)),
        warmup_lr_init=cfg.lr * 0.01, t_in_epochs=False,
    )
    start_epoch = _resume(ckpt_path, supernet, optimizer, band, dev, cfg.epochs)
    # The schedule is a function of the step: rebuilt from this run's epochs, not the checkpoint's.
    scheduler.step_update(start_epoch * len(loader))
    _broadcast_state(supernet, dist_info.world_size)  # every rank starts from rank 0's weights
    sampler = SandwichSampler(supernet, band, cfg.random_subnets, cfg.sub_bands, buckets)
    precision = _Precision(amp_dtype(cfg.amp, dev), dev)
    started, loss = time.time(), float("nan")
    for epoch in range(start_epoch, cfg.epochs):
        loader.set_epoch(epoch)
        rng = random.Random(cfg.seed * 1_000_003 + epoch)  # the same archs on every rank
        with tqdm(total=len(loader) * cfg.batch_size, desc=f"supernet epoch {epoch + 1}/{cfg.epochs}", unit="img",
                  disable=not (progress and dist_info.is_main), leave=False) as bar:  # closed on an error too
            for step, (x, y) in enumerate(loader):
                archs = sampler.step(rng)
                try:
                    loss = _sandwich_step(supernet, archs, x, y, cfg, precision)
                except _ArchOutOfMemory as e:  # nothing of this epoch is written: last.pth is the epoch before
                    raise _out_of_memory(e, supernet.at_resolution(archs[e.index]), epoch, step, cfg,
                                         ckpt_path) from None
                if not math.isfinite(loss):
                    raise TrainingDiverged(f"supernet loss became {loss} at epoch {epoch + 1}; lower the learning "
                                           "rate (SupernetConfig.lr) or check the data; completed epochs stay in "
                                           + str(ckpt_path))
                _average_gradients(supernet, dist_info.world_size)
                precision.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(supernet.parameters(), cfg.grad_clip)
                precision.scaler.step(optimizer)
                precision.scaler.update()
                scheduler.step_update(epoch * len(loader) + step + 1)
                bar.update(x.shape[0])
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        _broadcast_state(supernet, dist_info.world_size)  # BatchNorm statistics were updated per rank
        if dist_info.is_main:
            _save(ckpt_path, supernet, optimizer, scheduler, band, epoch, cfg)
    if dist.is_initialized():
        dist.barrier()
    return SupernetResult(ckpt_path, max(0, cfg.epochs - start_epoch), time.time() - started, loss)


class _Precision:
    """Autocast for the forward passes and the gradient scaler (a no-op unless fp16) of the supernet's steps."""

    def __init__(self, dtype: torch.dtype | None, device: torch.device):
        self.dtype, self.device = dtype, device
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)


def _sandwich_step(supernet: Supernet, archs: list[Arch], x: torch.Tensor, y: torch.Tensor, cfg: SupernetConfig,
                   precision: _Precision) -> float:
    """One optimizer step's gradients: the largest learns the labels, the others its soft predictions.
    CUDA out of memory comes out as :class:`_ArchOutOfMemory`, naming the arch whose pass ran out."""
    supernet.train()
    for p in supernet.parameters():
        p.grad = None
    running = 0
    try:
        with precision.autocast():
            teacher_logits = supernet(x, archs[0]).float()
        loss = F.cross_entropy(teacher_logits, y, label_smoothing=cfg.label_smoothing)
        precision.scaler.scale(loss).backward()
        total = loss.item()
        soft_targets = teacher_logits.detach().softmax(-1)
        for running, arch in enumerate(archs[1:], 1):
            with precision.autocast():
                student = supernet(x, arch).float()
            distill = torch.sum(-soft_targets * F.log_softmax(student, dim=-1), dim=-1).mean()
            precision.scaler.scale(distill).backward()
            total += distill.item()
    except torch.cuda.OutOfMemoryError as e:
        raise _ArchOutOfMemory(running, e) from None
    return total / len(archs)


class _ArchOutOfMemory(Exception):
    """CUDA ran out of memory in the forward or backward pass of the step's arch number ``index``."""

    def __init__(self, index: int, error: torch.cuda.OutOfMemoryError):
        super().__init__(index, str(error))  # its text only: the error's frames hold the step's tensors
        self.index, self.message = index, str(error)


_ROLES = ("the largest arch of the band", "the smallest arch of the band")


def _out_of_memory(error: _ArchOutOfMemory, arch: Arch, epoch: int, step: int, cfg: SupernetConfig,
                   checkpoint: Path) -> NaslocError:
    """The one line of CUDA out of memory in a sandwich step on ``arch`` (:func:`nasloc.errors.out_of_memory`)."""
    role = _ROLES[error.index] if error.index < len(_ROLES) else "a random arch of the band"
    kept = (f"the completed epochs stay in {checkpoint} and the rerun resumes from them" if checkpoint.exists()
            else "no epoch was completed yet")
    return out_of_memory(f"in the supernet training (epoch {epoch + 1} step {step + 1}) on {role} ({described(arch)})",
                         cfg.batch_size, kept, error.message)


def described(arch: Arch) -> str:
    """An arch in a few words, for messages: its MACs (at its resolution), depth, widths and locality."""
    macs = count(arch).macs
    size = f"{macs / 1e9:.3g}G" if macs >= 1e8 else f"{macs / 1e6:.3g}M"
    return f"{size} MACs, depth {arch.depth}, dim {'/'.join(str(s.dim) for s in arch.stages)}: {locality(arch)}"


def _average_gradients(model: torch.nn.Module, world_size: int) -> None:
    """Average gradients over ranks. Each arch uses other weights, so a DDP wrapper (which expects
    one forward per backward and the same used parameters) does not fit the sandwich rule."""
    if world_size <= 1:
        return
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world_size)


def _broadcast_state(model: torch.nn.Module, world_size: int) -> None:
    """Give every rank rank 0's parameters and buffers."""
    if world_size <= 1:
        return
    for tensor in model.state_dict().values():
        dist.broadcast(tensor, 0)


# What _resume reads from a checkpoint.
_RESUMED = ("model", "epoch", "band", "fingerprint")
FINISHED = (*_RESUMED, "config", "img_size")  # what a finished supernet's checkpoint keeps (finish_checkpoint)


def _save(path: Path, supernet: Supernet, optimizer, scheduler, band: Band, epoch: int, cfg: SupernetConfig) -> None:
    state = {
        "model": supernet.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "band": asdict(band),
        "config": asdict(cfg),
        "fingerprint": fingerprint(supernet),
        "img_size": supernet.img_size,
    }
    save_checkpoint(path, state)


def _resume(path: Path, supernet: Supernet, optimizer, band: Band, device: torch.device, epochs: int) -> int:
    state = resume_checkpoint(path, device, keys=_RESUMED)
    if state is None:
        return 0
    if state["fingerprint"] != fingerprint(supernet):
        raise NaslocError(f"{path} was trained for another space or resolution; use a new --run-name or delete it")
    if state["band"] != asdict(band):
        raise NaslocError(f"{path} was trained for the MACs band {state['band']}, not {asdict(band)}; use a new --run-name")
    supernet.load_state_dict(state["model"])
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    elif state["epoch"] + 1 < epochs:  # finished and cut down (finish_checkpoint); more --supernet-epochs go on
        _logger.warning("%s kept no optimizer state (it had finished): its next epochs start a fresh one", path)
    return state["epoch"] + 1


def load_supernet(path: Path, supernet: Supernet, device: str | torch.device = "cpu") -> Supernet:
    """Load trained weights into ``supernet`` (built for the same space and resolution)."""
    state = load_checkpoint(path, device, keys=("model", "fingerprint"))
    if state["fingerprint"] != fingerprint(supernet):
        raise NaslocError(f"{path} was trained for another space or resolution")
    supernet.load_state_dict(state["model"])
    return supernet.to(device)
