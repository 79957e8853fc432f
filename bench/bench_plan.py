"""Are the plan's estimates honest? Runs a few small runs through ``run_search.py`` and compares, per phase, the
seconds the plan printed at the start with the seconds the phase took (each run's ``plan.json``).

    .venv/bin/python bench/bench_plan.py --threads 2          # prints the table, writes results/plan_bench.json

Each run is a fresh run folder under ``--work`` (a rerun of the benchmark reruns the runs: resumed phases would
take less than planned). The machine's other jobs move both numbers; run it on an idle machine for the record.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = {  # name: run_search.py options besides --results-dir
    "tiny-digits": ["--budget", "1.2M", "--space", "tiny", "--supernet-epochs", "3", "--trials", "20",
                    "--select-top-k", "4", "--retrain-epochs", "4"],
    "tiny-digits-2-workers": ["--budget", "1.2M", "--space", "tiny", "--supernet-epochs", "3", "--trials", "20",
                              "--select-top-k", "4", "--retrain-epochs", "4", "--workers", "2"],
    "quick-start": ["--budget", "0.7GFLOPs"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/nasloc-bench-plan")
    p.add_argument("--out", default=str(ROOT / "results/plan_bench.json"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma list of {', '.join(RUNS)}")
    args = p.parse_args()
    rows = []
    for name in args.runs.split(","):
        results = Path(args.work) / name
        shutil.rmtree(results, ignore_errors=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        started = time.time()
        subprocess.run([sys.executable, str(ROOT / "run_search.py"), *RUNS[name], "--results-dir", str(results)],
                       check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        record = json.loads(next(results.glob("*/plan.json")).read_text())
        for phase, planned in record["planned"].items():
            took = record["took"].get(phase)
            rows.append(dict(run=name, phase=phase, planned_s=planned, took_s=took,
                             ratio=None if not planned or took is None else took / planned))
        print(f"{name}: {time.time() - started:.0f} s", flush=True)
    Path(args.out).write_text(json.dumps(dict(threads=args.threads, rows=rows), indent=1))
    print("| run | phase | planned (s) | took (s) | took / planned |\n|---|---|---|---|---|")
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        print(f"| {r['run']} | {r['phase']} | {r['planned_s']:.0f} | {r['took_s']:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
