"""Which start ranks better in the selection phase, supernet weights or scratch? And does sampling the
supernet's random subnets evenly across the MACs band (sub-bands) remove the proxy's bias with MACs?

Ground truth: the standalone top-1 of the 18 archs that ``bench/evidence_cifar.py`` trained in its
CIFAR-10 evidence run (5,000 training / 2,000 validation images, 32 px, 5 epochs, 2-3 seeds each, mean over
seeds; read from ``results/evidence/evidence.json``). On the same images this bench

- trains two supernets on cifar.yaml in [budget/2, budget], with ``sub_bands=1`` (the old sampling, the
  whole band) and ``sub_bands=4``, and scores every arch with each (proxy top-1): the proxy's bias is the
  slope of (proxy - standalone) against MACs, and its ranking quality Kendall tau against standalone;
- trains every arch as the selection phase does (``nasloc.selection.trainer.RungTrainer``, rungs 1, 2, 4 epochs),
  from the ``sub_bands=4`` supernet's weights and from scratch, and gives Kendall tau and top-3 precision of
  each rung's score against standalone.

Every unit (a supernet, a proxy pass, one arch's selection training) is recorded as it finishes in
``results/selection_bench/record.json``; a rerun skips finished units. Two processes share the units:

    nohup .venv/bin/python bench/bench_selection.py --threads 1 > results/selection_bench/log_a.txt 2>&1 &
    nohup .venv/bin/python bench/bench_selection.py --threads 1 --scratch-first > results/selection_bench/log_b.txt 2>&1 &
    .venv/bin/python bench/bench_selection.py --summary      # the tables, once every unit is recorded
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence_cifar import ROOT, Record, cifar, log  # noqa: E402  (the evidence run's data and bookkeeping)

from nasloc.arch import Arch
from nasloc.run import SELECT_INITS
from nasloc.selection.candidates import Candidate
from nasloc.selection.halving import rung_epochs
from nasloc.selection.trainer import RungTrainer, SelectionConfig
from nasloc.space.band import Band
from nasloc.space.flops import count
from nasloc.space.search_space import SearchSpace
from nasloc.supernet.proxy import make_evaluator
from nasloc.supernet.ranking_check import kendall_tau, top_k_precision
from nasloc.supernet.supernet import Supernet
from nasloc.supernet.train import SupernetConfig, load_supernet, train_supernet

SUB_BANDS = (1, 4)
BUDGET = 0.03e9  # MACs per image at 32 px, the evidence run's


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--evidence", default=str(ROOT / "results/evidence/evidence.json"))
    p.add_argument("--out", default=str(ROOT / "results/selection_bench"))
    p.add_argument("--cifar-tar", default=str(ROOT.parent / "shared/data/cifar10/train.tar.gz"))
    p.add_argument("--data-root", default="/tmp/nasloc-cifar10")
    p.add_argument("--train-subset", type=int, default=5000, help="as the evidence run: its standalone ground truth")
    p.add_argument("--val-subset", type=int, default=2000)
    p.add_argument("--supernet-epochs", type=int, default=5)
    p.add_argument("--select-epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--scratch-first", action="store_true", help="train the scratch units first (a second process)")
    p.add_argument("--summary", action="store_true", help="only print the tables")
    return p.parse_args()


def ground_truth(path: Path) -> dict[str, tuple[Arch, float]]:
    """name -> (arch, mean standalone top-1 over its seeds) of every arch the evidence run trained."""
    import json

    record = json.loads(path.read_text())
    runs: dict[str, list[dict]] = {}
    for key, value in record.items():
        if (key.startswith("rank/") or key.startswith("seeds/")) and isinstance(value, dict) and "top1" in value:
            runs.setdefault(key.split("|")[0], []).append(value)
    truth = {}
    for name, trainings in sorted(runs.items()):
        archs = {json.dumps(t["arch"], sort_keys=True) for t in trainings}
        if len(archs) == 1:
            truth[name] = (Arch.from_dict(trainings[0]["arch"]), statistics.mean(t["top1"] for t in trainings))
    return truth


def supernet_for(k: int, space: SearchSpace, data, args, out: Path, rec: Record) -> Supernet | None:
    """The supernet trained with ``sub_bands=k``, training it if this process may; None if another has it."""
    supernet = Supernet(space, 32)
    folder = out / f"supernet_{k}"
    if rec.get(f"supernet/{k}") is None:
        if not rec.claim(f"supernet/{k}"):
            return None
        log(f"supernet sub_bands={k}: {args.supernet_epochs} epochs")
        started = time.time()
        cfg = SupernetConfig(epochs=args.supernet_epochs, batch_size=args.batch_size, sub_bands=k, seed=0)
        train_supernet(supernet, data, Band(BUDGET / 2, BUDGET), cfg, folder, device="cpu", progress=False)
        rec.put(f"supernet/{k}", dict(seconds=time.time() - started, epochs=args.supernet_epochs))
        return supernet.eval()
    return load_supernet(folder / "last.pth", supernet, "cpu").eval()


def proxy_unit(k: int, supernet: Supernet, data, truth, rec: Record) -> None:
    if rec.get(f"proxy/{k}") is not None or not rec.claim(f"proxy/{k}"):
        return
    evaluate = make_evaluator(supernet, data, batch_size=256)
    rec.put(f"proxy/{k}", {name: evaluate(arch) for name, (arch, _) in truth.items()})
    log(f"proxy sub_bands={k} done")


def select_unit(init: str, name: str, arch: Arch, supernet: Supernet, data, args, out: Path, rec: Record) -> None:
    key = f"select/{init}/{name}"
    if rec.get(key) is not None or not rec.claim(key):
        return
    config = SelectionConfig(epochs=args.select_epochs, init=init, batch_size=args.batch_size)
    trainer = RungTrainer(supernet, data, config, lambda _: out / "select" / init / name.replace("/", "_").replace(" ", "_"),
                          device="cpu")
    started = time.time()
    scores = {e: trainer(0, Candidate(name, arch, 0), e) for e in rung_epochs(args.select_epochs)}
    rec.put(key, dict(scores=scores, seconds=time.time() - started))
    log(f"{key}: {scores}")


def summary(truth, rec: Record) -> None:
    names = sorted(truth)
    standalone = [truth[n][1] for n in names]
    macs = np.array([count(truth[n][0]).macs for n in names], dtype=float)
    print(f"{len(names)} archs, standalone top-1 {min(standalone):.1f}-{max(standalone):.1f} %\n")
    print("| supernet sampling | Kendall tau (p) | top-3 precision | bias slope (points per 10 MMACs) | corr(proxy - standalone, MACs) |")
    print("|---|---|---|---|---|")
    for k in SUB_BANDS:
        proxy = rec.get(f"proxy/{k}")
        if proxy is None:
            continue
        p = [proxy[n] for n in names]
        tau, pval = kendall_tau(p, standalone)
        gap = np.array(p) - np.array(standalone)
        slope = np.polyfit(macs / 1e7, gap, 1)[0]
        corr = np.corrcoef(macs, gap)[0, 1]
        label = "whole band (before)" if k == 1 else f"{k} sub-bands (after)"
        print(f"| {label} | {tau:.2f} ({pval:.3f}) | {top_k_precision(p, standalone, 3)}/3 | {slope:+.2f} | {corr:+.2f} |")
    winners: dict[str, list[str]] = {}
    print("\n| selection start | rung (epochs) | Kendall tau (p) | top-3 precision | minutes (all archs) |")
    print("|---|---|---|---|---|")
    for init in SELECT_INITS:
        units = {n: rec.get(f"select/{init}/{n}") for n in names}
        if any(u is None for u in units.values()):
            print(f"| {init} | {sum(u is not None for u in units.values())}/{len(names)} archs done | | | |")
            continue
        minutes = sum(u["seconds"] for u in units.values()) / 60
        for e in sorted(int(e) for e in next(iter(units.values()))["scores"]):
            s = [units[n]["scores"][str(e)] for n in names]
            tau, pval = kendall_tau(s, standalone)
            print(f"| {init} | {e} | {tau:.2f} ({pval:.3f}) | {top_k_precision(s, standalone, 3)}/3 | {minutes:.0f} |")
        winners[init] = halving_winners(units, names)
    by_truth = sorted(names, key=lambda n: -truth[n][1])
    print("\n| selection start | successive halving's top 2 of the 18 (rungs 1, 2, 4) | their standalone rank (of 18) |")
    print("|---|---|---|")
    for init, top in winners.items():
        print(f"| {init} | {', '.join(top)} | {', '.join(str(by_truth.index(n) + 1) for n in top)} |")


def halving_winners(units: dict[str, dict], names: list[str], keep_last: int = 2) -> list[str]:
    """The archs that synchronous successive halving (halve at each rung but the last) would keep, best first."""
    alive = list(names)
    rungs = sorted(int(e) for e in units[names[0]]["scores"])
    for e in rungs:
        alive.sort(key=lambda n: -units[n]["scores"][str(e)])
        alive = alive[: max(keep_last, -(-len(alive) // 2))] if e != rungs[-1] else alive[:keep_last]
    return alive


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rec = Record(out / "record.json")
    truth = ground_truth(Path(args.evidence))
    if args.summary:
        summary(truth, rec)
        return
    torch.set_num_threads(args.threads)
    _, data = cifar(args)  # the evidence run's 5k / 2k class-balanced subsets
    space = SearchSpace.load("cifar").for_classes(10)
    inits = SELECT_INITS[::-1] if args.scratch_first else SELECT_INITS
    for init in inits:
        supernet = supernet_for(4, space, data, args, out, rec) if init == "supernet" else Supernet(space, 32)
        if supernet is None:  # another process trains it: do the other units first
            continue
        if init == "supernet":
            proxy_unit(4, supernet, data, truth, rec)
        for name, (arch, _) in truth.items():
            select_unit(init, name, arch, supernet, data, args, out, rec)
    before = supernet_for(1, space, data, args, out, rec)
    if before is not None:
        proxy_unit(1, before, data, truth, rec)
    while rec.get("supernet/4") is None:  # the supernet-start units wait for that supernet
        time.sleep(30)
    supernet = supernet_for(4, space, data, args, out, rec)
    for name, (arch, _) in truth.items():
        select_unit("supernet", name, arch, supernet, data, args, out, rec)
    log("done")
    summary(truth, rec)


if __name__ == "__main__":
    main()
