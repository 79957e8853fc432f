"""A model family's outputs (``--budget 0.3G,0.5G,0.7G``): ``family.csv``, one row per budget, and the plot of
retrained top-1 against MACs for the exported members and every seed design retrained beside them, as
``family.html`` (plotly, beside the search's ``pareto.html`` files) and ``family.png`` (matplotlib, for papers
and READMEs)."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..fileio import atomic_path, write_atomic
from ..run import RunDir
from .pareto_plot import ensure_plotlyjs
from .tables import write_csv

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from ..selection.halving import SelectionResult
    from ..training.retrain import Retrained

FAMILY_HTML, FAMILY_PNG, PLAN_JSON = "family.html", "family.png", "plan.json"
FAMILY_COLUMNS = ("budget", "budget_macs", "design", "trial", "macs", "params", "top1", "export")


@dataclass(frozen=True)
class BudgetResult:
    """What one budget's search, selection, retrain and export gave (the run's only budget, or a member)."""

    label: str  # the budget as written on the command line ("" for a run of one budget)
    budget: float
    study: optuna.Study
    pareto: Sequence[FrozenTrial]
    selection: SelectionResult | None
    retrained: Sequence[Retrained]
    references: Mapping[str, tuple[float, float]]
    export_dir: Path | None

    @property
    def exported(self) -> Retrained | None:
        """The finalist the export holds."""
        return exported_finalist(self.retrained)


def exported_finalist(retrained: Sequence[Retrained]) -> Retrained | None:
    """The finalist a run exports: the best retrained top-1 (None when nothing was retrained)."""
    return max(retrained, key=lambda r: r.val_top1, default=None)


def family_rows(run: RunDir, results: Sequence[BudgetResult]) -> list[dict[str, Any]]:
    """One row per budget: the exported member, its MACs, params and retrained top-1, and its folder relative to the
    run folder (empty where nothing was retrained)."""
    rows = []
    for result in results:
        best = result.exported
        rows.append(dict(budget=result.label, budget_macs=int(result.budget),
                         design=best.design if best else "", trial=best.trial if best else "",
                         macs=best.macs if best else "", params=best.params if best else "",
                         top1=round(best.val_top1, 2) if best else "",
                         export=run.relative(result.export_dir) if result.export_dir else ""))
    return rows


def write_family(run: RunDir, results: Sequence[BudgetResult], planned: Mapping[str, float] | None = None,
                 took: Mapping[str, float] | None = None) -> Path:
    """``family.csv``, ``family.html`` and ``family.png`` in the run folder, and ``plan.json`` (the plan's seconds
    per phase against those taken, every budget together); returns the CSV's path."""
    path = write_csv(family_rows(run, results), run.family_csv)
    figure = family_figure(results)
    ensure_plotlyjs(run.root)
    write_atomic(run.root / FAMILY_HTML, figure.to_html(include_plotlyjs="directory", full_html=True))
    write_family_png(results, run.root / FAMILY_PNG)
    if planned and took:
        write_atomic(run.root / PLAN_JSON, json.dumps(dict(planned=planned, took=took), indent=1))
    return path


def _points(results: Sequence[BudgetResult]) -> tuple[list[tuple[str, Retrained]], dict[str, list[Retrained]]]:
    """The exported member per budget, and every seed design retrained in the run (by design name)."""
    members = [(r.label, r.exported) for r in results if r.exported is not None]
    seeds: dict[str, list[Retrained]] = {}
    for result in results:
        for finalist in result.retrained:
            if finalist.design != "searched" and finalist is not result.exported:
                seeds.setdefault(finalist.design, []).append(finalist)
    return members, seeds


def family_figure(results: Sequence[BudgetResult]) -> Any:
    """The plotly figure of ``family.html``: the family as a line through its members (labelled by budget), the
    seed designs retrained at each budget as markers, a dashed line at each budget."""
    import plotly.graph_objects as go

    members, seeds = _points(results)
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=[m.macs / 1e6 for _, m in members], y=[m.val_top1 for _, m in members], mode="lines+markers+text",
        name="the family (exports)", text=[label for label, _ in members], textposition="top center",
        marker=dict(size=12, color="#e15759"), line=dict(color="#e15759", width=2),
        customdata=[[m.design, m.trial] for _, m in members],
        hovertemplate="%{customdata[0]} (trial %{customdata[1]})<br>%{x:.2f} MMACs<br>top-1 %{y:.2f}%<extra></extra>"))
    for design, points in sorted(seeds.items()):
        fig.add_trace(go.Scatter(x=[p.macs / 1e6 for p in points], y=[p.val_top1 for p in points], mode="markers",
                                 name=f"seed design: {design}", marker=dict(size=10, symbol="diamond"),
                                 hovertemplate=f"{design}<br>%{{x:.2f}} MMACs<br>top-1 %{{y:.2f}}%<extra></extra>"))
    for result in results:
        fig.add_vline(x=result.budget / 1e6, line=dict(color="#999", dash="dash"))
    fig.update_layout(title="retrained top-1 against MACs: one export per budget, from one supernet",
                      xaxis_title="MACs per image (millions) at the deploy resolution",
                      yaxis_title="retrained top-1 (%) on the validation split", template="plotly_white",
                      legend=dict(orientation="h", yanchor="top", y=-0.15))
    return fig


def write_family_png(results: Sequence[BudgetResult], path: Path) -> Path:
    """The same plot as a PNG (matplotlib without a display), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    members, seeds = _points(results)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ax.plot([m.macs / 1e6 for _, m in members], [m.val_top1 for _, m in members], "o-", color="#e15759",
            label="the family (exports)")
    for label, member in members:
        ax.annotate(label, (member.macs / 1e6, member.val_top1), textcoords="offset points", xytext=(0, 8),
                    ha="center", fontsize=8)
    for (design, points), marker in zip(sorted(seeds.items()), "Ds^vph*"):
        ax.scatter([p.macs / 1e6 for p in points], [p.val_top1 for p in points], marker=marker, s=40,
                   label=f"seed design: {design}")
    for result in results:
        ax.axvline(result.budget / 1e6, color="#999", linestyle="--", linewidth=0.8)
    ax.set_xlabel("MACs per image (millions) at the deploy resolution")
    ax.set_ylabel("retrained top-1 (%)")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
