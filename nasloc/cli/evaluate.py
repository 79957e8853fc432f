"""``nasloc evaluate``: top-1/top-5, MACs, params and latency of any model on a split of a data set."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..deploy.macs import fvcore_macs
from ..models import LocalityViT
from ..space.flops import count
from ..training.augment import eval_dataset
from ..training.distributed import resolve_device
from ..training.loader import make_loader
from ..training.recipe import RetrainConfig
from ..units import format_macs
from .model_spec import ModelSpec, build_model, resolve_model
from .shared import CommandError, load_data, print_table

LATENCY_RUNS = {"batch 1": (3, 20), "throughput": (2, 5)}  # (warm-up, timed) runs


# ===================================================================================== evaluate
def evaluate_command(*, model: str, dataset: str, data_dir: Path | None, split: str, img_size: int | None,
                     batch_size: int | None, seed: int | None, device: str, throughput_batch: int,
                     as_json: bool) -> dict[str, Any]:
    """Measure ``model`` on a split of ``dataset``; prints a table (or one JSON object) and returns the numbers."""
    spec = resolve_model(model, with_weights=True, allow_timm=True)
    size = img_size or spec.default_img_size
    seed = seed if seed is not None else int(spec.facts.get("seed", 0))  # the split the training held out
    batch_size = batch_size or int(spec.facts.get("batch_size", RetrainConfig.batch_size))
    dev = resolve_device(device)
    splits = load_data(dataset, data_dir, size, seed, with_test=split == "test")
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
    """Top-1 and top-5 in percent; top-1 exactly as :func:`nasloc.training.retrain.evaluate` counts it (argmax)."""
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
    return print_table(("", ""), rows, header=False)
