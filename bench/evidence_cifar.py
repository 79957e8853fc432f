"""Evidence on CIFAR-10 (issue 9): ranking quality, search vs the seed mechanisms, search efficiency.

Runs on 2 CPU cores in a few hours by working on subsets (sizes below, all recorded in the output):
the CIFAR-10 JPEG set of ../shared/data/cifar10 with its split (validation = images 4500-4999 of
each class), a class-balanced subset of the 45k training images, and the full 5k validation images.
Every unit of work (supernet, each search, each standalone training) is saved to
``results/evidence/evidence.json`` as it finishes, so the script can be stopped and rerun.

Steps (``--steps``, comma-separated):
- ``supernet``: the supernet on search_spaces/cifar.yaml at 32 px, sandwich rule inside [budget/2, budget].
- ``search``: NSGA-II, TPE and random search (same number of trials each) on that supernet;
  hypervolume of the (top-1, MACs) front within budget after every trial. Then the supernet-inherited
  top-1 of every arch trained in ``train``.
- ``train``: every standalone training, one recipe: the ``--rank-archs`` ranking archs (sampled in
  [0.75 budget, budget], ``--rank-seeds`` trainings each) and, with every seed, each seed mechanism alone in the same skeleton at or
  under the budget (nasloc.space.seed_designs.reference_archs), the NSGA-II best and the random-search best.
  Trainings are claimed one by one, so two processes can share them (one thread each on 2 cores);
  ``--wait-search`` makes a process wait for another one's search to train the searched archs too.
- ``summary``: waits until every training is recorded, then Kendall tau and top-3 precision of
  supernet-inherited vs standalone top-1. ``bench/evidence_report.py`` prints every table from the record.

Two processes on 2 cores:

    nohup .venv/bin/python bench/evidence_cifar.py --threads 1 > results/evidence/log_a.txt 2>&1 &
    nohup .venv/bin/python bench/evidence_cifar.py --threads 1 --steps train --wait-search > results/evidence/log_b.txt 2>&1 &
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from nasloc.arch import Arch
from nasloc.fileio import write_atomic
from nasloc.search.engine import run_search
from nasloc.search.study import pareto_trials
from nasloc.space.band import Band
from nasloc.space.flops import count
from nasloc.space.search_space import SearchSpace
from nasloc.space.seed_designs import reference_archs
from nasloc.storage.heartbeat import process_alive
from nasloc.supernet.proxy import make_evaluator
from nasloc.supernet.ranking_check import kendall_tau, sample_band, short_recipe, top_k_precision, train_standalone
from nasloc.supernet.supernet import Supernet
from nasloc.supernet.train import SupernetConfig, train_supernet
from nasloc.training.data import DataSplits, load_dataset

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar-tar", default=str(ROOT.parent / "shared/data/cifar10/train.tar.gz"))
    p.add_argument("--data-root", default="/tmp/nasloc-cifar10")
    p.add_argument("--out", default=str(ROOT / "results/evidence"))
    p.add_argument("--budget", type=float, default=0.03e9, help="MACs per image at 32 px")
    p.add_argument("--train-subset", type=int, default=5000, help="training images (class-balanced)")
    p.add_argument("--val-subset", type=int, default=2000, help="validation images (class-balanced, of the 5k)")
    p.add_argument("--supernet-epochs", type=int, default=10)
    p.add_argument("--rank-archs", type=int, default=10)
    p.add_argument("--rank-seeds", type=int, default=1,
                   help="standalone trainings per ranking arch; with 2 or more the summary also gives the tau between "
                        "two trainings of the same archs (the noise ceiling of the short recipe)")
    p.add_argument("--standalone-epochs", type=int, default=5)
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="of the supernet and of every standalone training")
    p.add_argument("--steps", default="supernet,search,train,summary")
    p.add_argument("--wait-search", action="store_true",
                   help="train step: wait for another process's search results, then train the searched archs too")
    p.add_argument("--threads", type=int, default=2, help="torch threads of this process")
    return p.parse_args()


# ------------------------------------------------------------------------------ bookkeeping
class Record:
    """evidence.json, shared by the processes of one study: every write merges into the file on disk."""

    def __init__(self, path: Path):
        self.path = path
        self.claims = path.parent / "claims"

    def load(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def get(self, key: str):
        return self.load().get(key)

    def put(self, key: str, value) -> None:
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be merging its own key
            data = self.load()
            data[key] = value
            write_atomic(self.path, json.dumps(data, indent=1, default=str))

    def claim(self, unit: str) -> bool:
        """True when this process may run ``unit``: nobody else holds it (a dead holder's claim is taken over)."""
        self.claims.mkdir(exist_ok=True)
        path = self.claims / unit.replace("/", "_").replace(" ", "_")
        if path.exists():
            holder = int(path.read_text() or 0)  # 0: the claimer died before writing its pid
            if holder and holder != os.getpid() and process_alive(holder):
                return False
            path.unlink(missing_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:  # another process claimed it just now
            return False
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True


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
def standalone(arch: Arch, data: DataSplits, args: argparse.Namespace, out: Path, seed: int) -> float:
    """One short recipe for every standalone training (nasloc.supernet.ranking_check's, as ``nasloc check-ranking`` trains)."""
    return train_standalone(arch, data, short_recipe(args.standalone_epochs, 32, seed, args.batch_size), out, device="cpu")


def step_supernet(space: SearchSpace, data: DataSplits, args: argparse.Namespace, out: Path, rec: Record) -> Supernet:
    supernet = Supernet(space, 32)
    band = Band(args.budget / 2, args.budget)
    started = time.time()
    cfg = SupernetConfig(epochs=args.supernet_epochs, batch_size=args.batch_size, seed=0)
    train_supernet(supernet, data, band, cfg, out / "supernet", device="cpu", progress=False)
    if rec.get("supernet") is None:
        rec.put("supernet", dict(epochs=args.supernet_epochs, band=[band.lo, band.hi], train_images=len(data.train), seconds=time.time() - started))
    return supernet.eval()


def rank_archs(space: SearchSpace, args: argparse.Namespace) -> list[Arch]:
    """The ranking study's archs: sampled (fixed seed) in the band [0.75 budget, budget]."""
    return sample_band(space, 0.75 * args.budget, args.budget, args.rank_archs, seed=123)


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


SEARCHED = (("nsga2", "searched (NSGA-II)"), ("random", "random search best"))


def rank_key(i: int, seed: int) -> str:
    return f"rank/{i}" if seed == 0 else f"rank/{i}|{seed}"  # seed 0 keeps the key of single-seed runs


def seed_candidates(space: SearchSpace, args: argparse.Namespace, rec: Record) -> dict[str, Arch]:
    """The seed designs at the budget, plus the searched archs that have been recorded so far."""
    candidates = dict(reference_archs(space, args.budget))
    search = rec.get("search") or {}
    for sampler, label in SEARCHED:
        if sampler in search:
            candidates[label] = Arch.from_dict(search[sampler]["best"]["arch"])
    return candidates


def training_units(space: SearchSpace, args: argparse.Namespace, rec: Record) -> list[tuple[str, Arch, int]]:
    """Every standalone training known so far as (record key, arch, seed), in the order to run them."""
    candidates = seed_candidates(space, args, rec)
    archs = rank_archs(space, args)
    units = []
    for seed in range(max(args.seeds, args.rank_seeds)):  # every design's seed s before any seed s + 1
        units += [(f"seeds/{name}|{seed}", arch, seed) for name, arch in candidates.items() if seed < args.seeds]
        units += [(rank_key(i, seed), arch, seed) for i, arch in enumerate(archs) if seed < args.rank_seeds]
    return units


def step_train(space, data, args, out, rec) -> None:
    """Run every standalone training not yet done; units are claimed, so two processes can share them."""
    while True:
        units = training_units(space, args, rec)
        if any(run_unit(key, arch, seed, data, args, out, rec) for key, arch, seed in units):
            continue  # the search may have finished meanwhile: look for new units
        if args.wait_search and any(sampler not in (rec.get("search") or {}) for sampler, _ in SEARCHED):
            time.sleep(30)  # the search runs in another process
            continue
        return


def run_unit(key: str, arch: Arch, seed: int, data, args, out: Path, rec: Record) -> bool:
    """Train ``arch`` standalone with ``seed`` unless done or claimed by another process; True when it ran."""
    if rec.get(key) is not None or not rec.claim(key):
        return False
    t = time.time()
    top1 = standalone(arch, data, args, out / key.replace("|", "_seed").replace(" ", "_"), seed)
    cost = count(arch)
    rec.put(key, dict(seed=seed, top1=top1, macs=cost.macs, params=cost.params, seconds=time.time() - t, arch=arch.to_dict()))
    log(f"{key}: {top1:.2f}")
    return True


def step_proxy(space, supernet, data, args, rec) -> None:
    """Supernet-inherited top-1 of the ranking archs, the seed designs and the searched archs."""
    evaluate = make_evaluator(supernet, data)
    rec.put("proxy/rank", [evaluate(arch) for arch in rank_archs(space, args)])
    rec.put("proxy/seeds", {name: evaluate(arch) for name, arch in seed_candidates(space, args, rec).items()})


def step_summary(space, args, rec) -> None:
    """Kendall tau and top-3 precision, once every unit (of any process) is recorded (tables: evidence_report.py)."""
    while any(rec.get(key) is None for key, _, _ in training_units(space, args, rec)):
        time.sleep(30)
    proxy = rec.get("proxy/rank")
    runs = [[rec.get(rank_key(i, seed))["top1"] for i in range(args.rank_archs)] for seed in range(args.rank_seeds)]
    real = [statistics.mean(r) for r in zip(*runs)]  # mean over the trainings of each arch
    tau, _ = kendall_tau(proxy, real)
    summary = dict(kendall_tau=tau, top3_precision=top_k_precision(proxy, real, 3) / 3, n=len(real),
                   standalone_seeds=args.rank_seeds)
    if args.rank_seeds > 1:  # how well one short training ranks the archs of another: the ceiling for any proxy
        summary["standalone_seed_tau"] = kendall_tau(runs[0], runs[1])[0]
    rec.put("rank_summary", summary)
    log(f"rank: {summary}")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rec = Record(out / "evidence.json")
    steps = args.steps.split(",")
    rec.put(f"config/{args.steps}", vars(args))
    full, data = cifar(args)
    log(f"data: {len(data.train)} training images (of {len(full.train)}), {len(data.val)} validation images (of {len(full.val)})")
    space = SearchSpace.load("cifar").for_classes(data.num_classes)
    if {"supernet", "search"} & set(steps):
        supernet = step_supernet(space, data, args, out, rec)
        log("supernet ready")
    if "search" in steps:
        step_search(space, supernet, data, args, out, rec)
        step_proxy(space, supernet, data, args, rec)
    if "train" in steps:
        step_train(space, data, args, out, rec)
    if "summary" in steps:
        step_summary(space, args, rec)
    log("done")


if __name__ == "__main__":
    main()
