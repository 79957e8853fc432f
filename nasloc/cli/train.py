"""``nasloc train``: retrain any model that :mod:`nasloc.cli.model_spec` resolves, into a resumable folder."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..arch import Arch
from ..console import say
from ..deploy.export import export_model
from ..fileio import write_atomic
from ..models import LocalityViT
from ..space.flops import count
from ..training.augment import rand_augment
from ..training.data import DataSplits
from ..training.distributed import cleanup_distributed, resolve_device, setup_distributed
from ..training.loader import check_batch_size
from ..training.recipe import RetrainConfig
from ..training.retrain import RetrainResult, retrain
from ..units import format_macs
from .model_spec import ModelSpec, build_model, resolve_model
from .shared import CommandError, load_data

# What must match for a rerun to resume a training folder (the rest of the recipe may change, with a warning);
# the drop-path rate is the model's, not the recipe's: the record must describe every epoch.
RESUME_KEYS = ("model", "arch", "dataset", "data_dir", "img_size", "seed", "drop_path")


# ===================================================================================== train
@dataclass(frozen=True)
class TrainDir:
    """The folder of one ``nasloc train``."""

    root: Path

    @property
    def record(self) -> Path:
        return self.root / "train.json"

    @property
    def checkpoint(self) -> Path:
        return self.root / "last.pth"  # retrain's name for it

    @property
    def export(self) -> Path:
        return self.root / "export"

    def check_reusable(self) -> None:
        """A folder that exists must be an unfinished training; CommandError otherwise."""
        if not (self.root.exists() or self.root.is_symlink()):
            return
        if not self.record.is_file():
            raise CommandError(f"--out {self.root} already exists and is not a nasloc train folder "
                               f"(no {self.record.name}); pass another --out")
        if self.export.exists():
            raise CommandError(f"--out {self.root} holds a finished training (its export: {self.export}); "
                               "pass another --out")

    def check_same(self, request: dict[str, Any]) -> None:
        """A rerun resumes only the same training; CommandError naming what differs."""
        if not self.record.is_file():
            return
        try:
            earlier = json.loads(self.record.read_text())
        except (OSError, ValueError) as e:
            raise CommandError(f"{self.record}: cannot read it ({e}); pass another --out") from None
        differ = [key for key in RESUME_KEYS if earlier.get(key) != request[key]]
        if differ:
            raise CommandError(f"--out {self.root} holds another training (different {', '.join(differ)}); "
                               "pass another --out, or the same options to resume it")


def train_command(*, model: str, dataset: str, data_dir: Path | None, epochs: int, img_size: int | None,
                  out: Path | None, seed: int, device: str, drop_path: float, recipe: dict[str, Any]) -> Path:
    """Train ``model`` from scratch on ``dataset`` and export it; returns the export folder (see the module)."""
    spec = resolve_model(model, with_weights=False)
    size = img_size or spec.arch.img_size
    folder = TrainDir(Path(out or Path("results") / "train" / f"{spec.name}-{dataset}-{size}px").absolute())
    dist_info = setup_distributed()
    try:
        if dist_info.is_main:  # the other ranks would see the folder rank 0 is making
            folder.check_reusable()
        dev = resolve_device(device)
        splits = load_data(dataset, data_dir, size, seed, with_test=True)
        net = build_model(spec, splits.num_classes, size, drop_path_rate=drop_path)
        cfg = RetrainConfig(epochs=epochs, img_size=size, seed=seed, **recipe)
        _check_recipe(cfg, splits, dist_info.world_size)
        request = dict(model=model, kind=spec.kind, arch=net.arch.to_dict(), dataset=dataset,
                       data_dir=str(data_dir.resolve()) if data_dir else None, img_size=size, seed=seed,
                       drop_path=drop_path, recipe=asdict(cfg))
        if dist_info.is_main:
            folder.check_same(request)
            _start(folder, request, spec, net.arch)
        result = retrain(net, splits, cfg, folder.root, device=str(dev), progress=dist_info.is_main)
        return _export(net, spec, folder, splits, request, result) if dist_info.is_main else folder.export
    finally:
        cleanup_distributed()


def _export(net: LocalityViT, spec: ModelSpec, folder: TrainDir, splits: DataSplits, request: dict[str, Any],
            result: RetrainResult) -> Path:
    """The trained model as a timm export: its arch at the model's own resolution, its accuracies."""
    info = dict(model=request["model"], source=spec.kind, dataset=request["dataset"], seed=request["seed"],
                epochs=request["recipe"]["epochs"], batch_size=request["recipe"]["batch_size"],
                val_top1=result.val_top1, test_top1=result.test_top1, ema_val_top1=result.ema_val_top1,
                drop_path=request["drop_path"], recipe=request["recipe"])
    exported = export_model(net, folder.export, img_size=spec.arch.img_size, info=info, mean=splits.mean,
                            std=splits.std, label_names=splits.class_names)
    size = net.arch.img_size
    say(_trained_line(spec, result, size))
    at_size = "" if size == spec.arch.img_size else f", img_size={size}"
    say(f'[nasloc] export: {exported} (timm.create_model("local-dir:{exported}", pretrained=True{at_size}) '
         "runs it as trained)")
    return exported


def _start(folder: TrainDir, request: dict[str, Any], spec: ModelSpec, arch: Arch) -> None:
    resuming = folder.checkpoint.is_file()
    write_atomic(folder.record, json.dumps(request, indent=2))
    verb = f"resuming {folder.checkpoint}" if resuming else f"training into {folder.root}"
    say(f"[nasloc] {verb}: {spec.name} ({spec.kind}) on {request['dataset']} at {arch.img_size} px, "
         f"{format_macs(count(arch).macs)} per image")


def _trained_line(spec: ModelSpec, result: RetrainResult, size: int) -> str:
    done = "already trained" if result.epochs_run == 0 else (
        f"resumed after epoch {result.start_epoch}, trained {result.epochs_run} more" if result.start_epoch
        else f"trained {result.epochs_run} epochs")
    test = "" if result.test_top1 is None else f", test top-1 {result.test_top1:.2f} %"
    return f"[nasloc] {spec.name} at {size} px: {done}; val top-1 {result.val_top1:.2f} %{test}"


def _check_recipe(cfg: RetrainConfig, splits: DataSplits, world_size: int) -> None:
    """What retrain would refuse only after creating its folder."""
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise CommandError(f"--batch-size {cfg.batch_size}: mixup/cutmix need an even batch size "
                           "(or --mixup 0 --cutmix 0)")
    check_batch_size(cfg.batch_size, len(splits.train) // world_size)
    try:  # timm asserts on a bad spec only when the first batch is augmented
        if cfg.randaugment:
            rand_augment(cfg.randaugment, splits.img_size, splits.mean)  # what retrain will build
    except (AssertionError, ValueError, KeyError) as err:
        raise CommandError(f"--randaugment {cfg.randaugment!r}: not a timm RandAugment spec; use one such as "
                           f"{RetrainConfig.randaugment} or '' (off)") from err
