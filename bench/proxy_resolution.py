"""Does a proxy resolution below the locality rule rank archs worse? (issue 34, item 1)

The locality rule (``nasloc.space.locality``) sets the default proxy size: the smallest at which every stage's
token map holds the widest locality operation the space allows there. On the imagenet space that is 224 px;
at 32 px its maps are 4x4 to 1x1. A ranking study at 224 px does not fit this CPU, so this one measures the same
effect on the cifar space, where the rule gives 32 px (the deploy size) and 16 px halves every map to 4x4: a
7x7 shortcut kernel, dilation 3, the 5x5 FFN kernel and LIFE reach past its edges (the run's warning names them).

For each proxy size, one supernet is trained by the product (``run_search.py --phase supernet``, the 45k/5k
CIFAR-10 split, ``--budget 0.03G``; resumable), and every arch with a recorded standalone training is scored by
the search's proxy (supernet weights, BatchNorm recalibrated, half of the validation split). The ground truth is
the standalone trainings at the deploy size, 32 px: the 10-epoch ones of ``results/evidence_full/record.json``
(mean over their seeds) and the 30-epoch ones of ``results/evidence30/record.json`` (seed 0). Printed and
written to ``results/proxy_resolution.json``: Kendall tau (p) and top-3 precision of each proxy against each.

    OMP_NUM_THREADS=1 nohup .venv/bin/python bench/proxy_resolution.py --threads 1 > /tmp/proxy_resolution.log 2>&1 &
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence_cifar import ROOT, Record, log  # noqa: E402
from evidence_full import DESIGNS, _design_arch  # noqa: E402

from nasloc.supernet.ranking_check import kendall_tau, top_k_precision  # noqa: E402

BUDGET = "0.03G"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="16,32", help="proxy sizes to compare (px, comma list)")
    p.add_argument("--data-root", default="/tmp/nasloc-cifar10-split", help="the 45k/5k split (evidence_full.py)")
    p.add_argument("--work", default="/tmp/nasloc-proxy-resolution", help="the supernets' run folders")
    p.add_argument("--supernet-epochs", type=int, default=5, help="as the searches of the CIFAR-10 evidence")
    p.add_argument("--truth-10", default=str(ROOT / "results/evidence_full/record.json"))
    p.add_argument("--truth-30", default=str(ROOT / "results/evidence30/record.json"))
    p.add_argument("--out", default=str(ROOT / "results/proxy_resolution.json"))
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------- ground truth
def search_archs(record: dict) -> dict[str, dict]:
    """Arch file stem of the evidence (``nsga2-trial36``, ``dilateformer``) -> its arch, from the searches' candidates."""
    archs = {}
    for key, unit in record.items():
        match = re.fullmatch(rf"{BUDGET}/search/(\w+)", key)
        if match and isinstance(unit, dict):
            for candidate in unit.get("candidates", []):
                archs[f"{match.group(1)}-trial{candidate['search_trial']}"] = candidate["arch"]
    for design in DESIGNS:
        archs[design] = _design_arch(BUDGET, design)
    return archs


def ground_truth(path: Path, epochs: int, archs: dict[str, dict], seeds: tuple[int, ...]) -> dict[str, dict]:
    """Arch name -> its arch and mean top-1 over the standalone trainings of ``epochs`` with one of ``seeds``."""
    record = json.loads(path.read_text())
    trainings: dict[tuple[str, int], float] = {}  # one per arch and seed: a pick is recorded twice
    for key, unit in record.items():
        if (isinstance(unit, dict) and key.startswith(BUDGET) and unit.get("epochs") == epochs
                and unit.get("seed") in seeds and "top1" in unit and "model" in unit):
            trainings.setdefault((Path(unit["model"]).stem, unit["seed"]), unit["top1"])
    top1s: dict[str, list[float]] = defaultdict(list)
    for (name, _), top1 in trainings.items():
        top1s[name].append(top1)
    missing = sorted(set(top1s) - set(archs))
    if missing:
        raise SystemExit(f"{path}: no arch known for {', '.join(missing)}")
    return {name: dict(arch=archs[name], top1=sum(v) / len(v), trainings=len(v)) for name, v in sorted(top1s.items())}


# ------------------------------------------------------------------------------------------- supernets and proxies
def train_supernet(size: int, args: argparse.Namespace) -> Path:
    """The product's supernet phase at proxy size ``size`` (a rerun resumes it); its run folder."""
    name = f"proxy-{size}px"
    command = [sys.executable, str(ROOT / "run_search.py"), "--space", "cifar", "--budget", BUDGET,
               "--dataset", "imagefolder", "--data-dir", args.data_root, "--proxy-img-size", str(size),
               "--supernet-epochs", str(args.supernet_epochs), "--phase", "supernet", "--device", "cpu",
               "--seed", "0", "--run-name", name, "--results-dir", args.work]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    log(f"supernet at {size} px: {' '.join(command[1:])}")
    subprocess.run(command, check=True, cwd=ROOT, env=env)
    return Path(args.work) / name


def proxy_scores(run_dir: Path, archs: dict[str, dict]) -> dict[str, float]:
    """The search's proxy top-1 of each arch on the supernet of ``run_dir``."""
    from nasloc.arch import Arch
    from nasloc.cli.check_ranking import search_proxy
    from nasloc.phases.inputs import load_inputs
    from nasloc.run import RunDir
    from nasloc.training.distributed import resolve_device

    run = RunDir(run_dir)
    options = run.read_record().options
    space, splits, _ = load_inputs(options)
    proxy = search_proxy(run, options, space, splits, resolve_device("cpu"))
    return {name: float(proxy(Arch.from_dict(arch))) for name, arch in archs.items()}


def compare(proxies: dict[str, float], truth: dict[str, dict]) -> dict:
    names = sorted(truth)
    values, final = [proxies[n] for n in names], [truth[n]["top1"] for n in names]
    tau, p = kendall_tau(values, final)
    return dict(archs=len(names), tau=tau, p=p, top3=top_k_precision(values, final, 3))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    archs = search_archs(json.loads(Path(args.truth_10).read_text()))
    truths = {"10 epochs": ground_truth(Path(args.truth_10), 10, archs, (0, 1)),
              "30 epochs": ground_truth(Path(args.truth_30), 30, archs, (0,))}
    out = Record(Path(args.out))
    out.put("truth", truths)
    needed = {name: archs[name] for truth in truths.values() for name in truth}
    for size in (int(s) for s in args.sizes.split(",")):
        key = f"{size}px"
        if key not in (out.get("proxies") or {}):
            scores = proxy_scores(train_supernet(size, args), needed)
            out.put("proxies", {**(out.get("proxies") or {}), key: scores})
    rows = []
    for size, scores in sorted((out.get("proxies") or {}).items(), key=lambda kv: int(kv[0][:-2])):
        for label, truth in truths.items():
            rows.append(dict(proxy=size, truth=label, **compare(scores, truth)))
    out.put("table", rows)
    print("| proxy size | ground truth (32 px) | archs | Kendall tau | p | top-3 precision |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['proxy']} | {r['truth']} | {r['archs']} | {r['tau']:.2f} | {r['p']:.3f} | {r['top3']}/3 |")


if __name__ == "__main__":
    main()
