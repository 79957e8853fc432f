"""Tables and plot of the full-scale CIFAR-10 evidence (bench/evidence_full.py), from its record.json.

    .venv/bin/python bench/evidence_full_report.py results/evidence_full/record.json [--plot results/evidence_full/accuracy_vs_macs]

Prints markdown: per budget, every design and pick (top-1 of each seed, mean, spread = half the range, MACs,
params, training time), what each nasloc pick cost (supernet + search + selection) next to training every seed
design once, the ranking study (Kendall tau and top-3 precision of the proxy and of the selection against the
recipe's top-1, and the seed-to-seed tau as the noise ceiling), and the issue's targets. Units not yet recorded
are listed as pending. With --plot: accuracy vs MACs of every design and seed as plotly HTML, and a PNG when
matplotlib is installed. Nothing is recomputed but means, spreads and Kendall tau.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence_full import DESIGNS, SAMPLERS, budget_keys, selection_order  # noqa: E402

from nasloc.supernet.ranking_check import kendall_tau, top_k_precision

PICKS = {f"nasloc_{s}": s for s in SAMPLERS}


def trainings(rec: dict, budget: str) -> dict[str, list[dict]]:
    """Design or pick name -> its recorded trainings, by seed."""
    out = {}
    for name in list(DESIGNS) + list(PICKS):
        kind, label = ("pick", PICKS[name]) if name in PICKS else ("seed", name)
        seeds = sorted(k for k in rec if k.startswith(f"{budget}/{kind}/{label}/s") and rec[k])
        out[name] = [rec[k] for k in seeds]
    return out


def seed_design_of(run: dict) -> str | None:
    """The seed design a pick's training is (``same_as`` its unit), when a seed design is the pick."""
    same = run.get("same_as", "")
    return same.split("/")[2] if "/seed/" in same else None


def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / 2 if len(values) > 1 else float("nan")


def fully_timed(run: dict) -> bool:
    """Whether a unit's wall and CPU seconds cover all its attempts (``timing_partial`` says why not)."""
    return bool(run.get("wall_s")) and not run.get("timing_partial")


def _shown_spread(values: list[float]) -> str:
    return f"{spread(values):.2f}" if len(values) > 1 else "(1 seed)"


def design_table(rec: dict, budget: str) -> list[str]:
    lines = ["| design | top-1 per seed (%) | mean (%) | spread (%) | MMACs | params (M) | minutes per training |",
             "|---|---|---|---|---|---|---|"]
    for name, runs in trainings(rec, budget).items():
        if not runs:
            lines.append(f"| {name} | pending | | | | | |")
            continue
        top1 = [r["top1"] for r in runs]
        minutes = [r["wall_s"] / 60 for r in runs if fully_timed(r)]
        shown_minutes = f"{statistics.mean(minutes):.1f}" if minutes else "n/a (timing partial)"
        shown = f"{name} (= {seed_design_of(runs[0])})" if seed_design_of(runs[0]) else name
        lines.append(f"| {shown} | {', '.join(f'{t:.2f}' for t in top1)} | {statistics.mean(top1):.2f} | "
                     f"{_shown_spread(top1)} | {runs[0]['macs'] / 1e6:.1f} | {runs[0]['params'] / 1e6:.3f} | "
                     f"{shown_minutes} |")
    return lines


def costs(rec: dict, budget: str) -> list[str]:
    lines = []
    seed_trainings = [trainings(rec, budget)[d] for d in DESIGNS]
    once = [next(r for r in runs if fully_timed(r)) for runs in seed_trainings if any(map(fully_timed, runs))]
    if once:
        lines.append(f"Training every seed design once (the user's alternative): {sum(r['wall_s'] for r in once) / 3600:.2f} h "
                     f"wall, {sum(r['cpu_s'] for r in once) / 3600:.2f} CPU-hours ({len(once)} of {len(DESIGNS)} designs "
                     "with a fully timed training).")
    for sampler in SAMPLERS:
        search = rec.get(f"{budget}/search/{sampler}")
        if not search:
            lines.append(f"nasloc {sampler}: search pending.")
            continue
        first = selection_order(search)[0]  # the selection's rank 1 by the ranking nasloc has now
        at_least = "" if fully_timed(search) else "at least "  # an attempt before the last was not timed
        # a search taken from another study (evidence_full.py --searches-from) cost what it cost there
        where = f", on {search['imported_protocol']['device']} in {search['imported_from']}" \
            if search.get("imported_from") else ""
        lines.append(f"nasloc {sampler}{where}: supernet + search + selection {at_least}{search['wall_s'] / 3600:.2f} h wall, "
                     f"{at_least}{search['cpu_s'] / 3600:.2f} CPU-hours ({search['supernet_epochs']} supernet epochs, "
                     f"{search['trials']} trials, selection of {len(search['candidates'])} candidates up to "
                     f"{search['select_epochs']} epochs); selection rank 1: {first['source']} (search trial "
                     f"{first['search_trial']}, {first['macs'] / 1e6:.1f} MMACs).")
        pick = rec.get(f"{budget}/pick/{sampler}/s0")
        if pick:
            finalists = {k: rec[k] for k in pick["finalists"]}
            shown = ", ".join(f"{k.split('/', 1)[1]} {r['top1']:.2f} %" for k, r in finalists.items())
            lines.append(f"  Its retrain step ({len(finalists)} finalists: the selection's first --retrain-top-k and "
                         f"those tied with the best, each trained once with the recipe: "
                         f"{shown}) took {sum(r['wall_s'] for r in finalists.values()) / 3600:.2f} h wall, "
                         f"{sum(r['cpu_s'] for r in finalists.values()) / 3600:.2f} CPU-hours; the pick is the best: "
                         f"{pick['pick_source']} (search trial {pick['pick_trial']}, {pick['macs'] / 1e6:.1f} MMACs).")
    return lines


def candidate_seeds(rec: dict, budget: str, candidate: dict) -> list[float]:
    """A selection candidate's recipe top-1 per seed (seed 0 first): its seed units when it is a seed design, else
    its ranking units (``rank/<trial>``, ``rank/<trial>/s1``, ...); stops at the first seed not recorded."""
    design = next((d for d, label in DESIGNS.items() if label == candidate["source"]), None)
    base = f"{budget}/rank/{candidate['search_trial']}"
    top1 = []
    for k in itertools.count():
        key = f"{budget}/seed/{design}/s{k}" if design else (base if k == 0 else f"{base}/s{k}")
        if not rec.get(key):
            return top1
        top1.append(rec[key]["top1"])


def ranking(rec: dict, budget: str) -> list[str]:
    """The NSGA-II run's selection candidates, each trained with the recipe (seed 0; more seeds where recorded)."""
    search = rec.get(f"{budget}/search/nsga2")
    if not search:
        return ["Ranking: pending (the NSGA-II search)."]
    now = {c["source"]: rank for rank, c in enumerate(selection_order(search), 1)}  # the ranking nasloc has now
    rows = [(dict(c, rank_now=now[c["source"]]), seeds) for c in search["candidates"]
            if (seeds := candidate_seeds(rec, budget, c))]
    lines = [f"Ranking: {len(rows)} of {len(search['candidates'])} candidates trained."]
    lines += _taus(rows, lambda seeds: seeds[0], "seed 0's top-1")
    pairs = [(runs[0]["top1"], runs[1]["top1"]) for runs in trainings(rec, budget).values() if len(runs) > 1]
    if len(pairs) >= 3:
        tau, _ = kendall_tau(*zip(*pairs))
        lines.append(f"- seed 0 vs seed 1 of the {len(pairs)} designs and picks (noise ceiling): Kendall tau {tau:.2f}")
    twice = [(c, seeds) for c, seeds in rows if len(seeds) > 1]
    if len(twice) >= 3:
        # the candidates lie in one MACs band, closer together than the designs: their own noise ceiling
        tau, p = kendall_tau([s[0] for _, s in twice], [s[1] for _, s in twice])
        lines.append(f"- seed 0 vs seed 1 of the {len(twice)} candidates trained twice (the noise ceiling of this "
                     f"ranking): Kendall tau {tau:.2f} (p {p:.2f})")
        lines += _taus(twice, statistics.mean, "the mean of their seeds")
    lines += ["", "| source | search trial | MMACs | proxy top-1 (%) | selection rank as run | selection rank now | "
              "recipe top-1 per seed (%) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {c['source']} | {c['search_trial']} | {c['macs'] / 1e6:.1f} | {c['proxy_top1']:.2f} | {c['rank']} | "
              f"{c['rank_now']} | {', '.join(f'{t:.2f}' for t in seeds)} |" for c, seeds in sorted(rows, key=lambda r: -r[1][0])]
    return lines


def _taus(rows: list[tuple[dict, list[float]]], truth, against: str) -> list[str]:
    """Kendall tau and top-3 precision of the proxy and of the selection against ``truth`` of each row's seeds."""
    if len(rows) < 3:
        return []
    real = [truth(seeds) for _, seeds in rows]
    lines = []
    for name, score in (("proxy (supernet top-1)", [c["proxy_top1"] for c, _ in rows]),
                        ("selection (rank as run)", [-c["rank"] for c, _ in rows]),
                        ("selection (rank now: by score)", [-c["rank_now"] for c, _ in rows])):
        tau, p = kendall_tau(score, real)
        lines.append(f"- {name} against {against} ({len(rows)} candidates): Kendall tau {tau:.2f} (p {p:.2f}), "
                     f"top-3 precision {top_k_precision(score, real, 3)}/3")
    return lines


def targets(rec: dict, budget: str) -> list[str]:
    runs = trainings(rec, budget)
    seeds = {d: [r["top1"] for r in runs[d]] for d in DESIGNS if runs[d]}
    lines = []
    for pick in PICKS:
        if not runs[pick] or len(seeds) < len(DESIGNS):
            lines.append(f"- {pick}: pending")
            continue
        mean = statistics.mean(r["top1"] for r in runs[pick])
        best = max(seeds, key=lambda d: statistics.mean(seeds[d]))
        margin = mean - statistics.mean(seeds[best])
        noise = max((spread(v) for v in seeds.values() if len(v) > 1), default=float("nan"))
        itself = seed_design_of(runs[pick][0])
        own = spread([r["top1"] for r in runs[pick]])
        own = 0.0 if math.isnan(own) else own  # one seed: no spread of its own yet
        # each design by the larger of its spread and the pick's
        each = all(mean - statistics.mean(v) > max(spread(v), own) for v in seeds.values())
        lines.append(f"- {pick}: mean {mean:.2f} % over {len(runs[pick])} seed(s)"
                     f"{f' (the seed design {itself} itself)' if itself else ''}, "
                     f"{margin:+.2f} points over the best seed design ({best}); beats every seed design by more "
                     f"than the largest seed spread ({noise:.2f}): {'yes' if margin > noise else 'no'}; by more than "
                     f"each one's own spread and the pick's ({own:.2f}): {'yes' if each else 'no'}; "
                     f">= 75 %: {'yes' if mean >= 75 else 'no'}")
    return lines


def plot(rec: dict, budgets: list[str], path: Path) -> list[Path]:
    protocol = rec["protocol"]
    title = f"CIFAR-10, {protocol['epochs']} epochs on {protocol['device']}: seed designs and nasloc picks"
    points = [(budget, name, run["macs"] / 1e6, run["top1"], run["seed"])
              for budget in budgets for name, runs in trainings(rec, budget).items() for run in runs]
    import plotly.graph_objects as go
    fig = go.Figure()
    for name in list(DESIGNS) + list(PICKS):
        mine = [p for p in points if p[1] == name]
        fig.add_trace(go.Scatter(x=[p[2] for p in mine], y=[p[3] for p in mine], mode="markers", name=name,
                                 marker=dict(symbol="star" if name in PICKS else "circle", size=12 if name in PICKS else 8),
                                 text=[f"{p[0]} seed {p[4]}" for p in mine]))
    fig.update_layout(title=f"{title} (bench/evidence_full.py)", xaxis_title="MMACs per image (32 px)",
                      yaxis_title="val top-1 (%)")
    written = [path.with_suffix(".html")]
    fig.write_html(written[0], include_plotlyjs="cdn")  # 12 KB instead of 4.8 MB in git; the browser fetches plotly.js
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no PNG: pip install matplotlib)", file=sys.stderr)
        return written
    fig2, ax = plt.subplots(figsize=(7, 4.5))
    for name in list(DESIGNS) + list(PICKS):
        mine = [p for p in points if p[1] == name]
        ax.scatter([p[2] for p in mine], [p[3] for p in mine], label=name, marker="*" if name in PICKS else "o",
                   s=120 if name in PICKS else 30)
    ax.set_xlabel("MMACs per image (32 px)")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower left")  # the picks sit at the left, the designs at the budget on the right
    fig2.tight_layout()
    written.append(path.with_suffix(".png"))
    fig2.savefig(written[1], dpi=110)
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("record", type=Path)
    p.add_argument("--plot", type=Path, help="path stem of the HTML and PNG plot")
    args = p.parse_args()
    rec = {k: v for k, v in json.loads(args.record.read_text()).items() if v is not None}
    protocol = rec["protocol"]
    budgets = budget_keys(protocol["budgets"])
    print(f"Protocol: {protocol['epochs']} epochs, batch {protocol['batch_size']}, lr {protocol['lr']} per 512, "
          f"{protocol['seeds']} seeds, device {protocol['device']}\n")
    for budget in budgets:
        print(f"### {budget}MACs\n")
        for section in (design_table, costs, ranking, targets):
            print("\n".join(section(rec, budget)) + "\n")
    if args.plot:
        print("plot: " + ", ".join(str(p) for p in plot(rec, budgets, args.plot)))


if __name__ == "__main__":
    main()
