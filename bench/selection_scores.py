"""Which selection score predicts the long retrain? Kendall tau and top-3 precision of each candidate score
against 30-epoch trainings (issue 33), with what each score costs.

Ground truth: the 30-epoch trainings of the 30-epoch evidence (``bench/evidence_full.py --epochs 30``, its
record ``results/evidence30/record.json``): seed 0 of every seed design and of every ranking candidate, all of
one MACs band, trained by ``nasloc train`` with the recipe. Their per-epoch histories (mean training loss and
validation top-1, read from each training's checkpoint in the work folder) give, for a rung of k epochs on the
retrain's own schedule:

- ``val@k``: the top-1 after k epochs;
- ``tse@k``: minus the sum of the k epochs' training losses (training speed estimation);
- ``extrapolated@k``: a power law fitted to the k top-1s, read at epoch 30;

and, trained here, ``complete@k``: the top-1 of a k-epoch training whose schedule ends with it (NAS-Bench-201's
reduced setting), the same recipe (``complete@10`` is read from the 10-epoch study's record, ``--complete-from``); besides, the supernet ``proxy`` of the search that proposed the arch and its
``macs``. Each score is ranked against the 30-epoch top-1 of the same archs.

Every training is resumable (``nasloc train`` resumes its folder) and its result merged into ``--out`` at once,
with the histories, so the script can be stopped and rerun; the work folder is not needed afterwards.

    nohup .venv/bin/python bench/selection_scores.py --threads 1 --jobs 2 > results/evidence30/scores.log 2>&1 &
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence_cifar import ROOT, Record, log  # noqa: E402

from nasloc.selection.scores import Curve, extrapolated, tse, val  # noqa: E402
from nasloc.supernet.ranking_check import kendall_tau, top_k_precision  # noqa: E402

RUNG_EPOCHS = (1, 2, 4, 8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--record", default=str(ROOT / "results/evidence30/record.json"), help="the 30-epoch evidence")
    p.add_argument("--work", default="/tmp/nasloc-evidence30", help="its work folder (checkpoints with histories)")
    p.add_argument("--out", default=str(ROOT / "results/evidence30/scores.json"))
    p.add_argument("--complete", default="2,4", help="k of the complete k-epoch trainings (comma list; '' = none)")
    p.add_argument("--complete-from", default=str(ROOT / "results/evidence_full/record.json"),
                   help="a record of complete trainings of the same archs and recipe at fewer epochs (the 10-epoch "
                        "study's seed 0): each epoch count found there is one more complete@k score")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=1, help="trainings at a time")
    p.add_argument("--report-only", action="store_true", help="train nothing: the table from what is recorded")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------- ground truth
def ground_truth(record: dict, epochs: int = 30) -> dict[str, dict]:
    """Seed 0 of every seed design and ranking candidate trained for ``epochs``: name -> its recorded unit."""
    units = {}
    for key, unit in record.items():
        if not isinstance(unit, dict) or unit.get("epochs") != epochs or unit.get("seed") != 0:
            continue
        match = re.fullmatch(r"[\d.]+G/(seed/(\w+)/s0|rank/(\d+))", key)
        if match:
            units[match.group(2) or f"trial{match.group(3)}"] = dict(unit, key=key)
    return units


def proxies(record: dict) -> dict[str, float]:
    """The supernet proxy top-1 of each candidate of the NSGA-II search, by ground-truth name."""
    search = next(v for k, v in record.items() if k.endswith("/search/nsga2"))
    names = {"DilateFormer": "dilateformer", "DW shortcut": "dw_shortcut", "LightViT": "lightvit", "LIFE": "life",
             "LocalViT FFN": "localvit", "plain ViT": "plain"}
    return {names.get(c["source"], f"trial{c['search_trial']}"): c["proxy_top1"] for c in search["candidates"]}


def history(work: Path, key: str) -> list[dict] | None:
    checkpoint = work / key / "last.pth"
    if not checkpoint.is_file():
        return None
    from nasloc.training.checkpoint import load_checkpoint
    return load_checkpoint(checkpoint, keys=("history",))["history"]


# ------------------------------------------------------------------------------------------- complete k-epoch runs
def train_complete(unit: dict, k: int, work: Path, threads: int, log_dir: Path) -> dict:
    """The unit's own ``nasloc train`` command with ``--epochs k`` in a folder of its own; its top-1 and costs."""
    command = shlex.split(unit["command"])
    command[0] = sys.executable
    folder = work / "complete" / f"k{k}" / unit["key"].replace("/", "-")
    command[command.index("--epochs") + 1] = str(k)
    command[command.index("--out") + 1] = str(folder)
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    with open(log_dir / f"complete-k{k}-{folder.name}.log", "a") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        _, status, usage = os.wait4(child.pid, 0)  # its own CPU time and its loaders'
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"complete k={k} of {unit['key']}: exit {os.waitstatus_to_exitcode(status)}")
    config = json.loads((folder / "export" / "config.json").read_text())["nasloc"]
    return dict(top1=config["val_top1"], wall_s=time.time() - started, cpu_s=usage.ru_utime + usage.ru_stime,
                command=" ".join(command[1:]))


# ------------------------------------------------------------------------------------------- the table
def recorded_complete(path: Path, names: list[str]) -> dict[str, dict]:
    """complete@k from another study's record (k -> name -> top-1 and CPU seconds), where it trained every one of
    ``names`` for k epochs with seed 0."""
    if not path.is_file():
        return {}
    record = json.loads(path.read_text())
    found = {}
    for k in sorted({u.get("epochs") for u in record.values() if isinstance(u, dict) and u.get("epochs")}):
        runs = ground_truth(record, epochs=k)
        if all(n in runs for n in names):
            found[str(k)] = {n: dict(top1=runs[n]["top1"], cpu_s=runs[n]["cpu_s"]) for n in names}
    return found


def score_table(record: dict, out: dict, complete_from: Path | None = None) -> list[dict]:
    """One row per score: Kendall tau and top-3 precision against the 30-epoch top-1, and CPU minutes per arch."""
    truth = ground_truth(record)
    names = [n for n in sorted(truth) if n in out.get("histories", {})]
    final = [truth[n]["top1"] for n in names]
    rows = []

    def row(score: str, values: list[float], minutes: float) -> None:
        tau, p = kendall_tau(values, final)
        rows.append(dict(score=score, archs=len(values), tau=tau, p=p, top3=top_k_precision(values, final, 3),
                         cpu_minutes_per_arch=minutes))

    curves = {n: Curve.from_history(out["histories"][n], schedule_epochs=30) for n in names}
    for k in RUNG_EPOCHS:
        minutes = sum(sum(h["seconds"] for h in out["histories"][n][:k]) for n in names) / len(names) / 60
        row(f"val@{k}", [val(curves[n].first(k)) for n in names], minutes)
        row(f"tse@{k}", [tse(curves[n].first(k)) for n in names], minutes)
        row(f"extrapolated@{k}", [extrapolated(curves[n].first(k)) for n in names], minutes)
    complete = {**(recorded_complete(complete_from, names) if complete_from else {}), **out.get("complete", {})}
    for k, runs in sorted(complete.items(), key=lambda kv: int(kv[0])):
        if all(n in runs for n in names):
            row(f"complete@{k}", [runs[n]["top1"] for n in names], sum(runs[n]["cpu_s"] for n in names) / len(names) / 60)
    proxy = proxies(record)
    if all(n in proxy for n in names):
        row("proxy", [proxy[n] for n in names], 0.0)
    row("macs", [truth[n]["macs"] for n in names], 0.0)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| score | archs | Kendall tau | p | top-3 precision | CPU-minutes per arch |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['score']} | {r['archs']} | {r['tau']:.2f} | {r['p']:.3f} | {r['top3']}/3 | "
                     f"{r['cpu_minutes_per_arch']:.1f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    record = json.loads(Path(args.record).read_text())
    out = Record(Path(args.out))
    work = Path(args.work)
    truth = ground_truth(record)
    for name, unit in truth.items():  # histories first: they need only the checkpoints
        if name not in (out.get("histories") or {}):
            found = history(work, unit["key"])
            if found is not None:
                out.put("histories", {**(out.get("histories") or {}), name: found})
    if not args.report_only:
        ks = [int(k) for k in args.complete.split(",") if k]
        pending = [(k, name) for k in ks for name in sorted(truth)]
        lock = threading.Lock()

        def worker() -> None:
            while True:
                with lock:
                    todo = [(k, n) for k, n in pending if n not in ((out.get("complete") or {}).get(str(k)) or {})
                            and out.claim(f"complete-k{k}-{n}")]
                    if not todo:
                        return
                    k, name = todo[0]
                    pending.remove((k, name))
                log(f"start complete k={k} {name}")
                result = train_complete(truth[name], k, work, args.threads, Path(args.out).parent / "logs")
                with lock:
                    complete = out.get("complete") or {}
                    complete.setdefault(str(k), {})[name] = result
                    out.put("complete", complete)
                log(f"done complete k={k} {name}: {result['top1']:.2f}")

        threads = [threading.Thread(target=worker) for _ in range(args.jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    have = len(out.get("histories") or {})
    if have < 3:
        log(f"{have} ground-truth trainings recorded so far: too few to rank (run again when more have finished)")
        return
    rows = score_table(record, out.load(), Path(args.complete_from) if args.complete_from else None)
    out.put("table", rows)
    print(markdown(rows))


if __name__ == "__main__":
    main()
