"""Evidence on CIFAR-10 (issue 9): ranking quality, search vs the seed mechanisms, search efficiency.

Runs on 2 CPU cores in a few hours by working on subsets (sizes below, all recorded in the output):
the CIFAR-10 JPEG set of ../shared/data/cifar10 with its split (validation = images 4500-4999 of
each class), a class-balanced subset of the 45k training images, and the full 5k validation images.
Every unit of work (supernet, each standalone training, each search) is saved to
``results/evidence/evidence.json`` as it finishes, so the script can be stopped and rerun.

    nohup .venv/bin/python bench/evidence_cifar.py > results/evidence/log.txt 2>&1 &

Steps:
1. Supernet on search_spaces/cifar.yaml at 32 px, sandwich rule inside [budget/2, budget].
2. Ranking: ``--rank-archs`` archs sampled in the band [0.75 budget, budget]; each trained standalone
   with one short recipe; Kendall tau and top-3 precision of supernet-inherited vs standalone top-1.
3. Search efficiency: NSGA-II, TPE and random search (same trials each) on the same supernet;
   hypervolume of the (top-1, MACs) front within budget after every trial.
4. Search vs seeds: every seed mechanism alone in the same skeleton at or under the budget
   (SearchSpace.reference_archs), the NSGA-II best and the random-search best, retrained with the
   same recipe and ``--seeds`` seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kendalltau

from nasloc.arch import Arch
from nasloc.data import DataSplits, load_dataset
from nasloc.evaluate import make_evaluator
from nasloc.flops import count
from nasloc.models import LocalityViT
from nasloc.search import pareto_trials, run_search
from nasloc.space import SearchSpace
from nasloc.supernet import Supernet
from nasloc.supernet_train import Band, SupernetConfig, train_supernet
from nasloc.train import RetrainConfig, retrain

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar-tar", default=str(ROOT.parent / "shared/data/cifar10/train.tar.gz"))
    p.add_argument("--data-root", default="/tmp/nasloc-cifar10")
    p.add_argument("--out", default=str(ROOT / "results/evidence"))
    p.add_argument("--budget", type=float, default=0.06e9, help="MACs per image at 32 px")
    p.add_argument("--train-subset", type=int, default=10000, help="training images (class-balanced)")
    p.add_argument("--val-subset", type=int, default=5000, help="validation images (class-balanced, of the 5k)")
    p.add_argument("--supernet-epochs", type=int, default=6)
    p.add_argument("--rank-archs", type=int, default=10)
    p.add_argument("--standalone-epochs", type=int, default=6)
    p.add_argument("--trials", type=int, default=60)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", default="supernet,rank,search,seeds")
    return p.parse_args()


# ------------------------------------------------------------------------------ bookkeeping
class Record:
    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str):
        return self.data.get(key)

    def put(self, key: str, value) -> None:
        self.data[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


# ------------------------------------------------------------------------------ data
def cifar(args: argparse.Namespace) -> tuple[DataSplits, DataSplits]:
    """(full 45k/5k splits, the same with a class-balanced training subset)."""
    root = Path(args.data_root)
    if not (root / "train").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "-xzf", args.cifar_tar, "-C", str(root)], check=True)
    splits = load_dataset("imagefolder", root / "train", 32, split="tail", val_fraction=0.1)
    train = _balanced(splits.train, args.train_subset, splits.num_classes)
    val = _balanced(splits.val, args.val_subset, splits.num_classes)
    return splits, DataSplits(train, val, splits.num_classes, splits.mean, splits.std, splits.class_names, splits.img_size)


def _balanced(dataset, size: int, num_classes: int):
    """A fixed class-balanced subset (seeded), or the whole set when ``size`` covers it."""
    if size >= len(dataset):
        return dataset
    labels = dataset.labels.numpy()
    rng = np.random.default_rng(0)
    keep = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[: size // num_classes] for c in range(num_classes)])
    return dataset.subset(np.sort(keep))


# ------------------------------------------------------------------------------ steps
def recipe(args: argparse.Namespace, seed: int) -> RetrainConfig:
    """One short recipe for every standalone training (weak regularisation suits a few epochs)."""
    return RetrainConfig(epochs=args.standalone_epochs, batch_size=128, lr=1e-3, warmup_epochs=1, min_lr=1e-5,
                         mixup=0.0, cutmix=0.0, randaugment="", label_smoothing=0.1, img_size=32, num_workers=0, seed=seed)


def standalone(arch: Arch, data: DataSplits, args: argparse.Namespace, out: Path, seed: int) -> float:
    torch.manual_seed(seed)
    result = retrain(LocalityViT(arch, drop_path_rate=0.0), data, recipe(args, seed), out, device="cpu", progress=False)
    return result.val_top1


def step_supernet(space: SearchSpace, data: DataSplits, args: argparse.Namespace, out: Path, rec: Record) -> Supernet:
    supernet = Supernet(space, 32)
    band = Band(args.budget / 2, args.budget)
    started = time.time()
    cfg = SupernetConfig(epochs=args.supernet_epochs, batch_size=128, seed=0)
    train_supernet(supernet, data, band, cfg, out / "supernet", device="cpu", progress=False)
    if rec.get("supernet") is None:
        rec.put("supernet", dict(epochs=args.supernet_epochs, band=[band.lo, band.hi], train_images=len(data.train), seconds=time.time() - started))
    return supernet.eval()


def step_rank(space, supernet, data, args, out, rec) -> None:
    rng = random.Random(123)
    archs = [space.sample_in_band(rng, 0.75 * args.budget, args.budget) for _ in range(args.rank_archs)]
    evaluate = make_evaluator(supernet, data)
    rows = rec.get("rank") or []
    for i, arch in enumerate(archs[len(rows):], start=len(rows)):
        proxy = evaluate(arch)
        t = time.time()
        top1 = standalone(arch, data, args, out / "rank" / f"arch_{i}", seed=0)
        rows.append(dict(i=i, macs=count(arch).macs, params=count(arch).params, proxy_top1=proxy, standalone_top1=top1,
                         seconds=time.time() - t, arch=arch.to_dict()))
        rec.put("rank", rows)
        log(f"rank {i}: proxy {proxy:.2f} standalone {top1:.2f}")
    proxy, real = [r["proxy_top1"] for r in rows], [r["standalone_top1"] for r in rows]
    tau = kendalltau(proxy, real).statistic
    top3_proxy = set(np.argsort(proxy)[-3:])
    top3_real = set(np.argsort(real)[-3:])
    rec.put("rank_summary", dict(kendall_tau=tau, top3_precision=len(top3_proxy & top3_real) / 3, n=len(rows)))
    log(f"rank: tau {tau:.3f}, top-3 precision {len(top3_proxy & top3_real)}/3")


def hypervolume(points: list[tuple[float, float]], budget: float) -> float:
    """Area dominated by (top-1 up, MACs down) points within budget, reference (0 %, budget)."""
    area, best = 0.0, 0.0
    for macs, top1 in sorted(points):  # by MACs ascending: each point adds a strip up to its top-1
        if macs <= budget and top1 > best:
            area += (top1 - best) * (budget - macs)
            best = top1
    return area / (100.0 * budget)  # normalised: 1 = 100 % at zero MACs


def step_search(space, supernet, data, args, out, rec) -> None:
    evaluate = make_evaluator(supernet, data)
    for sampler in ("nsga2", "tpe", "random"):
        if (rec.get("search") or {}).get(sampler):
            continue
        t = time.time()
        study = run_search(space, evaluate, budget_macs=args.budget, storage=f"sqlite:///{out / f'study_{sampler}.db'}",
                           study_name=sampler, n_trials=args.trials, sampler=sampler, seed=0, progress=False)
        trials = sorted((t for t in study.trials if t.user_attrs.get("evaluated")), key=lambda t: t.number)
        curve, points = [], []
        for trial in sorted(study.trials, key=lambda t: t.number):
            if trial.user_attrs.get("evaluated") and trial.user_attrs.get("top1") is not None:
                points.append((trial.user_attrs["macs"], trial.user_attrs["top1"]))
            curve.append(hypervolume(points, args.budget))
        best = max(pareto_trials(study, args.budget), key=lambda t: t.user_attrs["top1"])
        search = rec.get("search") or {}
        search[sampler] = dict(hypervolume=curve, evaluated=len(trials), seconds=time.time() - t,
                               best=dict(number=best.number, proxy_top1=best.user_attrs["top1"], macs=best.user_attrs["macs"], arch=best.user_attrs["arch"]))
        rec.put("search", search)
        log(f"search {sampler}: final hypervolume {curve[-1]:.4f}, best proxy {best.user_attrs['top1']:.2f}")


def step_seeds(space, supernet, data, args, out, rec) -> None:
    candidates = {name: arch for name, arch in space.reference_archs(args.budget).items()}
    search = rec.get("search") or {}
    for sampler, label in (("nsga2", "searched (NSGA-II)"), ("random", "random search best")):
        if sampler in search:
            candidates[label] = Arch.from_dict(search[sampler]["best"]["arch"])
    rows = rec.get("seeds") or {}
    evaluate = make_evaluator(supernet, data)
    for seed in range(args.seeds):
        for name, arch in candidates.items():
            key = f"{name}|{seed}"
            if key in rows:
                continue
            t = time.time()
            top1 = standalone(arch, data, args, out / "seeds" / f"{name.replace(' ', '_')}_{seed}", seed)
            rows[key] = dict(name=name, seed=seed, top1=top1, proxy_top1=evaluate(arch), macs=count(arch).macs,
                             params=count(arch).params, seconds=time.time() - t, arch=arch.to_dict())
            rec.put("seeds", rows)
            log(f"seeds {key}: {top1:.2f}")
    table = {}
    for row in rows.values():
        table.setdefault(row["name"], []).append(row["top1"])
    rec.put("seeds_summary", {name: dict(mean=statistics.mean(v), spread=(max(v) - min(v)) / 2, n=len(v)) for name, v in table.items()})


def main() -> None:
    args = parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rec = Record(out / "evidence.json")
    rec.put("config", vars(args))
    full, data = cifar(args)
    log(f"data: {len(data.train)} training images (of {len(full.train)}), {len(data.val)} validation images (of {len(full.val)})")
    space = SearchSpace.load("cifar").for_classes(data.num_classes)
    steps = args.steps.split(",")
    supernet = step_supernet(space, data, args, out, rec)
    log("supernet ready")
    if "rank" in steps:
        step_rank(space, supernet, data, args, out, rec)
    if "search" in steps:
        step_search(space, supernet, data, args, out, rec)
    if "seeds" in steps:
        step_seeds(space, supernet, data, args, out, rec)
    log("done")


if __name__ == "__main__":
    main()
