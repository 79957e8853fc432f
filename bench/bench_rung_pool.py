"""The selection phase with ``--workers N`` (nasloc.selection.pool) against one training at a time, in one run.

Both select among the same CIFAR-10 candidates (the seed designs at 0.03 GMACs: plain ViT, DW shortcut,
LocalViT FFN, LIFE) with the product's RungTrainer, rungs of 1 and 2 epochs, on a subset of the CIFAR-10
JPEG split: one process with all ``--threads`` threads, then ``--workers`` processes with their share each
(their start-up, data loading included, is counted). Prints both wall times, their ratio, and whether the
scores are equal (they are when each process has one thread: the same float sums).

    .venv/bin/python bench/bench_rung_pool.py --threads 2 --workers 2
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence_full import ROOT, lay_out_split  # noqa: E402  (the evidence's split of the CIFAR-10 JPEGs)

from nasloc.phases.supernet import save_untrained
from nasloc.run import RunDir
from nasloc.selection.candidates import Candidate
from nasloc.selection.pool import RungPool
from nasloc.selection.study import run_selection
from nasloc.selection.trainer import RungTrainer, SelectionConfig, TrainerSpec
from nasloc.space.search_space import SearchSpace
from nasloc.space.seed_designs import reference_archs
from nasloc.supernet.proxy import EvaluatorSpec
from nasloc.supernet.supernet import Supernet
from nasloc.training.data import halve_val, load_dataset

DESIGNS = ("plain ViT", "DW shortcut", "LocalViT FFN", "LIFE")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar-tar", default=str(ROOT.parent / "shared/data/cifar10/train.tar.gz"))
    p.add_argument("--data-root", default="/tmp/nasloc-cifar10-split",
                   help="the evidence's split, laid out (if missing) with --per-class images as DATA_ROOT-PER_CLASS")
    p.add_argument("--per-class", type=int, default=600, help="training images per class (val: a tenth)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="as the evidence's selection")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    data = lay_out_split(args.cifar_tar, Path(f"{args.data_root}-{args.per_class}"), small=args.per_class)
    with tempfile.TemporaryDirectory() as tmp:
        splits = load_dataset("imagefolder", data, 32, seed=0)
        space = SearchSpace.load("cifar").for_classes(splits.num_classes)
        torch.manual_seed(0)
        supernet = Supernet(space, 32)
        checkpoint = save_untrained(supernet, RunDir(Path(tmp) / "run"))
        archs = reference_archs(space, 0.03e9)
        candidates = [Candidate(name, archs[name], i) for i, name in enumerate(DESIGNS)]
        config = SelectionConfig(epochs=2, batch_size=args.batch_size)
        print(f"{len(splits.train)} training / {len(splits.val) // 2} selection images, {len(candidates)} candidates, "
              f"rungs 1 and 2 epochs, batch {args.batch_size}", flush=True)

        torch.set_num_threads(args.threads)
        trainer = RungTrainer(supernet, halve_val(splits, 0)[1], config, RunDir(Path(tmp) / "one").selection_dir, "cpu")
        started = time.perf_counter()
        alone = run_selection(candidates, trainer, optuna.storages.InMemoryStorage(), max_epochs=2, say=print)
        one_s = time.perf_counter() - started

        spec = TrainerSpec(EvaluatorSpec("cifar", str(checkpoint), 32, "imagefolder", str(data), 0, device="cpu",
                                         search_half=True), config, str(Path(tmp) / "pool"))
        threads = max(1, args.threads // args.workers)
        started = time.perf_counter()
        with RungPool(spec, args.workers, threads) as pool:
            together = run_selection(candidates, pool, optuna.storages.InMemoryStorage(), max_epochs=2, say=print)
        pool_s = time.perf_counter() - started

    scores = [{t.user_attrs["source"]: t.intermediate_values for t in r.study.get_trials()} for r in (alone, together)]
    print(f"one at a time, {args.threads} threads: {one_s:.1f} s")
    print(f"{args.workers} processes x {threads} thread(s), start-up included: {pool_s:.1f} s")
    print(f"speed-up: {one_s / pool_s:.2f}x; scores equal: {scores[0] == scores[1]}")


if __name__ == "__main__":
    main()
