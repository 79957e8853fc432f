"""Training-step cost of running a subnet inside the supernet vs its extracted standalone model.

For each space, sampled archs (seeded) are run both ways on the same batch: forward, cross-entropy,
backward and an AdamW step (each side has its own optimizer over its own parameters). The two steps
alternate (which goes first flips every iteration, so drift in machine load hits both alike); after
warm-up steps the median of ``--steps`` steps is taken and the ratio supernet / standalone printed
(target <= 1.15x).

Memory: parameter memory of the supernet vs the largest subnet of the space (what weight sharing
costs), and, with --rss, the peak RSS of two fresh processes that each build one model (supernet /
largest standalone subnet) and run training steps on the largest arch.

    .venv/bin/python bench/bench_supernet_step.py
    .venv/bin/python bench/bench_supernet_step.py --spaces cifar --archs 3 --steps 30 --rss
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from nasloc.space.flops import count
from nasloc.space.search_space import SearchSpace
from nasloc.supernet.supernet import Supernet

SPACES = ("cifar", "tiny")


def _step(forward, params_optimizer, x, y) -> float:
    model_call, optimizer = forward, params_optimizer
    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model_call(x), y)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - t0


def bench_arch(supernet: Supernet, arch, batch: int, steps: int, warmup: int, seed: int) -> dict:
    torch.manual_seed(seed)
    model = supernet.extract(arch).train()
    supernet.train()
    opt_super = torch.optim.AdamW(supernet.parameters(), lr=1e-4, weight_decay=0.05)
    opt_alone = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    x = torch.randn(batch, 3, supernet.img_size, supernet.img_size)
    y = torch.randint(0, arch.num_classes, (batch,))
    run_super = lambda inputs: supernet(inputs, arch)  # noqa: E731
    times_super, times_alone = [], []
    for i in range(warmup + steps):
        order = [("super", run_super, opt_super), ("alone", model, opt_alone)]
        if i % 2:
            order.reverse()
        for kind, fn, opt in order:
            t = _step(fn, opt, x, y)
            if i >= warmup:
                (times_super if kind == "super" else times_alone).append(t)
    return dict(super=statistics.median(times_super), alone=statistics.median(times_alone))


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _rss_child(kind: str, space_name: str, batch: int) -> None:
    """Child process: build one model, run 3 training steps on the largest arch, print peak RSS."""
    space = SearchSpace.load(space_name)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    largest = space.extreme(largest=True)
    if kind == "supernet":
        supernet = Supernet(space)
        params, run = supernet.parameters(), (lambda inputs: supernet(inputs, largest))
        module = supernet
    else:
        from nasloc.models import LocalityViT

        module = LocalityViT(largest)
        params, run = module.parameters(), module
    module.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(batch, 3, space.img_size, space.img_size)
    y = torch.randint(0, largest.num_classes, (batch,))
    for _ in range(3):
        _step(run, optimizer, x, y)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(dict(kind=kind, base_kb=base, peak_kb=peak)))


def _rss(space_name: str, batch: int) -> dict[str, dict]:
    out = {}
    for kind in ("supernet", "largest"):
        command = [sys.executable, __file__, "--_rss-child", kind, "--spaces", space_name, "--batch", str(batch)]
        command += ["--threads", str(torch.get_num_threads())]
        proc = subprocess.run(command, capture_output=True, text=True, check=True)
        out[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spaces", nargs="+", default=list(SPACES))
    parser.add_argument("--archs", type=int, default=3, help="sampled archs per space (default 3)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per arch and side (default 20)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 is far steadier on a machine shared with other jobs")
    parser.add_argument("--rss", action="store_true", help="also measure peak RSS in two fresh processes per space")
    parser.add_argument("--_rss-child", dest="rss_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        _rss_child(args.rss_child, args.spaces[0], args.batch)
        return

    print(f"# bench_supernet_step: python {platform.python_version()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f} at start")
    print(f"# step = forward + cross-entropy + backward + AdamW step, batch {args.batch}, median of {args.steps} "
          f"interleaved steps after {args.warmup} warm-up steps")
    ratios_all = []
    for name in args.spaces:
        space = SearchSpace.load(name)
        supernet = Supernet(space)
        rng = random.Random(args.seed)
        print(f"\n## {name} ({supernet.img_size} px)")
        print(f"{'arch':<6}{'GMACs':>9}{'params':>10}{'supernet':>11}{'standalone':>12}{'ratio':>8}")
        ratios = []
        for i in range(args.archs):
            arch = space.sample(rng)
            cost = count(arch)
            r = bench_arch(supernet, arch, args.batch, args.steps, args.warmup, args.seed + i)
            ratio = r["super"] / r["alone"]
            ratios.append(ratio)
            print(f"{i:<6}{cost.macs / 1e9:>9.4f}{cost.params / 1e6:>9.3f}M{r['super'] * 1e3:>9.1f}ms{r['alone'] * 1e3:>10.1f}ms{ratio:>7.3f}x", flush=True)
        ratios_all += ratios
        print(f"median ratio over {len(ratios)} archs: {statistics.median(ratios):.3f}x (target <= 1.15x)")
        largest = space.extreme(largest=True)
        super_bytes, largest_bytes = _param_bytes(supernet), count(largest).params * 4
        print(f"parameter memory: supernet {super_bytes / 2**20:.2f} MiB, largest subnet {largest_bytes / 2**20:.2f} MiB "
              f"({super_bytes / largest_bytes:.3f}x)")
        if args.rss:
            rss = _rss(name, args.batch)
            s, l = rss["supernet"], rss["largest"]
            print(f"peak RSS, 3 training steps of the largest arch (fresh process; after imports): "
                  f"supernet {s['peak_kb'] / 1024:.0f} MiB ({(s['peak_kb'] - s['base_kb']) / 1024:.0f} MiB above imports), "
                  f"largest standalone {l['peak_kb'] / 1024:.0f} MiB ({(l['peak_kb'] - l['base_kb']) / 1024:.0f} MiB above imports)")
        del supernet
    print(f"\n# median ratio over all archs: {statistics.median(ratios_all):.3f}x")


if __name__ == "__main__":
    main()
