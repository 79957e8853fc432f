"""Analytic MACs/params counter (nasloc.space.flops.count) against fvcore on the built model.

For random archs of every shipped search space (seeded), prints one line per space: the largest
relative MACs error, how many parameter counts match exactly, and the speed ratio
median(fvcore time) / median(analytic time). MACs are multiply-adds per image (fvcore's and the seed
papers' "FLOPs"), at the space's deploy resolution unless --imagenet-res says otherwise.

fvcore time is the FlopCountAnalysis of an already built model (JIT trace + count); building the
model, which the analytic counter does not need either, is timed separately and reported as a
second ratio.

    .venv/bin/python bench/bench_flops.py                              # 200 archs per space
    .venv/bin/python bench/bench_flops.py --per-space 50 --imagenet-res 64
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time

import torch

from nasloc.deploy.macs import fvcore_macs
from nasloc.models import LocalityViT
from nasloc.space.flops import count
from nasloc.space.search_space import SearchSpace

SPACES = ("tiny", "tiny_columnar", "cifar", "imagenet")


def bench_space(name: str, n: int, seed: int, img_size: int | None, repeats: int, progress: bool) -> dict:
    space = SearchSpace.load(name)
    res = img_size or space.img_size
    rng = random.Random(seed)
    errors, params_ok, analytic, fvcore, build = [], 0, [], [], []
    worst = None
    for i in range(n):
        arch = space.sample(rng)
        if res != arch.img_size:
            arch = arch.replace(img_size=res)
        t0 = time.perf_counter()
        for _ in range(repeats):
            cost = count(arch)
        analytic.append((time.perf_counter() - t0) / repeats)

        t0 = time.perf_counter()
        model = LocalityViT(arch)
        build.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        reference = fvcore_macs(model, res)
        fvcore.append(time.perf_counter() - t0)

        error = abs(cost.macs - reference) / reference
        errors.append(error)
        if worst is None or error > worst[0]:
            worst = (error, arch)
        params_ok += cost.params == sum(p.numel() for p in model.parameters())
        if progress and (i + 1) % 25 == 0:
            print(f"  {name}: {i + 1}/{n}", file=sys.stderr, flush=True)
    return dict(
        space=name, res=res, n=n, max_err=max(errors), params_ok=params_ok, worst=worst[1],
        analytic=statistics.median(analytic), fvcore=statistics.median(fvcore), build=statistics.median(build),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-space", type=int, default=200, help="random archs per space (default 200)")
    parser.add_argument("--imagenet-per-space", type=int, default=None, help="archs for the imagenet space (default: --per-space)")
    parser.add_argument("--imagenet-res", type=int, default=224, help="resolution for the imagenet space (default 224, its deploy resolution)")
    parser.add_argument("--spaces", nargs="+", default=list(SPACES), choices=SPACES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--analytic-repeats", type=int, default=20, help="count() calls per arch, averaged (it takes about a millisecond)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"# bench_flops: python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f} at start")
    print("# MACs = multiply-adds per image (1 MAC = 1 FLOP, the seeds' and fvcore's convention)")
    header = f"{'space':<14}{'res':>5}{'archs':>7}{'max rel err':>13}{'params exact':>14}{'analytic':>11}{'fvcore':>11}{'ratio':>9}{'build':>10}{'ratio+build':>13}"
    print(header)
    worst_overall = 0.0
    for name in args.spaces:
        n = args.imagenet_per_space if name == "imagenet" and args.imagenet_per_space else args.per_space
        r = bench_space(name, n, args.seed, args.imagenet_res if name == "imagenet" else None, args.analytic_repeats, args.progress)
        ratio = r["fvcore"] / r["analytic"]
        ratio_build = (r["fvcore"] + r["build"]) / r["analytic"]
        print(
            f"{r['space']:<14}{r['res']:>5}{r['n']:>7}{r['max_err']:>13.2e}{r['params_ok']:>9}/{r['n']:<4}"
            f"{r['analytic'] * 1e3:>9.3f}ms{r['fvcore'] * 1e3:>9.0f}ms{ratio:>8.0f}x{r['build'] * 1e3:>8.0f}ms{ratio_build:>12.0f}x",
            flush=True,
        )
        worst_overall = max(worst_overall, r["max_err"])
    print(f"# largest relative MACs error over all spaces: {worst_overall:.2e} (tolerance 5e-3)")


if __name__ == "__main__":
    main()
