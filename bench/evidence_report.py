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
    rows = [data[f"rank/{i}"] for i in range(len(proxy))]
    summary = data["rank_summary"]
    lines = [f"Kendall tau = **{summary['kendall_tau']:.2f}**, top-3 precision = **{round(3 * summary['top3_precision'])}/3** "
             f"({summary['n']} archs).", "", "| arch | GMACs | params (M) | proxy top-1 (%) | standalone top-1 (%) | locality |",
             "|---|---|---|---|---|---|"]
    for i, (row, p) in enumerate(zip(rows, proxy)):
        lines.append(f"| {i} | {row['macs'] / 1e9:.4f} | {row['params'] / 1e6:.3f} | {p:.1f} | {row['top1']:.1f} | "
                     f"{Arch.from_dict(row['arch']).describe()} |")
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
                ("Search vs seeds", seeds, "seeds_summary")]
    for title, table, needs in sections:
        print(f"### {title}\n")
        print("\n".join(table(data)) if needs in data else f"(not recorded yet: `{needs}` is missing)")
        print()


if __name__ == "__main__":
    main()
