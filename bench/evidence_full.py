"""CIFAR-10 evidence at full scale (issue 18): the nasloc picks against every seed design, through the product.

Every unit of work is one run of a user-facing command on the CIFAR-10 JPEG set of ../shared/data/cifar10 with
its split (validation = images 4500-4999 of each class, 5,000; training = the other 45,000), at 32 px:

- ``<budget>/seed/<design>/s<k>``: ``nasloc train`` of a seed design (nasloc.space.seed_designs.reference_archs: the
  largest arch of each mechanism alone within the budget in search_spaces/cifar.yaml) with the standalone recipe, seed k;
- ``<budget>/search/<sampler>``: ``run_search.py`` (supernet, search, selection) with NSGA-II or random search,
  equally long; its retrain phase is run here with the standalone recipe instead of the product's short one:
- ``<budget>/rank/<trial>`` (NSGA-II) and ``<budget>/final/<sampler>/<trial>`` (other samplers): ``nasloc train``
  (seed 0) of a selection candidate. A selection's finalists are those the product's retrain step takes
  (``nasloc.selection.halving.finalists``: the first ``--retrain-top-k`` and every candidate tied with the best; a seed
  design's training is its seed unit); the pick is the finalist with the best top-1, as the product exports the
  best retrained. Every NSGA-II candidate is trained, so that the proxy and selection scores can be ranked
  against the recipe's top-1;
- ``<budget>/pick/<sampler>/s<k>``: the pick with the standalone recipe, seed k (seed 0 is its finalist training).
  When the product's rule names another pick than a recorded one (a change of the rule), the recorded pick units
  are kept in the record's ``superseded`` and run again for the new pick;
- ``<budget>/rank/<trial>/s<k>`` (with ``--rank-seeds`` above 1): a ranking candidate with seed k.

Each finished unit is merged into ``OUT/record.json`` at once (val top-1, MACs, params, wall and CPU seconds), so
the script can be stopped at any moment and rerun: a finished unit is never run again, an unfinished training
resumes from its last epoch (the work folder keeps the checkpoints). Seed 0 of every design and each pick at the
first budget are exported in fp16 under ``results/evidence/exports/<design>/`` (timm's local-dir layout).
Several processes (or ``--jobs``) share the units through claims. Tables and plot: bench/evidence_full_report.py.

CPU, one thread, in the background (the protocol of the issue: 0.03 GMACs, 10 epochs, 2 seeds):

    nohup .venv/bin/python bench/evidence_full.py --threads 1 > results/evidence_full/log.txt 2>&1 &

GPU (30 epochs, parallel units): bench/gpu_evidence.sh. ``--searches-from`` takes the searches of another record
(the CPU study's), so that a short GPU window trains their finalists and the seed designs at 30 epochs.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence_cifar import ROOT, Record, log  # noqa: E402  (claims and the merged JSON record)

from nasloc.fileio import write_atomic
from nasloc.run import RunOptions

DESIGNS = {  # export folder name -> nasloc.space.seed_designs.MECHANISMS key
    "plain": "plain ViT", "dw_shortcut": "DW shortcut", "localvit": "LocalViT FFN", "life": "LIFE",
    "dilateformer": "DilateFormer", "lightvit": "LightViT",
}
SAMPLERS = ("nsga2", "random")
EXPORTS = ROOT / "results/evidence/exports"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar-tar", default=str(ROOT.parent / "shared/data/cifar10/train.tar.gz"))
    p.add_argument("--data-root", default="/tmp/nasloc-cifar10-split",
                   help="where the split is laid out as train/<class> and val/<class> (symlinks)")
    p.add_argument("--small", type=int, default=0,
                   help="smoke test: only this many training images per class (and a tenth as many val)")
    p.add_argument("--work", default="/tmp/nasloc-evidence-full", help="run and training folders (not committed)")
    p.add_argument("--out", default=str(ROOT / "results/evidence_full"), help="record.json and logs")
    p.add_argument("--exports", default=str(EXPORTS), help="where seed 0 of each design and the picks are exported")
    p.add_argument("--budgets", default="0.03", help="GMACs per image at 32 px, comma list")
    p.add_argument("--epochs", type=int, default=10, help="of every standalone training")
    p.add_argument("--seeds", type=int, default=2, help="standalone trainings per design and pick")
    p.add_argument("--designs", default=",".join(DESIGNS),
                   help=f"comma list of the seed designs to train, of {', '.join(DESIGNS)}")
    p.add_argument("--warmup-epochs", type=int, default=0,
                   help="of every standalone training; 0 = a tenth of --epochs, at least 1")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", default="4e-3", help="AdamW lr per 512 images (nasloc train scales it to the batch)")
    p.add_argument("--supernet-epochs", type=int, default=5)
    p.add_argument("--search-batch-size", type=int, default=64, help="run_search --batch-size (supernet, selection)")
    p.add_argument("--search-workers", type=int, default=1,
                   help="run_search --workers: search trials and selection trainings at a time (processes sharing "
                        "--threads or the GPU); the study's searches ran with 1")
    p.add_argument("--trials", type=int, default=60)
    p.add_argument("--samplers", default=",".join(SAMPLERS), help=f"comma list of run_search.py --sampler, of {SAMPLERS}")
    p.add_argument("--search-seed", type=int, default=0,
                   help="run_search.py --seed (the validation halves, the sampler, the supernet and selection "
                        "trainings): another seed, with its own --out and --work, replicates the searches")
    p.add_argument("--select-top-k", type=int, default=8)
    p.add_argument("--select-epochs", type=int, default=4)
    p.add_argument("--retrain-top-k", type=int, default=RunOptions.retrain_top_k,
                   help="finalists per selection besides those tied with the best, trained with the recipe; the "
                        "best is the pick (the product's --retrain-top-k and its default)")
    p.add_argument("--rank", action=argparse.BooleanOptionalAction, default=True,
                   help="train every selection candidate of the NSGA-II run once (the ranking study)")
    p.add_argument("--rank-top", type=int, default=0,
                   help="with --rank, only the selection's first N candidates (0 = all)")
    p.add_argument("--rank-seeds", type=int, default=1,
                   help="with --rank, trainings per candidate; with 2, seed 0 against seed 1 over the candidates is "
                        "the noise ceiling of the ranking itself (one MACs band), and a 2-seed mean its target")
    p.add_argument("--searches-from", default="",
                   help="a record.json whose searches (supernet, search, selection) to take instead of running "
                        "them, e.g. the CPU study's on a GPU, which then trains their candidates with its own recipe; "
                        "their costs stay those measured where they ran")
    p.add_argument("--designs-from", default="",
                   help="a record.json whose seed-design trainings to take instead of running them (the same recipe: "
                        "a replicate of the searches, --search-seed, then needs no seed design trained again)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each command")
    p.add_argument("--loader-workers", type=int, default=1, help="data loading processes of each command")
    p.add_argument("--jobs", type=int, default=1, help="units run at once by this process")
    p.add_argument("--minutes", type=float, default=0, help="stop (killing running units) after this long; 0 = never")
    p.add_argument("--only", default="", help="comma list of unit kinds to run (seed,search,final,pick,rank); default all")
    args = p.parse_args(argv)
    if not set(args.designs.split(",")) <= set(DESIGNS):
        p.error(f"--designs {args.designs}: each must be one of {', '.join(DESIGNS)}")
    if not set(args.samplers.split(",")) <= set(SAMPLERS):
        p.error(f"--samplers {args.samplers}: each must be one of {', '.join(SAMPLERS)}")
    for option, taken in (("--searches-from", "searches"), ("--designs-from", "seed-design trainings")):
        path = getattr(args, option[2:].replace("-", "_"))
        if path and not Path(path).is_file():
            p.error(f"{option} {path}: no such record; give the record.json of a study whose {taken} to take "
                    f"(e.g. results/evidence_full/record.json)")
    return args


# ------------------------------------------------------------------------------------------------ data
def lay_out_split(tar: str, root: Path, small: int = 0) -> Path:
    """The CIFAR-10 JPEGs as root/train/<class> (images 0000-4499) and root/val/<class> (4500-4999), by symlinks."""
    if (root / "val").is_dir():
        return root
    raw = root.with_name(root.name + "-raw")
    if not (raw / "train").is_dir():
        raw.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "-xzf", tar, "-C", str(raw)], check=True)
    staging = root.with_name(root.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    for class_dir in sorted((raw / "train").iterdir()):
        files = sorted(class_dir.iterdir())
        train, val = files[:4500], files[4500:]
        if small:
            train, val = train[:small], val[:max(1, small // 10)]
        for split, chosen in (("train", train), ("val", val)):
            target = staging / split / class_dir.name
            target.mkdir(parents=True)
            for f in chosen:
                (target / f.name).symlink_to(f)
    staging.rename(root)
    return root


# ------------------------------------------------------------------------------------------------ units
@dataclass
class Unit:
    key: str
    needs: tuple[str, ...]
    run: Callable[[], dict]


class Protocol:
    """The units of the study and how each one runs (commands, folders, what is recorded)."""

    def __init__(self, args: argparse.Namespace, data: Path, rec: Record):
        self.args, self.data, self.rec = args, data, rec
        self.work = Path(args.work)
        self.kinds = set(args.only.split(",")) if args.only else {"seed", "search", "final", "pick", "rank"}
        self.stopping = threading.Event()
        self.children: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.running: set[str] = set()  # units taken by this process's threads (claims tell other processes)
        self.failed: set[str] = set()  # tried again by the next run of the script, not by this one

    def take(self, units: list[Unit]) -> Unit | None:
        """The first unit whose needs are recorded and that no thread or process holds, now held by the caller."""
        with self.lock:
            for u in units:
                if u.key not in self.running and all(self.rec.get(n) for n in u.needs) and self.rec.claim(u.key):
                    self.running.add(u.key)
                    return u
        return None

    # ------------------------------------------------------------------------ which units, in what order
    def units(self) -> list[Unit]:
        """Every unit known so far (finalists, picks and ranking archs appear once their search is recorded), by
        priority: the searches first (the longest chains), then seed 0 of each design, the finalists and picks, the
        other seeds, then the ranking trainings."""
        order: list[Unit] = []
        for budget in self.budgets:
            order += [self._search(budget, s) for s in self.samplers]
        for seed in range(self.args.seeds):
            for budget in self.budgets:
                order += [self._seed(budget, d, seed) for d in self.args.designs.split(",")]
                if seed == 0:
                    order += [u for s in self.samplers if self._searched(budget, s) for u in self._finalist_units(budget, s)]
                order += [self._pick(budget, s, seed) for s in self.samplers if self._searched(budget, s)]
        if self.args.rank:
            order += [u for b in self.budgets if self._searched(b, "nsga2") for u in self._ranking(b)]
        unique = {u.key: u for u in reversed(order)}  # a finalist of the NSGA-II run is also a ranking unit
        return [unique[k] for k in dict.fromkeys(u.key for u in order) if k.split("/")[1] in self.kinds]

    @property
    def budgets(self) -> list[str]:
        return budget_keys(self.args.budgets)

    @property
    def samplers(self) -> list[str]:
        return self.args.samplers.split(",")

    def _searched(self, budget: str, sampler: str) -> dict | None:
        return self.rec.get(f"{budget}/search/{sampler}")

    def _seed(self, budget: str, design: str, seed: int) -> Unit:
        key = f"{budget}/seed/{design}/s{seed}"
        return Unit(key, (), lambda: self._train(key, self._design_file(budget, design), seed, export_as=design))

    def _finalists(self, budget: str, sampler: str) -> list[tuple[dict, str]]:
        """(candidate, key of its seed-0 recipe training) of the finalists the product's retrain step takes
        (:func:`selection_finalists`), best first."""
        search = self._searched(budget, sampler)
        return [(c, self._training_key(budget, sampler, c)) for c in selection_finalists(search, self.args.retrain_top_k)]

    def _training_key(self, budget: str, sampler: str, candidate: dict) -> str:
        design = self._seed_design_of(budget, candidate)
        if design:  # a seed design among the candidates: its own seed-0 training
            return f"{budget}/seed/{design}/s0"
        twin = self._ranked_twin(budget, sampler, candidate)
        if twin is not None:  # the same arch as an NSGA-II candidate that the ranking trains: that training
            return f"{budget}/rank/{twin}"
        return f"{self._own_units(budget, sampler)}{candidate['search_trial']}"

    @staticmethod
    def _own_units(budget: str, sampler: str) -> str:
        """The key prefix of the candidate trainings a sampler's search brings (NSGA-II's are the ranking's)."""
        return f"{budget}/rank/" if sampler == "nsga2" else f"{budget}/final/{sampler}/"

    def _ranked_twin(self, budget: str, sampler: str, candidate: dict) -> int | None:
        """The NSGA-II search trial with the same arch as another sampler's ``candidate`` among the candidates the
        ranking trains, if any: with the same ``--search-seed`` both searches draw the same first population
        (NSGA-II's is random), so their selections can share archs."""
        if sampler == "nsga2":
            return None
        return next((c["search_trial"] for c in self._ranked(budget) if c["arch"] == candidate["arch"]), None)

    def _finalist_units(self, budget: str, sampler: str) -> list[Unit]:
        """The finalists' seed-0 trainings that no other unit runs (seed designs have their seed units, another
        sampler's twin of a ranking candidate has that ranking unit)."""
        own = self._own_units(budget, sampler)
        return [self._candidate_unit(budget, sampler, c, key) for c, key in self._finalists(budget, sampler)
                if key.startswith(own)]

    def _candidate_unit(self, budget: str, sampler: str, candidate: dict, key: str) -> Unit:
        return Unit(key, (f"{budget}/search/{sampler}",),
                    lambda: self._train(key, self._candidate_file(budget, sampler, candidate), 0))

    def _pick(self, budget: str, sampler: str, seed: int) -> Unit:
        """The finalist with the best recipe top-1 (seed 0); seed 0 is that training itself, exported."""
        key = f"{budget}/pick/{sampler}/s{seed}"
        search_key = f"{budget}/search/{sampler}"
        finalists = self._finalists(budget, sampler) if self._searched(budget, sampler) else []

        def run() -> dict:
            candidate, trained = self._picked(finalists)
            chosen = dict(pick_source=candidate["source"], pick_trial=candidate["search_trial"],
                          finalists={k: self.rec.get(k)["top1"] for _, k in finalists})
            same = self._same_training(budget, sampler, candidate, trained, seed)
            if same:  # the same command as a training already recorded: not run twice
                return {**self._same_as(same, f"nasloc_{sampler}" if seed == 0 else None), **chosen}
            folder = f"{key}/trial{candidate['search_trial']}"  # another pick (a new rule) must not resume this one
            return {**self._train(key, self._candidate_file(budget, sampler, candidate), seed, folder=folder), **chosen}
        # a finalist may be the pick: its training of this seed as a seed design or a ranking unit then comes first
        same = [self._same_training(budget, sampler, c, k, seed) for c, k in finalists] if seed else []
        return Unit(key, (search_key, *(k for _, k in finalists), *filter(None, same)), run)

    def _picked(self, finalists: list[tuple[dict, str]]) -> tuple[dict, str]:
        """The finalist (candidate, training key) with the best seed-0 top-1: the product exports the best
        retrained."""
        return max(finalists, key=lambda f: self.rec.get(f[1])["top1"])

    def retire_stale_picks(self) -> None:
        """Bring the recorded pick units up to the product's rule as it is now, once every finalist's seed-0
        training is recorded: a unit whose pick the rule no longer names is kept in the record's ``superseded``
        and unrecorded, so that it runs again for the new pick; one whose pick stands but whose finalists
        changed gets the new finalists (the same training, so nothing runs again)."""
        for budget in self.budgets:
            for sampler in filter(partial(self._searched, budget), self.samplers):
                finalists = self._finalists(budget, sampler)
                if not all(self.rec.get(k) for _, k in finalists):
                    continue
                picked = self._picked(finalists)[0]
                now = {k: self.rec.get(k)["top1"] for _, k in finalists}
                for seed in range(self.args.seeds):
                    key = f"{budget}/pick/{sampler}/s{seed}"
                    recorded = self.rec.get(key)
                    if not recorded:
                        continue
                    if (recorded["pick_source"], recorded["pick_trial"]) != (picked["source"], picked["search_trial"]):
                        label = f"{key} (pick {recorded['pick_source']}, superseded {time.strftime('%Y-%m-%d %H:%M')})"
                        self.rec.put("superseded", {**(self.rec.get("superseded") or {}), label: recorded})
                        self.rec.put(key, None)
                        log(f"{key}: the rule now picks {picked['source']}, not {recorded['pick_source']}: the "
                            f"record keeps it under superseded, the unit runs again")
                    elif recorded["finalists"] != now:
                        self.rec.put(key, {**recorded, "finalists": now})
                        log(f"{key}: the pick stands; its finalists are now {', '.join(now)}")

    def _same_training(self, budget: str, sampler: str, candidate: dict, trained: str, seed: int) -> str | None:
        """The unit that trains ``candidate`` with ``seed`` by the recipe, if another kind of unit does: seed 0 is
        its finalist training, a seed design has its seed units, a ranking candidate its ranking seeds."""
        design = self._seed_design_of(budget, candidate)
        if seed == 0:
            return trained
        if design:
            return f"{budget}/seed/{design}/s{seed}"
        if sampler == "nsga2" and seed < self.args.rank_seeds and candidate in self._ranked(budget):
            return f"{trained}/s{seed}"
        return None

    def _ranked(self, budget: str) -> list[dict]:
        """The NSGA-II candidates that the ranking study trains (``--rank``, the first ``--rank-top`` by the
        selection ranking that nasloc has now)."""
        return selection_order(self._searched(budget, "nsga2"))[: self.args.rank_top or None] if self.args.rank else []

    def _seed_design_of(self, budget: str, candidate: dict) -> str | None:
        """The design whose arch the candidate is (the seed designs compete in the selection), else None."""
        design = next((d for d, label in DESIGNS.items() if label == candidate["source"]), None)
        if design and json.loads(json.dumps(_design_arch(budget, design))) == candidate["arch"]:  # as JSON
            return design
        return None

    def _same_as(self, unit: str, export_as: str | None = None) -> dict:
        """The result of ``unit``'s training for a unit that would run the same command (same arch, recipe and
        seed: a pick that is a seed design, the ranking training of the pick), marked as such; exported again
        under ``export_as`` if given."""
        result = dict(self.rec.get(unit), same_as=unit)
        result.pop("export", None)
        trained = self.work / unit / "export"
        if export_as and trained.is_dir():  # not there for a training taken from another study (--designs-from)
            result["export"] = os.path.relpath(_export_fp16(trained, Path(self.args.exports) / export_as), ROOT)
        return result

    def _ranking(self, budget: str) -> list[Unit]:
        """Each selection candidate of the NSGA-II run that is not a seed design (those are trained anyway), seed 0
        of every one first, then seed 1 (``<budget>/rank/<trial>/s1``), and so on up to ``--rank-seeds``."""
        keyed = [(c, self._training_key(budget, "nsga2", c)) for c in self._ranked(budget)]
        keyed = [(c, key) for c, key in keyed if "/seed/" not in key]
        return [self._candidate_unit(budget, "nsga2", c, key) for c, key in keyed] + \
            [self._ranking_seed(budget, c, key, seed) for seed in range(1, self.args.rank_seeds) for c, key in keyed]

    def _ranking_seed(self, budget: str, candidate: dict, seed0_key: str, seed: int) -> Unit:
        """A candidate's training with another seed (the NSGA-II pick's unit of that seed takes its result)."""
        key = f"{seed0_key}/s{seed}"
        return Unit(key, (seed0_key,), lambda: self._train(key, self._candidate_file(budget, "nsga2", candidate), seed))

    def _search(self, budget: str, sampler: str) -> Unit:
        key = f"{budget}/search/{sampler}"
        return Unit(key, (), lambda: self._run_search(key, budget, sampler))

    # ------------------------------------------------------------------------ what a unit runs
    def _design_file(self, budget: str, design: str) -> Path:
        """The seed design's arch as a JSON file (nasloc train --model takes it)."""
        return self._arch_file(f"{budget}/{design}", _design_arch(budget, design))

    def _candidate_file(self, budget: str, sampler: str, candidate: dict) -> Path:
        """A selection candidate's arch as a JSON file (written when its training starts, not per scheduling pass)."""
        return self._arch_file(f"{budget}/{sampler}-trial{candidate['search_trial']}", candidate["arch"])

    def _arch_file(self, name: str, arch: dict) -> Path:
        """An arch as a JSON file for nasloc train --model (the record holds the archs, so a unit can run on
        another machine than its search)."""
        path = self.work / "archs" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_atomic(path, json.dumps(arch))

    def _train(self, key: str, model: str | Path, seed: int, export_as: str | None = None,
               folder: str | None = None) -> dict:
        """``nasloc train`` of ``model`` by the recipe with ``seed`` in the work folder ``folder`` (default: the
        unit's key); its result for the record."""
        a = self.args
        out = self.work / (folder or key)
        warmup = a.warmup_epochs or max(1, a.epochs // 10)
        command = [sys.executable, "-m", "nasloc", "train", "--model", str(model), "--dataset", "imagefolder",
                   "--data-dir", str(self.data), "--epochs", str(a.epochs), "--img-size", "32", "--seed", str(seed),
                   "--batch-size", str(a.batch_size), "--lr", a.lr, "--warmup-epochs", str(warmup),
                   "--label-smoothing", "0.1", "--mixup", "0", "--cutmix", "0", "--randaugment", "",
                   "--drop-path", "0", "--grad-clip", "5", "--ema-decay", "0", "--workers", str(a.loader_workers),
                   "--device", a.device, "--out", str(out)]
        timing = self._execute_once(key, command, out / "export" / "config.json", out / "costs.json")
        config = json.loads((out / "export" / "config.json").read_text())
        info = config["nasloc"]  # macs and params by the analytic counter (equal to fvcore's)
        result = dict(model=str(model), seed=seed, epochs=a.epochs, top1=info["val_top1"], macs=info["macs"],
                      params=info["params"],
                      **timing, device=a.device, command=_shown(command))
        if export_as and seed == 0 and key.startswith(f"{self.budgets[0]}/"):
            result["export"] = os.path.relpath(_export_fp16(out / "export", Path(a.exports) / export_as), ROOT)
        return result

    def _run_search(self, key: str, budget: str, sampler: str) -> dict:
        a = self.args
        name = key.replace("/", "-")
        command = [sys.executable, str(ROOT / "run_search.py"), "--budget", budget, "--space", "cifar",
                   "--dataset", "imagefolder", "--data-dir", str(self.data), "--proxy-img-size", "32",
                   "--supernet-epochs", str(a.supernet_epochs), "--trials", str(a.trials), "--sampler", sampler,
                   "--select-top-k", str(a.select_top_k), "--select-epochs", str(a.select_epochs),
                   "--batch-size", str(a.search_batch_size), "--retrain-top-k", "0", "--device", a.device,
                   "--seed", str(a.search_seed), "--run-name", name,
                   "--results-dir", str(self.work / "runs")]
        if a.search_workers > 1:
            command += ["--workers", str(a.search_workers)]
        run_dir = self.work / "runs" / name
        timing = self._execute_once(key, command, run_dir / "selection.csv", run_dir / "costs.json")
        trials = {int(r["number"]): r for r in _csv(run_dir / "trials.csv")}
        candidates = [dict(source=r["source"], search_trial=int(r["search_trial"]), rank=int(r["rank"]),
                           state=r["state"], macs=float(r["macs"]), params=int(float(r["params"])),
                           proxy_top1=float(trials[int(r["search_trial"])]["top1"]),
                           arch=json.loads(trials[int(r["search_trial"])]["arch_json"]),
                           scores={k.replace("score@", "top1@"): float(v) for k, v in r.items()
                                   if k.startswith(("top1@", "score@")) and v})
                      for r in _csv(run_dir / "selection.csv")]
        return dict(run_dir=str(run_dir), pick=candidates[0], candidates=candidates, **timing,
                    held_out=logged_held_out(self._log(key)),
                    trials=a.trials, supernet_epochs=a.supernet_epochs, select_top_k=a.select_top_k,
                    select_epochs=a.select_epochs, device=a.device, command=_shown(command))

    def _execute_once(self, key: str, command: list[str], product: Path, costs: Path) -> dict:
        """Run the command unless its product exists from an earlier run; returns its ``wall_s`` and ``cpu_s``.

        A unit whose command finished but whose recording failed is not run again. ``costs`` holds the time
        spent so far, rewritten every minute while the command runs and when it ends, so that a unit resumed
        after an interruption counts its earlier attempts too. A unit that had begun before units were timed
        so (its folder there, no ``costs``) gets ``timing_partial``: the report leaves it out of the costs.
        ``costs`` also lists the code each attempt started with (:func:`code_version`).
        """
        if not product.exists():
            if costs.exists():
                earlier = json.loads(costs.read_text())
            else:
                earlier = dict(wall_s=0.0, cpu_s=0.0)
                if costs.parent.is_dir() and any(costs.parent.iterdir()):
                    earlier["timing_partial"] = "an attempt before the last was not timed (it began before units were)"
            earlier["code"] = earlier.get("code", []) + [code_version()]
            self._execute(key, command, lambda wall, cpu: _write_json(
                costs, {**earlier, "wall_s": earlier["wall_s"] + wall, "cpu_s": earlier["cpu_s"] + cpu}))
        return json.loads(costs.read_text()) if costs.exists() else dict(wall_s=None, cpu_s=None)

    def _execute(self, key: str, command: list[str], spent: Callable[[float, float], None]) -> None:
        """Run one command to its end (its log beside the record), telling ``spent`` its wall seconds and the CPU
        seconds of it and its children every minute and when it ends (killed or not)."""
        env = dict(os.environ, OMP_NUM_THREADS=str(self.args.threads), MKL_NUM_THREADS=str(self.args.threads),
                   PYTHONUNBUFFERED="1")
        log = self._log(key)
        log.parent.mkdir(parents=True, exist_ok=True)
        started = time.time()
        with open(log, "a") as out:
            child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            self.children.add(child)
            told = started
            while True:
                pid, status, usage = os.wait4(child.pid, os.WNOHANG)
                if pid:
                    break
                if time.time() - told >= 60:
                    told = time.time()
                    spent(told - started, _cpu_seconds(child.pid))
                time.sleep(1)  # the next unit starts within a second of this one's end
            self.children.discard(child)
            child.returncode = os.waitstatus_to_exitcode(status)
        spent(time.time() - started, usage.ru_utime + usage.ru_stime)  # a killed attempt's time counts too
        if child.returncode != 0:
            raise RuntimeError(f"{key}: exit {child.returncode} (log: {log})")

    def _log(self, key: str) -> Path:
        return Path(self.args.out) / "logs" / (key.replace("/", "-") + ".log")

    def stop(self) -> None:
        self.stopping.set()
        for child in list(self.children):
            child.send_signal(signal.SIGTERM)


def budget_keys(budgets: str) -> list[str]:
    """``--budgets`` ("0.03,0.1", GMACs) as the record's key prefixes ("0.03G", "0.1G")."""
    return [f"{float(b):g}G" for b in budgets.split(",")]


def selection_order(search: dict) -> list[dict]:
    """A recorded search's selection candidates in the order of ``nasloc.selection.halving.ranking`` as it is now."""
    return [search["candidates"][t.user_attrs["index"]] for t in _selection(search).ranking]


def selection_finalists(search: dict, top_k: int) -> list[dict]:
    """The candidates of a recorded search that the product's retrain step takes now with ``--retrain-top-k``
    ``top_k`` (``nasloc.selection.halving.finalists``), best first."""
    from nasloc.selection.halving import finalists
    return [search["candidates"][t.user_attrs["index"]] for t in finalists(_selection(search), top_k)]


def _selection(search: dict):
    """The product's ``SelectionResult`` of an in-memory copy of a recorded selection study (rung scores, the
    held-out size), so that a change of the ranking or finalist rule reaches a study's finalists without
    training anything again. A search recorded without ``held_out`` has no ties."""
    import optuna
    from optuna.trial import TrialState

    from nasloc.search.study import optuna_quiet
    from nasloc.selection.halving import HELD_OUT_ATTR, selection_result
    with optuna_quiet(True):
        study = optuna.create_study(direction="maximize")
    study.set_user_attr(HELD_OUT_ATTR, search.get("held_out", 0))
    for index, c in enumerate(search["candidates"]):  # trial numbers in the recorded order break equal scores
        rungs = {int(k.removeprefix("top1@").removesuffix("ep")): v for k, v in c["scores"].items()}
        study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, intermediate_values=rungs,
                                                  user_attrs=dict(index=index, arch=c["arch"])))
    return selection_result(study)


def logged_held_out(log: Path) -> int:
    """The selection's held-out images as run_search.py printed them ("..., 2500 held-out images"); 0 if absent."""
    found = re.findall(r"(\d+) held-out images", log.read_text()) if log.exists() else []
    return int(found[-1]) if found else 0


@lru_cache(maxsize=None)
def _design_arch(budget: str, design: str) -> dict:
    """A seed design's arch (nasloc.space.seed_designs.reference_archs: the largest of its mechanism within the
    budget)."""
    from nasloc.space.search_space import SearchSpace
    from nasloc.space.seed_designs import reference_archs
    space = SearchSpace.load("cifar").for_classes(10)
    return reference_archs(space, float(budget[:-1]) * 1e9)[DESIGNS[design]].to_dict()


def _cpu_seconds(pid: int) -> float:
    """CPU seconds of a running process, its reaped children and its live children (Linux /proc; 0 elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK")

    def own(p: int) -> float:  # its user and system time, and those of its children it has reaped
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone, or no /proc
            return 0.0
        return sum(int(f) for f in fields[11:15]) / tick

    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return own(pid) + sum(own(int(c)) for c in children)


def _write_json(path: Path, value: dict) -> None:
    """Atomically; nothing until the command has made its folder (nasloc train refuses a folder it did not make)."""
    if path.parent.is_dir():
        write_atomic(path, json.dumps(value))


def _export_fp16(export: Path, target: Path) -> Path:
    """Copy of a timm export with its weights in fp16 (timm loads them into the fp32 model); atomically replaced."""
    from safetensors.torch import load_file, save_file
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(export, staging)
    weights = load_file(export / "model.safetensors")
    save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, staging / "model.safetensors")
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def code_version() -> str:
    """The commit that a command starting now runs, with ``+edits`` when nasloc's files differ from it: the
    commands import the working tree, so an edit reaches every unit that starts after it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()
    edited = git("status", "--porcelain", "--", "nasloc", "run_search.py", "pyproject.toml")
    return (git("rev-parse", "--short", "HEAD") or "unknown") + ("+edits" if edited else "")


def _shown(command: list[str]) -> str:
    """The command as a user would type it (the interpreter and repository paths shortened)."""
    shown = ["python" if c == sys.executable else c.replace(str(ROOT) + "/", "") for c in command]
    return " ".join(c if c and " " not in c else repr(c) for c in shown)


# ------------------------------------------------------------------------------------------------ scheduling
def work_through(protocol: Protocol, rec: Record) -> None:
    """Run units until none is left (or the protocol stops): the first one whose needs are recorded and that no
    other process holds, again and again."""
    while not protocol.stopping.is_set():
        with protocol.lock:  # a finalist trained since the last pass may change a pick
            protocol.retire_stale_picks()
        units = protocol.units()
        pending = [u for u in units if rec.get(u.key) is None and u.key not in protocol.failed]
        if not pending:
            return
        ready = protocol.take(pending)
        if ready is None:
            time.sleep(5)  # the rest waits for a search or is run by another process
            continue
        log(f"start {ready.key}")
        try:
            result = ready.run()
        except Exception as e:  # one broken unit must not stop the study: record it and go on
            if protocol.stopping.is_set():
                return
            protocol.failed.add(ready.key)
            rec.put(f"failed/{ready.key}", str(e))
            log(f"FAILED {ready.key}: {e}")
            continue
        rec.put(ready.key, result)
        if rec.get(f"failed/{ready.key}") is not None:
            rec.put(f"failed/{ready.key}", None)  # an earlier failure, now mended
        log(f"done {ready.key}: " + (f"top-1 {result['top1']:.2f}" if "top1" in result else
                                     f"pick {result['pick']['source']} (search trial {result['pick']['search_trial']})"))


def import_searches(rec: Record, source: Path, args: argparse.Namespace) -> None:
    """Record the searches of another study's record as this study's (marked ``imported_from``), for every budget
    and sampler that this record lacks; one the source lacks stays a unit to run."""
    theirs = json.loads(source.read_text())
    for budget in budget_keys(args.budgets):
        for sampler in SAMPLERS:
            _take(rec, theirs, f"{budget}/search/{sampler}", source, imported_protocol=theirs.get("protocol"))


RECIPE = ("epochs", "batch_size", "lr", "device", "data_root", "small")  # what makes two seed-design trainings equal


def import_designs(rec: Record, source: Path, args: argparse.Namespace) -> None:
    """Record the seed-design trainings of another study's record as this study's (marked ``imported_from``), for
    every budget, design and seed this record lacks; refused when the two studies' recipes differ."""
    theirs = json.loads(source.read_text())
    differ = [k for k in RECIPE if theirs.get("protocol", {}).get(k) != getattr(args, k)]
    if differ:
        raise SystemExit(f"evidence_full.py: --designs-from {source}: its recipe differs in {', '.join(differ)}; "
                         "take seed designs only from a study with the same recipe")
    for budget in budget_keys(args.budgets):
        for design in DESIGNS:
            for seed in range(args.seeds):
                _take(rec, theirs, f"{budget}/seed/{design}/s{seed}", source)


def _take(rec: Record, theirs: dict, key: str, source: Path, **marks) -> None:
    """Record ``theirs[key]`` as this study's, marked ``imported_from`` (and ``marks``), unless this record has the
    key or the source lacks it."""
    if rec.get(key) is None and theirs.get(key):
        rec.put(key, dict(theirs[key], imported_from=str(source), **marks))
        log(f"{key}: taken from {source}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rec = Record(out / "record.json")
    rec.put("protocol", {k: v for k, v in vars(args).items() if k not in ("jobs", "minutes", "only")})
    if args.searches_from:
        import_searches(rec, Path(args.searches_from), args)
    if args.designs_from:
        import_designs(rec, Path(args.designs_from), args)
    data = lay_out_split(args.cifar_tar, Path(args.data_root), args.small)
    protocol = Protocol(args, data, rec)
    workers = [threading.Thread(target=work_through, args=(protocol, rec), daemon=True) for _ in range(args.jobs)]
    for w in workers:
        w.start()
        time.sleep(1)  # claims are taken in order
    deadline = time.time() + args.minutes * 60 if args.minutes else float("inf")
    signal.signal(signal.SIGTERM, _interrupt)  # a killed study must not leave its commands running on their own
    try:
        while any(w.is_alive() for w in workers) and time.time() < deadline:
            time.sleep(2)
        reason = f"after {args.minutes} min"
    except KeyboardInterrupt:
        reason = "on a signal"
    if any(w.is_alive() for w in workers):
        log(f"stopping {reason}: running units are killed and stay unrecorded (their time so far is kept)")
        protocol.stop()
        for w in workers:
            w.join(timeout=60)
    log("done")


def _interrupt(signum: int, frame) -> None:
    signal.signal(signum, signal.SIG_IGN)  # once: a second signal must not cut the stopping short
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
