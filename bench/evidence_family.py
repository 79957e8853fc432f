"""A model family from one run on CIFAR-10 (issue 36): its exports against the seed designs at each budget, what
it cost, and whether the shared supernet ranks as well as one trained for a single budget.

1. ``run``: the product's own flow, ``run_search.py --budget 0.03G,0.06G,0.12G`` on the 45k/5k split with the
   10-epoch retrain (``--retrain-epochs 10``: the short recipe, the evidence's), every other option at its
   default; a rerun resumes it. Recorded: the command, its wall and CPU seconds (its own and its loaders'),
   ``family.csv`` and ``plan.json`` (seconds per phase, all budgets together).
2. ``proxy``: the family supernet's proxy top-1 of every arch trained for 10 epochs at 0.03 GMACs
   (``results/evidence_full/record.json``, mean over seeds), Kendall tau and top-3 precision against those
   trainings, beside a supernet of the 0.03G band alone (``bench/proxy_resolution.py``'s 32-px supernet: the
   same data, epochs and proxy size). The selection trains its candidates from scratch (``--select-init
   scratch``, the default), so only the proxy depends on the supernet.
3. ``table``: the exports against DilateFormer and DW shortcut trained at each budget with the same recipe and
   split (records named by ``--designs-records``: the 10-epoch study's at 0.03G, and at 0.06G and 0.12G those of
   ``bench/evidence_full.py --only seed --designs dilateformer,dw_shortcut --budgets 0.06,0.12 --epochs 10
   --seeds 1 --out results/evidence_family/designs --work /tmp/nasloc-family-designs --exports
   /tmp/nasloc-family-designs/exports``; ``--seeds 2`` where a margin is within a point).

The space (``search_spaces/cifar.yaml``) spans 20-310 MMACs at 32 px, so the family doubles from 0.03 GMACs up
(a 0.015 GMACs member would have no arch).

    OMP_NUM_THREADS=1 nohup .venv/bin/python bench/evidence_family.py --threads 1 > /tmp/evidence_family.log 2>&1 &
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence_cifar import ROOT, Record, log  # noqa: E402
from evidence_full import DESIGNS  # noqa: E402
from proxy_resolution import compare, ground_truth, proxy_scores, search_archs  # noqa: E402

from nasloc.units import parse_budget  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default="0.03G,0.06G,0.12G", help="run_search.py --budget, as written")
    p.add_argument("--data-root", default="/tmp/nasloc-cifar10-split", help="the 45k/5k split (evidence_full.py)")
    p.add_argument("--work", default="/tmp/nasloc-family", help="the run folder's parent")
    p.add_argument("--retrain-epochs", type=int, default=10)
    p.add_argument("--extra", default="", help="more run_search.py options (a smoke test's short schedules)")
    p.add_argument("--truth", default=str(ROOT / "results/evidence_full/record.json"),
                   help="10-epoch trainings at the ranking budget")
    p.add_argument("--rank-budget", default="0.03G", help="the member whose proxy is ranked against --truth")
    p.add_argument("--single", default=str(ROOT / "results/proxy_resolution.json"),
                   help="bench/proxy_resolution.py's record: the single-budget supernet's ranking")
    p.add_argument("--designs-records", default=",".join(str(ROOT / f"results/{name}/record.json")
                                                         for name in ("evidence_full", "evidence_family/designs")),
                   help="comma list of evidence_full.py records with the seed designs at the budgets")
    p.add_argument("--out", default=str(ROOT / "results/evidence_family/record.json"))
    p.add_argument("--steps", default="run,proxy,table")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def run_dir(args: argparse.Namespace) -> Path:
    return Path(args.work) / "family"


def run_family(args: argparse.Namespace, out: Record) -> None:
    command = [sys.executable, str(ROOT / "run_search.py"), "--space", "cifar", "--budget", args.budgets,
               "--dataset", "imagefolder", "--data-dir", args.data_root, "--retrain-epochs", str(args.retrain_epochs),
               "--device", "cpu", "--run-name", "family", "--results-dir", args.work, *args.extra.split()]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    log(f"family run: {' '.join(command[1:])}")
    started = time.time()
    child = subprocess.Popen(command, cwd=ROOT, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"the family run failed (exit {os.waitstatus_to_exitcode(status)}); rerun to resume it")
    previous = out.get("run") or {}  # a resumed run: the sessions' seconds add up
    folder = run_dir(args)
    with open(folder / "family.csv") as f:
        rows = list(csv.DictReader(f))
    out.put("run", dict(command=" ".join(command[1:]), rows=rows,
                        wall_s=previous.get("wall_s", 0) + time.time() - started,
                        cpu_s=previous.get("cpu_s", 0) + usage.ru_utime + usage.ru_stime,
                        plan=json.loads((folder / "plan.json").read_text())))


def rank_proxy(args: argparse.Namespace, out: Record) -> None:
    archs = search_archs(json.loads(Path(args.truth).read_text()))
    truth = ground_truth(Path(args.truth), 10, archs, (0, 1))
    family = compare(proxy_scores(run_dir(args), {name: archs[name] for name in truth}), truth)
    single_record = json.loads(Path(args.single).read_text()) if Path(args.single).is_file() else {}
    single = next((r for r in single_record.get("table", []) if r["proxy"] == "32px" and r["truth"] == "10 epochs"),
                  None)
    out.put("proxy", dict(budget=args.rank_budget, family=family, single=single))


def table(args: argparse.Namespace, out: Record) -> list[str]:
    """Markdown rows: per budget the family's export and the seed designs' mean top-1 over their seeds."""
    designs: dict[str, dict] = {}
    for path in map(Path, filter(None, args.designs_records.split(","))):
        if path.is_file():
            designs.update(json.loads(path.read_text()))
    lines = ["| budget | model | MMACs | val top-1 (%) | trainings |", "|---|---|---|---|---|"]
    for row in (out.get("run") or {}).get("rows", []):
        budget = row["budget"]
        lines.append(f"| {budget} | family export ({row['design']}, trial {row['trial']}) | {int(row['macs']) / 1e6:.1f} "
                     f"| {float(row['top1']):.2f} | 1 |")
        key = f"{parse_budget(budget) / 1e9:g}G"
        for design in ("dilateformer", "dw_shortcut"):
            units = [u for k, u in designs.items() if k.startswith(f"{key}/seed/{design}/s") and "top1" in u
                     and u.get("epochs") == args.retrain_epochs]
            if units:
                mean = sum(u["top1"] for u in units) / len(units)
                lines.append(f"| {budget} | {DESIGNS[design]} | {units[0]['macs'] / 1e6:.1f} | {mean:.2f} | {len(units)} |")
    out.put("table", lines)
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    out = Record(Path(args.out))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    steps = set(args.steps.split(","))
    if "run" in steps:
        run_family(args, out)
    if "proxy" in steps:
        rank_proxy(args, out)
    if "table" in steps:
        print("\n".join(table(args, out)))
    proxy = out.get("proxy")
    if proxy:
        for name in ("family", "single"):
            if proxy.get(name):
                r = proxy[name]
                print(f"proxy at {proxy['budget']}, {name} supernet: tau {r['tau']:.2f} (p {r['p']:.3f}), "
                      f"top-3 {r['top3']}/3 over {r['archs']} archs")


if __name__ == "__main__":
    main()
