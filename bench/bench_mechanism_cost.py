"""What each locality mechanism of one arch costs in a training step, against what it adds to the MACs
(issue 19): the arch's step next to the same arch with one mechanism switched to its plain form, and
with all of them switched, the steps interleaved in one process.

A mechanism that costs a larger share of the step than of the MACs is where speed work pays. Shares are
(t_arch - t_without) / t_arch and (MACs_arch - MACs_without) / MACs_arch; each time is the median over
``--steps`` rounds (forward, backward, AdamW step at 32 px), beside whatever else runs on the machine,
so only differences within one run mean something.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_mechanism_cost.py                   # the CIFAR LightViT arch
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_mechanism_cost.py --arch "every mechanism"
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_mechanism_cost.py --arch results/evidence/exports/nasloc_random
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_official import CLOCKS, every_mechanism_arch, model_arch, race, train_step  # noqa: E402

from nasloc.arch import Arch
from nasloc.models import LocalityViT
from nasloc.space.flops import count
from nasloc.space.search_space import SearchSpace
from nasloc.space.seed_designs import reference_archs


def _blocks(arch: Arch, **changes) -> Arch:
    """Every block of the arch with ``changes``."""
    return arch.replace(stages=tuple(
        dataclasses.replace(s, blocks=tuple(dataclasses.replace(b, **changes) for b in s.blocks)) for s in arch.stages))


# each switch turns one mechanism of an arch back into the plain ViT's form
SWITCHES: dict[str, Callable[[Arch], Arch]] = {
    "global tokens": lambda a: a.replace(global_tokens=0),
    "BiDim FFN": lambda a: a.replace(ffn="mlp"),
    "conv stem": lambda a: a.replace(stem="patch"),
    "local mixers (window, dilated)": lambda a: _blocks(a, mixer="global", dilations=()),
    "LIFE qkv": lambda a: _blocks(a, life=False),
    "FFN conv": lambda a: _blocks(a, ffn_kernel=0),
    "DW shortcuts": lambda a: a.replace(shortcuts=()),
    "CPE": lambda a: a.replace(cpe=False),
}


def variants(arch: Arch) -> dict[str, Arch]:
    """The arch, each switch that changes it, and all of those switches together."""
    out = {"arch": arch}
    plain = arch
    for name, switch in SWITCHES.items():
        if switch(arch) != arch:
            out[f"without {name}"] = switch(arch)
            plain = switch(plain)
    out["all plain"] = plain
    return out


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="LightViT",
                   help="a reference arch of search_spaces/cifar.yaml at --budget, 'every mechanism', or any "
                        "model that nasloc train --model takes (an export folder, an arch JSON)")
    p.add_argument("--budget", type=float, default=0.03e9)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="as in bench_official.py")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    space = SearchSpace.load("cifar")
    archs = {"every mechanism": every_mechanism_arch(space), **reference_archs(space, args.budget)}
    arch = archs[args.arch] if args.arch in archs else model_arch(args.arch, "--arch", list(archs))[1]
    models = variants(arch)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    steps = {name: train_step(LocalityViT(arch), x, y) for name, arch in models.items()}
    times = race(steps, args.steps, args.warmup, args.clock)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, {args.threads} thread(s), load average "
          f"{os.getloadavg()[0]:.1f}, {args.clock} clock; {args.arch}, batch {args.batch} at 32 px, median of {args.steps} rounds\n")
    print("| model | ms per step | MMACs | share of the step | share of the MACs |")
    print("|---|---|---|---|---|")
    t_arch, m_arch = statistics.median(times["arch"]), count(models["arch"]).macs
    for name, arch in models.items():
        t, m = statistics.median(times[name]), count(arch).macs
        shares = "| | " if name == "arch" else f"| {(t_arch - t) / t_arch:.0%} | {(m_arch - m) / m_arch:.0%} "
        print(f"| {name} | {1e3 * t:.0f} | {m / 1e6:.1f} {shares}|")


if __name__ == "__main__":
    main()
