"""Markdown tables of a CIFAR-10 evidence run (bench/evidence_cifar.py), read from its evidence.json.

    .venv/bin/python bench/evidence_report.py results/evidence/evidence.json

Prints the ranking study, the search efficiency (hypervolume after every 10 trials) and the seed
designs vs the searched archs; every number comes from the file, nothing is recomputed but means,
spreads and Kendall tau.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from scipy.stats import kendalltau

from nasloc.arch import Arch


def ranking(data: dict) -> list[str]:
    proxy = data["proxy/rank"]
    summary = data["rank_summary"]
    seeds = summary.get("standalone_seeds", 1)
    runs = [[data[f"rank/{i}" if seed == 0 else f"rank/{i}|{seed}"] for seed in range(seeds)] for i in range(len(proxy))]
    lines = [f"Kendall tau (proxy vs mean standalone top-1) = **{summary['kendall_tau']:.2f}**, top-3 precision = "
             f"**{round(3 * summary['top3_precision'])}/3** ({summary['n']} archs, {seeds} standalone training(s) each)."]
    if "standalone_seed_tau" in summary:
        lines.append(f"Kendall tau between two standalone trainings (seeds 0 and 1) of the same archs: "
                     f"**{summary['standalone_seed_tau']:.2f}**.")
    lines += ["", "| arch | GMACs | params (M) | proxy top-1 (%) | standalone top-1 per seed (%) | locality |", "|---|---|---|---|---|---|"]
    for i, (rows, p) in enumerate(zip(runs, proxy)):
        per_seed = ", ".join(f"{r['top1']:.1f}" for r in rows)
        lines.append(f"| {i} | {rows[0]['macs'] / 1e9:.4f} | {rows[0]['params'] / 1e6:.3f} | {p:.1f} | {per_seed} | "
                     f"{Arch.from_dict(rows[0]['arch']).describe()} |")
    return lines


def search_efficiency(data: dict) -> list[str]:
    search = data["search"]
    trials = max(len(s["hypervolume"]) for s in search.values())
    marks = list(range(10, trials + 1, 10))
    lines = ["| sampler | trials evaluated (within budget) | " + " | ".join(f"HV after {m}" for m in marks) + " | best proxy top-1 (%) |",
             "|---|---|" + "---|" * len(marks) + "---|"]
    for name, s in search.items():
        curve = s["hypervolume"]
        lines.append(f"| {name} | {s['evaluated']} / {len(curve)} | " + " | ".join(f"{curve[m - 1]:.4f}" for m in marks)
                     + f" | {s['best']['proxy_top1']:.1f} |")
    return lines


def seeds(data: dict) -> list[str]:
    runs: dict[str, list[dict]] = {}
    for key, row in data.items():
        if key.startswith("seeds/"):
            runs.setdefault(key[len("seeds/"):].rsplit("|", 1)[0], []).append(row)
    proxy = data.get("proxy/seeds", {})
    lines = ["| design | GMACs | params (M) | proxy top-1 (%) | val top-1 per seed (%) | mean ± half-range (%) | locality |",
             "|---|---|---|---|---|---|---|"]
    order = sorted(runs, key=lambda name: -statistics.mean(r["top1"] for r in runs[name]))
    for name in order:
        rows = sorted(runs[name], key=lambda r: r["seed"])
        top1 = [r["top1"] for r in rows]
        cell = f"{proxy[name]:.1f}" if name in proxy else "-"
        lines.append(f"| {name} | {rows[0]['macs'] / 1e9:.4f} | {rows[0]['params'] / 1e6:.3f} | {cell} | "
                     f"{', '.join(f'{t:.1f}' for t in top1)} | **{statistics.mean(top1):.1f}** ± {(max(top1) - min(top1)) / 2:.1f} | "
                     f"{Arch.from_dict(rows[0]['arch']).describe()} |")
    shared = [name for name in order if name in proxy]
    if len(shared) > 2:
        tau = kendalltau([proxy[n] for n in shared], [statistics.mean(r["top1"] for r in runs[n]) for n in shared]).statistic
        lines += ["", f"Kendall tau between proxy top-1 and mean retrained top-1 over these {len(shared)} designs: **{tau:.2f}**."]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("evidence", type=Path, help="evidence.json of bench/evidence_cifar.py")
    data = json.loads(p.parse_args().evidence.read_text())
    sections = [("Ranking quality", ranking, "rank_summary"), ("Search efficiency", search_efficiency, "search"),
                ("Search vs seeds", seeds, "proxy/seeds")]
    for title, table, needs in sections:
        print(f"### {title}\n")
        print("\n".join(table(data)) if needs in data else f"(not recorded yet: `{needs}` is missing)")
        print()


if __name__ == "__main__":
    main()
