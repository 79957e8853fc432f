"""``nasloc train``, ``nasloc evaluate``, ``nasloc latency`` and ``nasloc presets``: what a user reaches for after the search.

``nasloc train`` retrains any model :mod:`nasloc.model_spec` resolves with :func:`nasloc.train.retrain`
(timm's recipe, a checkpoint every epoch, DDP under torchrun, AMP on CUDA) into a folder

    OUT/
    ├── train.json     what is trained: the model, its arch, the data, the resolution, the recipe
    ├── last.pth       retrain's checkpoint, written every epoch; a rerun with the same --out resumes it
    └── export/        at the end: the timm export, with the val (and test) top-1 in its config

``nasloc evaluate`` measures top-1, top-5, parameters, MACs and latency; ``nasloc latency`` builds the latency
table of a space (:mod:`nasloc.latency`) and checks it; ``nasloc presets`` lists the seed designs. Bad input is a
:class:`CommandError` (or another :class:`NaslocError`, one line) raised before anything is written.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .arch import Arch
from .data import EAGER_MAX_SIDE, DataSplits, load_dataset
from .errors import NaslocError
from .export import export_model
from .fileio import write_atomic
from .flops import count, fvcore_macs
from .loader import check_batch_size, make_loader
from .model_spec import ModelSpec, build_model, resolve_model
from .models import LocalityViT
from .seeds import PAPERS, PRESETS
from .train import (RetrainConfig, RetrainResult, cleanup_distributed, eval_dataset, rand_augment, resolve_device,
                    retrain, setup_distributed)
from .units import format_macs

IN_MEMORY_MAX_SIDE = {"digits": 32, "cifar10": 32, "cifar100": 32, "imagefolder": EAGER_MAX_SIDE}
# What must match for a rerun to resume a training folder (the rest of the recipe may change, with a warning);
# the drop-path rate is the model's, not the recipe's: the record must describe every epoch.
RESUME_KEYS = ("model", "arch", "dataset", "data_dir", "img_size", "seed", "drop_path")
LATENCY_RUNS = {"batch 1": (3, 20), "throughput": (2, 5)}  # (warm-up, timed) runs


class CommandError(NaslocError):
    """Bad input to ``nasloc train`` / ``evaluate``; the message is one line."""


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
        dev = _device(device)
        splits = _load(dataset, data_dir, size, seed, with_test=True)
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
    _say(_trained_line(spec, result, size))
    at_size = "" if size == spec.arch.img_size else f", img_size={size}"
    _say(f'[nasloc] export: {exported} (timm.create_model("local-dir:{exported}", pretrained=True{at_size}) '
         "runs it as trained)")
    return exported


def _start(folder: TrainDir, request: dict[str, Any], spec: ModelSpec, arch: Arch) -> None:
    resuming = folder.checkpoint.is_file()
    write_atomic(folder.record, json.dumps(request, indent=2))
    verb = f"resuming {folder.checkpoint}" if resuming else f"training into {folder.root}"
    _say(f"[nasloc] {verb}: {spec.name} ({spec.kind}) on {request['dataset']} at {arch.img_size} px, "
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


# ===================================================================================== evaluate
def evaluate_command(*, model: str, dataset: str, data_dir: Path | None, split: str, img_size: int | None,
                     batch_size: int | None, seed: int | None, device: str, throughput_batch: int,
                     as_json: bool) -> dict[str, Any]:
    """Measure ``model`` on a split of ``dataset``; prints a table (or one JSON object) and returns the numbers."""
    spec = resolve_model(model, with_weights=True, allow_timm=True)
    size = img_size or spec.default_img_size
    seed = seed if seed is not None else int(spec.facts.get("seed", 0))  # the split the training held out
    batch_size = batch_size or int(spec.facts.get("batch_size", RetrainConfig.batch_size))
    dev = _device(device)
    splits = _load(dataset, data_dir, size, seed, with_test=split == "test")
    images = splits.val if split == "val" else splits.test
    if images is None:
        raise CommandError(f"--split test: {dataset} has no test split here (CIFAR's test batch or an "
                           "ImageFolder test/ folder with labels); evaluate --split val")
    net = build_model(spec, splits.num_classes, size).to(dev).eval()
    loader = make_loader(eval_dataset(images, splits, size), batch_size, False, img_size=size, mean=splits.mean,
                         std=splits.std, seed=seed, device=dev)
    numbers = dict(model=model, kind=spec.kind, dataset=dataset, split=split, images=len(images), img_size=size,
                   device=str(dev), **_measure(net, loader, size, dev, throughput_batch))
    print(json.dumps(numbers) if as_json else _evaluation_table(numbers, spec))
    return numbers


def _measure(net: nn.Module, loader: Any, size: int, device: torch.device, throughput_batch: int) -> dict[str, Any]:
    top1, top5 = _accuracy(net, loader)
    macs = count(net.arch).macs if isinstance(net, LocalityViT) else fvcore_macs(net, size)
    latency_ms = _latency_ms(net, 1, size, device, *LATENCY_RUNS["batch 1"])
    throughput_ms = _latency_ms(net, throughput_batch, size, device, *LATENCY_RUNS["throughput"])
    return dict(top1=top1, top5=top5, params=sum(p.numel() for p in net.parameters()), macs=macs,
                macs_unit="multiply-adds per image", latency_ms=latency_ms, throughput_batch=throughput_batch,
                throughput_ms=throughput_ms, throughput_img_per_s=1000 * throughput_batch / throughput_ms)


@torch.no_grad()
def _accuracy(model: nn.Module, loader: Any) -> tuple[float, float]:
    """Top-1 and top-5 in percent; top-1 exactly as :func:`nasloc.train.evaluate` counts it (argmax)."""
    correct1 = correct5 = total = 0
    for x, y in loader:
        logits = model(x)
        correct1 += int((logits.argmax(dim=1) == y).sum())
        best = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct5 += int((best == y[:, None]).any(dim=1).sum())
        total += len(y)
    return 100.0 * correct1 / total, 100.0 * correct5 / total


@torch.inference_mode()
def _latency_ms(model: nn.Module, batch: int, size: int, device: torch.device, warmup: int, runs: int) -> float:
    """Median wall time of one forward pass of ``batch`` images, in milliseconds."""
    x = torch.randn(batch, 3, size, size, device=device)
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(runs):
        _synchronize(device)
        start = time.perf_counter()
        model(x)
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _evaluation_table(n: dict[str, Any], spec: ModelSpec) -> str:
    rows = [
        ("model", f"{n['model']} ({spec.kind})"),
        ("data", f"{n['dataset']} {n['split']}: {n['images']} images at {n['img_size']} px"),
        ("top-1", f"{n['top1']:.2f} %"),
        ("top-5", f"{n['top5']:.2f} %"),
        ("params", f"{n['params'] / 1e6:.2f} M"),
        ("MACs", f"{format_macs(n['macs'])} per image"),
        ("latency", f"{n['latency_ms']:.2f} ms at batch 1 on {n['device']}"),
        ("throughput", f"{n['throughput_img_per_s']:.0f} img/s at batch {n['throughput_batch']} "
                       f"({n['throughput_ms']:.1f} ms per batch)"),
    ]
    return _table(("", ""), rows, header=False)


# ===================================================================================== latency
def latency_command(*, space: Path, device: str, backend: str, batch_size: int, archs: int, seed: int,
                    refresh: bool) -> float:
    """Build (or refresh) the latency table of ``space`` on this machine, then predict ``archs`` random archs and
    time them end to end; prints a table and, last, the median absolute error (returned, in %)."""
    import random

    from .latency import Target, build_latency_model, fit_key, measure_archs_us
    from .space import SearchSpace

    target = Target(device, backend, batch_size)
    loaded = SearchSpace.load(space)
    started = time.perf_counter()
    model, table = build_latency_model(loaded, target, refresh=refresh)
    _say(f"[nasloc] latency table of {loaded.name}: {len(table.parts)} parts on {table.meta['device']} "
         f"({backend}, batch {batch_size}, {table.meta['threads']} thread(s)), ready in "
         f"{time.perf_counter() - started:.0f} s: {table.path}")
    _say(f"[nasloc] fitted constant: {model.constant_us:.0f} us (archs timed end to end: "
         f"{table.fits[fit_key(loaded)]['archs']})")
    rng = random.Random(seed)
    sample = [loaded.sample(rng) for _ in range(archs)]
    rows, errors = [], []
    for i, (arch, measured) in enumerate(zip(sample, measure_archs_us(sample, target))):
        predicted = model.predict_us(arch)
        errors.append(100 * abs(predicted - measured) / measured)
        rows.append((str(i + 1), f"{count(arch).macs / 1e6:.1f}", f"{predicted / 1000:.3f}", f"{measured / 1000:.3f}",
                     f"{errors[-1]:.1f}"))
    print(_table(("arch", "MMACs", "predicted ms", "measured ms", "error %"), rows))
    error = statistics.median(errors)
    print(f"median absolute error: {error:.1f} %")
    return error


# ===================================================================================== presets
def presets_command() -> list[tuple[str, ...]]:
    """Print the registered presets: seed paper, params, MACs at their resolution, input size."""
    rows = []
    for name, arch in PRESETS.items():
        cost = count(arch)
        rows.append((name, PAPERS[name], f"{cost.params / 1e6:.2f}", f"{cost.macs / 1e9:.2f}",
                     f"{arch.img_size} px", str(arch.num_classes)))
    headers = ("preset", "seed paper", "params (M)", "GMACs (multiply-adds)", "input", "classes")
    print(_table(headers, rows))
    return rows


# ===================================================================================== helpers
def _load(dataset: str, data_dir: Path | None, size: int, seed: int, with_test: bool) -> DataSplits:
    """The data as training and evaluation read it: in-memory images stored at most at their own size
    (the loader resizes each batch to ``size`` on the device), so both see the same pixels."""
    return load_dataset(dataset, data_dir, min(size, IN_MEMORY_MAX_SIDE[dataset]), seed=seed, with_test=with_test)


def _device(device: str) -> torch.device:
    try:
        return resolve_device(device)
    except ValueError as e:  # cuda asked for, none here
        raise CommandError(f"--device {device}: {e}") from None


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], header: bool = True) -> str:
    lines = [headers, *rows] if header else list(rows)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(lines[0]))]
    text = ["  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    if header:
        text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def _say(message: str) -> None:
    print(message, flush=True)
