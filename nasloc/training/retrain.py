"""Full-scale standalone retraining with timm's recipe components, on one device or under torchrun/DDP.

The recipe is :class:`nasloc.training.recipe.RetrainConfig`, its augmentation
:mod:`nasloc.training.augment`; a checkpoint every epoch (:mod:`nasloc.training.checkpoint`), and a rerun
resumes it."""
from __future__ import annotations

import logging
import math
import random
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from tqdm import tqdm

from ..errors import TrainingDiverged
from ..models import LocalityViT
from .augment import eval_dataset, mixup_and_loss, train_dataset
from .checkpoint import resume_checkpoint, save_checkpoint
from .data import DataSplits
from .distributed import amp_dtype, resolve_device, setup_distributed, unwrap, world_size, wrap_ddp
from .loader import DeviceLoader, make_loader
from .recipe import RetrainConfig

log = logging.getLogger(__name__)


# Settings that may change between a run and its resume without making the checkpoint meaningless.
RESUMABLE_CHANGES = ("epochs", "num_workers")


# What a resumed training reads from its checkpoint, and what a finished one keeps (finish_checkpoint): a
# rerun that lengthens it goes on with a fresh optimizer.
RESUMED = ("epoch", "model", "history", "cfg", "num_updates")
OPTIMIZER_STATE = ("optimizer", "scheduler", "ema", "scaler")


@dataclass
class RetrainResult:
    val_top1: float  # of the trained weights, in percent
    test_top1: float | None  # None when the splits have no test set
    epochs_run: int  # epochs trained by this call
    start_epoch: int  # epochs already done in the checkpoint it resumed from (0 = fresh start)
    checkpoint: Path
    seconds: float
    ema_val_top1: float | None = None  # of the EMA weights, when ema_decay > 0
    history: list[dict] = field(default_factory=list)  # per epoch: epoch, train_loss, val_top1, lr, seconds


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], device: str | torch.device) -> float:
    """Top-1 accuracy in percent over everything `loader` yields.

    In a process group the counts are summed over ranks, so every rank must call it; this is exact both
    for sharded loaders and for loaders that give every rank the whole set.
    """
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    total = torch.zeros((), dtype=torch.long, device=device)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        correct += (model(x).argmax(dim=1) == y).sum()
        total += y.numel()
    model.train(was_training)
    if dist.is_initialized() and dist.get_world_size() > 1:
        counts = torch.stack([correct, total])
        dist.all_reduce(counts)
        correct, total = counts
    if total.item() == 0:
        raise ValueError("evaluate: the loader yielded no images")
    return 100.0 * correct.item() / total.item()


def retrain(model: nn.Module, splits: DataSplits, cfg: RetrainConfig, out_dir: Path,
            device: str = "auto", progress: bool = True, stop_epoch: int | None = None) -> RetrainResult:
    """Train `model` from its current weights on splits.train, checkpointing to out_dir/last.pth every epoch.

    If out_dir/last.pth exists the run resumes from it (model, optimizer, scheduler, EMA, epoch), or from
    out_dir/previous.pth (the epoch before) when it is unreadable
    (:func:`nasloc.training.checkpoint.resume_checkpoint`); a checkpoint with all cfg.epochs done is only evaluated. `stop_epoch` ends the call after that many
    epochs in all, on the schedule of cfg.epochs (a rung of successive halving); a later call resumes.
    Under torchrun every rank calls this; only rank 0 writes files and shows progress.
    """
    start_time = time.perf_counter()
    info = setup_distributed()
    dev = resolve_device(device)
    _seed_everything(cfg.seed + info.rank)  # different augmentation per rank, reproducible per run
    out_dir = Path(out_dir)
    ckpt_path = out_dir / "last.pth"
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    img_size = cfg.img_size or splits.img_size
    train_loader, val_loader, test_loader = _loaders(splits, cfg, img_size, dev, info.world_size > 1)
    mixup_fn, criterion = mixup_and_loss(cfg, splits.num_classes)

    model.to(dev)
    ckpt = resume_checkpoint(ckpt_path, dev, keys=RESUMED)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    train_model = wrap_ddp(model, dev) if info.world_size > 1 else model  # DDP syncs rank 0's weights
    opt = _Optimization(model, cfg, len(train_loader), info.world_size, dev)
    start_epoch, history = 0, []
    if ckpt is not None:
        start_epoch, history = ckpt["epoch"], ckpt["history"]
        opt.load_state_dict(ckpt, cfg)

    # Closed on an error too, so that the error starts a line of its own.
    with tqdm(total=cfg.epochs * len(train_loader), initial=start_epoch * len(train_loader), unit="step",
              dynamic_ncols=True, disable=not (progress and info.is_main)) as bar:
        for epoch in range(start_epoch, min(cfg.epochs, stop_epoch or cfg.epochs)):
            epoch_start = time.perf_counter()
            # Each epoch draws from streams of its own (mixup, RandAugment, drop path), so that an epoch after a
            # resume (or a selection rung's next call) draws what it would have drawn in one go, not epoch 1's.
            _seed_everything(_epoch_seed(cfg.seed, info.rank, epoch))
            train_loader.set_epoch(epoch)
            loss = _train_one_epoch(train_model, train_loader, opt, mixup_fn, criterion, cfg, bar, epoch)
            val_top1 = evaluate(model, val_loader, dev)
            history.append(dict(epoch=epoch + 1, train_loss=loss, val_top1=val_top1,
                                lr=opt.optimizer.param_groups[0]["lr"], seconds=time.perf_counter() - epoch_start))
            bar.set_postfix_str(f"epoch {epoch + 1}/{cfg.epochs} loss {loss:.3f} val {val_top1:.2f}%")
            log.info("epoch %d/%d train_loss %.4f val_top1 %.2f%%", epoch + 1, cfg.epochs, loss, val_top1)
            if info.is_main:
                save_checkpoint(ckpt_path, dict(epoch=epoch + 1, model=model.state_dict(), history=history,
                                                 cfg=asdict(cfg), **opt.state_dict()))
            if info.world_size > 1:
                dist.barrier()  # no rank runs ahead of the checkpoint it may have to resume from

    val_top1 = history[-1]["val_top1"] if history else evaluate(model, val_loader, dev)
    return RetrainResult(
        val_top1=val_top1,
        test_top1=evaluate(model, test_loader, dev) if test_loader is not None else None,
        epochs_run=len(history) - start_epoch,
        start_epoch=start_epoch,
        checkpoint=ckpt_path,
        seconds=time.perf_counter() - start_time,
        ema_val_top1=evaluate(opt.ema.module, val_loader, dev) if opt.ema is not None else None,
        history=history,
    )


class _Optimization:
    """Optimizer, lr schedule, EMA and AMP scaler: everything besides the weights that a resume needs."""

    def __init__(self, model: nn.Module, cfg: RetrainConfig, steps_per_epoch: int, world_size: int,
                 device: torch.device) -> None:
        lr = cfg.lr * cfg.batch_size * world_size / 512
        # timm skips weight decay for 1-d params (norms, biases) and model.no_weight_decay().
        self.optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=cfg.weight_decay)
        # Stepped per update, not per epoch, so the warm-up is smooth even when it lasts one epoch. A short
        # run keeps at most a tenth of itself for warm-up: 5 warm-up epochs of a 5-epoch run never decay.
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, "cosine", num_epochs=cfg.epochs, warmup_epochs=min(cfg.warmup_epochs, cfg.epochs / 10),
            warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, step_on_epochs=False, updates_per_epoch=steps_per_epoch)
        self.ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.amp_dtype = amp_dtype(cfg.amp, device)
        # bfloat16 needs no loss scaling; float16 does.
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.num_updates = 0

    def state_dict(self) -> dict:
        return dict(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                    ema=self.ema.module.state_dict() if self.ema is not None else None,
                    scaler=self.scaler.state_dict(), num_updates=self.num_updates)

    def load_state_dict(self, ckpt: dict, cfg: RetrainConfig) -> None:
        changed = [k for k, v in ckpt["cfg"].items() if asdict(cfg).get(k) != v and k not in RESUMABLE_CHANGES]
        if changed:
            before = ", ".join(f"{k}={ckpt['cfg'][k]}" for k in changed)
            warnings.warn(f"resuming with changed settings; the checkpoint was made with {before}", stacklevel=3)
        self.num_updates = ckpt["num_updates"]
        if "optimizer" in ckpt:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scaler.load_state_dict(ckpt["scaler"])
            if self.ema is not None and ckpt["ema"] is not None:
                self.ema.module.load_state_dict(ckpt["ema"])
            # The saved scheduler carries its schedule length; with more epochs keep the new, longer one.
            if ckpt["cfg"]["epochs"] == cfg.epochs:
                self.scheduler.load_state_dict(ckpt["scheduler"])
        elif cfg.epochs > ckpt["epoch"]:  # a finished training, cut down (finish_checkpoint), that a rerun lengthens
            log.warning("the checkpoint of a finished training kept no optimizer state: epochs %d-%d start a fresh "
                        "optimizer", ckpt["epoch"] + 1, cfg.epochs)
        self.scheduler.step_update(self.num_updates)


def _train_one_epoch(model: nn.Module, loader: DeviceLoader, opt: _Optimization, mixup_fn: Mixup | None,
                     criterion: nn.Module, cfg: RetrainConfig, bar: tqdm, epoch: int) -> float:
    """Mean training loss of the epoch."""
    model.train()
    loss_sum = torch.zeros((), device=loader.device)
    start, images = time.perf_counter(), 0
    for step, (x, y) in enumerate(loader, 1):
        if mixup_fn is not None:
            x, y = mixup_fn(x, y)
        with torch.autocast(loader.device.type, dtype=opt.amp_dtype, enabled=opt.amp_dtype is not None):
            loss = criterion(model(x), y)
        opt.optimizer.zero_grad(set_to_none=True)
        opt.scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            opt.scaler.unscale_(opt.optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
        opt.num_updates += 1
        opt.scheduler.step_update(opt.num_updates)
        if opt.ema is not None:
            opt.ema.update(unwrap(model), step=opt.num_updates)
        loss_sum += loss.detach()
        images += len(x)
        bar.update()
        if step % 10 == 0 or step == len(loader):  # .item() syncs the GPU: not on every step
            mean_loss = loss_sum.item() / step
            if not math.isfinite(mean_loss):
                raise TrainingDiverged(f"training loss is {mean_loss} in epoch {epoch + 1} step {step}; "
                                       f"lower lr or keep grad_clip > 0")
            rate = images * world_size() / (time.perf_counter() - start)
            bar.set_postfix_str(f"epoch {epoch + 1}/{cfg.epochs} loss {mean_loss:.3f} {rate:.0f} img/s")
    if dist.is_initialized():  # report the mean over all ranks, so every rank's history agrees
        dist.all_reduce(loss_sum)
        loss_sum /= dist.get_world_size()
    return loss_sum.item() / len(loader)


def _loaders(splits: DataSplits, cfg: RetrainConfig, img_size: int, dev: torch.device,
             distributed: bool) -> tuple[DeviceLoader, DeviceLoader, DeviceLoader | None]:
    train, augment = train_dataset(splits, cfg, img_size)
    common = dict(img_size=img_size, mean=splits.mean, std=splits.std, num_workers=cfg.num_workers,
                  seed=cfg.seed, distributed=distributed, device=dev)
    train_loader = make_loader(train, cfg.batch_size, True, augment=augment, **common)
    val_loader = make_loader(eval_dataset(splits.val, splits, img_size), cfg.batch_size, False, **common)
    test_loader = None
    if splits.test is not None:
        test_loader = make_loader(eval_dataset(splits.test, splits, img_size), cfg.batch_size, False, **common)
    return train_loader, val_loader, test_loader


def _epoch_seed(seed: int, rank: int, epoch: int) -> int:
    # Not the loader's crop/flip seed (nasloc.training.loader.DeviceLoader): one seed for both would tie their draws.
    return (seed * 1_000_003 + rank) * 10_007 + epoch  # distinct for ranks < 1,000,003 and epochs < 10,007


def _seed_everything(seed: int) -> None:
    seed %= 2**32  # NumPy takes 32 bits, torch 64, and an epoch's seed is about 1e10 times --seed
    random.seed(seed)  # timm's RandAugment
    np.random.seed(seed)  # timm's Mixup
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Retrained:
    """A finalist (search trial ``trial``) retrained from scratch."""

    trial: int
    model: LocalityViT
    proxy_top1: float
    val_top1: float
    macs: int  # at the space's deploy resolution
    params: int  # at the deploy resolution too (absolute position tables grow with it)
    design: str = "searched"  # the seed design it is, by name, or "searched"
