"""Ranking self-check: does the supernet's proxy rank the archs of one MACs band as standalone training does?

The search trusts the proxy (top-1 with supernet weights) to order archs. This check samples archs of
one MACs band, scores each by its proxy and by a short standalone training from scratch, and compares
the two orders: Kendall tau (with its two-sided p-value against tau = 0) and top-k precision (how many
of the proxy's k best are among the k best standalone). ``nasloc check-ranking`` runs it on a run's
supernet (:func:`check_run_ranking`: the run's band, proxy, data set and resolution; the trainings in
``<run>/check-ranking/``); ``bench/evidence_cifar.py`` uses the same pieces at a larger scale.

A short training is itself noisy (two trainings of the same archs disagree too), so a tau measured on
10 archs carries a wide error: read the p-value beside it.
"""
from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kendalltau

from ..arch import Arch
from ..errors import NaslocError
from ..fileio import write_atomic
from ..models import LocalityViT
from ..space.flops import count
from ..space.search_space import SearchSpace
from ..training.data import DataSplits
from ..training.recipe import RetrainConfig
from ..training.retrain import retrain


class RankingError(NaslocError):
    """A ranking check that cannot run as asked; the message is one line."""


# ------------------------------------------------------------------------------------------- measures
def kendall_tau(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Kendall's tau-b between two scorings of the same archs, and its two-sided p-value (tau = 0)."""
    result = kendalltau(a, b)
    return float(result.statistic), float(result.pvalue)


def top_k_precision(proxy: Sequence[float], standalone: Sequence[float], k: int = 3) -> int:
    """How many of the ``k`` archs with the best proxy are among the ``k`` best standalone."""
    return len(set(np.argsort(proxy)[-k:]) & set(np.argsort(standalone)[-k:]))


# ------------------------------------------------------------------------------------------- archs
def sample_band(space: SearchSpace, lo: float, hi: float, n: int, seed: int) -> list[Arch]:
    """``n`` distinct random archs with MACs in [lo, hi], the same for the same seed (fewer if the band
    holds fewer). Raises :class:`nasloc.space.files.SpaceError` when the space cannot reach the band."""
    rng = random.Random(seed)
    archs: list[Arch] = []
    for _ in range(20 * n):
        if len(archs) == n:
            break
        arch = space.sample_in_band(rng, lo, hi)
        if arch not in archs:
            archs.append(arch)
    return archs


# ------------------------------------------------------------------------------------------- standalone
def short_recipe(epochs: int, img_size: int, seed: int, batch_size: int = 64) -> RetrainConfig:
    """The recipe of every ranking training: a few epochs, weak regularisation (no mixup, cutmix or
    RandAugment, which slow short trainings down a lot), one warm-up epoch."""
    return RetrainConfig(epochs=epochs, batch_size=batch_size, lr=1e-3, warmup_epochs=1, min_lr=1e-5, mixup=0.0,
                         cutmix=0.0, randaugment="", label_smoothing=0.1, img_size=img_size, num_workers=0, seed=seed)


def train_standalone(arch: Arch, splits: DataSplits, cfg: RetrainConfig, out_dir: Path, device: str = "auto") -> float:
    """Validation top-1 (%) of ``arch`` trained from scratch with ``cfg``; checkpoints every epoch in
    ``out_dir`` and resumes from there (a finished training is only read back)."""
    torch.manual_seed(cfg.seed)  # the initial weights
    model = LocalityViT(arch, drop_path_rate=0.0)
    return retrain(model, splits, cfg, out_dir, device=device, progress=False).val_top1


# ------------------------------------------------------------------------------------------- the check
@dataclass(frozen=True)
class RankedArch:
    index: int
    arch: Arch
    macs: int  # at the space's deploy resolution
    proxy: float  # top-1 % with supernet weights
    standalone: float  # top-1 % after the short standalone training


@dataclass(frozen=True)
class RankingCheck:
    archs: tuple[RankedArch, ...]
    tau: float
    p_value: float
    top3: int

    def report(self) -> str:
        """The table (arch, MACs, proxy, standalone), then tau and top-3 precision."""
        lines = [f"{'arch':>4}  {'MACs (M)':>9}  {'proxy top-1':>11}  {'standalone top-1':>16}"]
        lines += [f"{r.index:>4}  {r.macs / 1e6:>9.2f}  {r.proxy:>11.2f}  {r.standalone:>16.2f}" for r in self.archs]
        lines.append(f"Kendall tau: {self.tau:.2f} (p = {self.p_value:.3g})")
        lines.append(f"top-3 precision: {self.top3}/3")
        return "\n".join(lines)


def check_ranking(archs: Sequence[Arch], proxy: Callable[[Arch], float], standalone: Callable[[int, Arch], float],
                  on_arch: Callable[[RankedArch], None] | None = None) -> RankingCheck:
    """Score every arch by ``proxy(arch)`` and by ``standalone(index, arch)`` and compare the two orders.

    ``on_arch`` hears about each arch as soon as its standalone score is in (trainings are long).
    """
    if len(archs) < 3:
        raise RankingError(f"a ranking needs at least 3 archs, got {len(archs)}")
    proxies = [float(proxy(arch)) for arch in archs]  # fast: all of them before the first training
    ranked = []
    for index, (arch, proxy_top1) in enumerate(zip(archs, proxies)):
        result = RankedArch(index, arch, count(arch).macs, proxy_top1, float(standalone(index, arch)))
        ranked.append(result)
        if on_arch is not None:
            on_arch(result)
    tau, p_value = kendall_tau(proxies, [r.standalone for r in ranked])
    return RankingCheck(tuple(ranked), tau, p_value, top_k_precision(proxies, [r.standalone for r in ranked], 3))


class FolderTrainer:
    """``standalone`` for :func:`check_ranking`: trains arch ``i`` in ``root/arch_<i>`` at ``img_size``.

    ``root/sample.json`` keeps what the trainings were made with (seed, band, epochs, the archs): a rerun
    with the same settings resumes them, one with other settings is refused rather than mixed in.
    """

    def __init__(self, root: Path, splits: DataSplits, *, epochs: int, img_size: int, seed: int, band: tuple[float, float],
                 device: str = "auto"):
        self.root, self.splits, self.device = Path(root), splits, device
        self.settings = dict(seed=seed, band=[float(band[0]), float(band[1])], epochs=epochs, img_size=img_size)
        self.cfg = short_recipe(epochs, img_size, seed)

    def claim(self, archs: Sequence[Arch]) -> None:
        """Check the folder against this sample (refusing another one) and record it."""
        path = self.root / "sample.json"
        if path.exists():
            stored = json.loads(path.read_text())
            if {k: stored.get(k) for k in self.settings} != self.settings:
                made = ", ".join(f"{k} {stored.get(k)}" for k in self.settings)
                raise RankingError(f"{self.root} holds a check made with {made}: rerun with those settings, "
                                   "or delete the folder to check with others")
            known = [Arch.from_dict(a) for a in stored["archs"]]
            common = min(len(known), len(archs))
            if known[:common] != list(archs[:common]):  # same settings, other archs: another space or version
                raise RankingError(f"{self.root} holds trainings of other archs; delete the folder to check again")
            archs = archs if len(archs) >= len(known) else known
        write_atomic(path, json.dumps({**self.settings, "archs": [a.to_dict() for a in archs]}, indent=1))

    def __call__(self, index: int, arch: Arch) -> float:
        return train_standalone(arch.replace(img_size=self.cfg.img_size), self.splits, self.cfg,
                                self.root / f"arch_{index}", self.device)
