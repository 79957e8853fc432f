"""Where the supernet's random subnets fall in the MACs band: uniform archs of the band vs sub-bands.

The sandwich rule trains the largest and the smallest arch of the band and random archs in it
(nasloc.supernet.train.SandwichSampler). Drawn uniformly over the band's archs they follow the space's
density; drawn from one of 4 equal MACs parts of the band chosen uniformly (AttentiveNAS, NASViT) they
cover the band evenly. This prints the MACs histogram of both over the band the pipeline trains in,
[max(smallest arch, 0.5 budget), budget]. Only sampling, no training: seconds.

    .venv/bin/python bench/bench_band_sampling.py                    # cifar space, 0.03 GMACs
    .venv/bin/python bench/bench_band_sampling.py --space imagenet --budget 0.7e9
"""
from __future__ import annotations

import argparse
import random
import time

import numpy as np

from nasloc.space.band import Band, search_band
from nasloc.space.flops import count
from nasloc.space.search_space import SearchSpace
from nasloc.supernet.supernet import Supernet
from nasloc.supernet.train import SandwichSampler, SupernetConfig


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", default="cifar")
    p.add_argument("--budget", type=float, default=0.03e9, help="MACs per image at the space's deploy resolution")
    p.add_argument("--draws", type=int, default=400, help="random subnets per sampler")
    p.add_argument("--bins", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def draw(supernet: Supernet, band: Band, sub_bands: int, draws: int, seed: int) -> tuple[list[int], float]:
    """MACs of ``draws`` random subnets of the sandwich sampler, and the seconds per draw."""
    sampler = SandwichSampler(supernet, band, random_subnets=1, sub_bands=sub_bands)
    rng = random.Random(seed)
    start = time.perf_counter()
    macs = [count(sampler.step(rng)[2]).macs for _ in range(draws)]
    return macs, (time.perf_counter() - start) / draws


def main() -> None:
    args = parse_args()
    space = SearchSpace.load(args.space)
    band = search_band(space, args.budget)
    supernet = Supernet(space)
    edges = np.linspace(band.lo, band.hi, args.bins + 1)
    runs = {"uniform in the band (before)": draw(supernet, band, 1, args.draws, args.seed),
            f"{SupernetConfig.sub_bands} sub-bands (now)": draw(supernet, band, SupernetConfig.sub_bands, args.draws, args.seed)}
    print(f"space {space.name}, budget {args.budget / 1e9:.4g} GMACs, band {band.lo / 1e9:.4f} - {band.hi / 1e9:.4f} GMACs, "
          f"{args.draws} random subnets each")
    names = list(runs)
    print(f"{'MACs (G)':>13} | " + " | ".join(f"{name:<28}" for name in names))
    counts = {name: np.histogram(macs, bins=edges)[0] for name, (macs, _) in runs.items()}
    for i in range(args.bins):
        cells = [f"{counts[name][i]:4d} {'#' * round(40 * counts[name][i] / args.draws):<23}" for name in names]
        print(f"{edges[i] / 1e9:.4f}-{edges[i + 1] / 1e9:.4f} | " + " | ".join(cells))
    quarters = np.linspace(band.lo, band.hi, 5)
    for name, (macs, seconds) in runs.items():
        shares = " / ".join(f"{100 * n / args.draws:.0f}" for n in np.histogram(macs, bins=quarters)[0])
        print(f"{name}: quarters of the band (low to high) {shares} %, median {np.median(macs) / 1e9:.4f} GMACs, "
              f"{1000 * seconds:.1f} ms per draw")


if __name__ == "__main__":
    main()
