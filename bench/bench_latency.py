"""The latency table (nasloc.deploy.latency, issue 16) against end-to-end measurements on this machine.

For each space: the table is built from scratch in a fresh cache folder (timed: every part measured, then the
constant fitted on 5 archs timed end to end), then N random archs (another seed than the fit's) are predicted
and timed end to end (torch eager, inference mode, batch 1; the fastest of at least 5 runs, in 3 interleaved
rounds, as the table times its parts: see nasloc.deploy.timing.fastest_time_us). Printed per space:
parts, build time, median / 90th-percentile / largest absolute error of the prediction, and, for comparison, of a
MACs-only model (latency = a * MACs + b, least squares on the same 5 archs the constant was fitted on), and the
median error the parts leave with the constant fitted on the checked archs themselves (what the sum of parts
explains, without the drift of a shared machine's load between the fit and the check).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_latency.py                    # cifar and imagenet, 50 archs each
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_latency.py --spaces cifar --archs 20
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

import numpy as np
import torch

from nasloc.deploy.latency import FIT_ARCHS, FIT_SEED, Target, build_latency_model, measure_archs_us
from nasloc.space.flops import count
from nasloc.space.search_space import SearchSpace


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def macs_baseline(space: SearchSpace, target: Target) -> tuple[float, float]:
    """(a, b) of latency_us = a * MACs + b, least squares on the archs the table's constant is fitted on."""
    rng = random.Random(FIT_SEED)
    archs = [space.sample(rng) for _ in range(FIT_ARCHS)]
    macs = np.array([count(arch).macs for arch in archs], dtype=float)
    measured = np.array(measure_archs_us(archs, target))
    a, b = np.polyfit(macs, measured, 1)
    return float(a), float(b)


def bench_space(name: str, archs: int, seed: int, target: Target) -> dict:
    space = SearchSpace.load(name)
    with tempfile.TemporaryDirectory(prefix="nasloc-latency-bench-") as cache:
        started = time.perf_counter()
        model, table = build_latency_model(space, target, cache_dir=cache, progress=True)
        build_s = time.perf_counter() - started
    slope, intercept = macs_baseline(space, target)
    rng = random.Random(seed)
    sample = [space.sample(rng) for _ in range(archs)]
    errors, macs_errors, rows = [], [], []
    for i, (arch, measured) in enumerate(zip(sample, measure_archs_us(sample, target))):
        predicted = model.predict_us(arch)
        by_macs = slope * count(arch).macs + intercept
        errors.append(100 * abs(predicted - measured) / measured)
        macs_errors.append(100 * abs(by_macs - measured) / measured)
        rows.append((measured, predicted))
        print(f"  {name} arch {i + 1}/{archs}: measured {measured / 1000:.2f} ms, predicted {predicted / 1000:.2f} ms "
              f"({errors[-1]:.1f} %), by MACs {by_macs / 1000:.2f} ms", flush=True)
    measured_ms = [m / 1000 for m, _ in rows]
    gaps = [m - (p - model.constant_us) for m, p in rows]
    refit = statistics.median(gaps)
    refit_errors = [100 * abs(p - model.constant_us + refit - m) / m for m, p in rows]
    return dict(space=name, parts=len(table.parts), build_s=build_s, constant_us=model.constant_us,
                median=statistics.median(errors), p90=percentile(errors, 90), max=max(errors),
                macs_median=statistics.median(macs_errors), macs_p90=percentile(macs_errors, 90),
                refit_median=statistics.median(refit_errors),
                measured_ms=(min(measured_ms), max(measured_ms)), archs=archs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spaces", nargs="+", default=["cifar", "imagenet"])
    parser.add_argument("--archs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target = Target("cpu", "torch", 1)
    print(f"device: {target.device_name()}, {args.threads} thread(s), torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.2f} at start", flush=True)
    results = [bench_space(name, args.archs, args.seed, target) for name in args.spaces]
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end\n")
    print("| space | parts | table build | archs (measured ms) | median abs error | p90 | max | "
          "MACs-only model: median, p90 | constant refitted on the checked archs: median |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        lo, hi = r["measured_ms"]
        print(f"| {r['space']} | {r['parts']} | {r['build_s']:.0f} s | {r['archs']} ({lo:.1f}-{hi:.1f}) | "
              f"{r['median']:.1f} % | {r['p90']:.1f} % | {r['max']:.1f} % | {r['macs_median']:.1f} %, "
              f"{r['macs_p90']:.1f} % | {r['refit_median']:.1f} % |")


if __name__ == "__main__":
    main()
