"""Phase 3: the search's tables and Pareto plot; at the end of the run, the plot again with the selection, the
retrained finalists and the exported arch."""
from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial

from ..arch_view import arch_svg
from ..console import say
from ..report.family import exported_finalist
from ..report.pareto_plot import write_pareto_html
from ..report.tables import write_tables
from ..run import PARETO_CSV, PARETO_HTML, TRIALS_CSV, RunDir, RunOptions
from ..search.study import SEED_DESIGN_ATTR, pareto_trials
from ..selection.halving import SelectionResult
from ..training.retrain import Retrained


def reference_points(study: optuna.Study) -> dict[str, tuple[float, float]]:
    """Each seed mechanism alone in the space at the budget (queued first in the search), with its MACs and
    proxy top-1: the reference points of the Pareto plot."""
    return {t.user_attrs[SEED_DESIGN_ATTR]: (t.user_attrs["macs"], t.user_attrs["top1"])
            for t in study.get_trials(deepcopy=False) if SEED_DESIGN_ATTR in t.user_attrs and "top1" in t.user_attrs}


def report_phase(study: optuna.Study, options: RunOptions, run: RunDir, references: dict[str, tuple[float, float]]) -> list[FrozenTrial]:
    say(f"[nasloc] 3/6 report: {TRIALS_CSV}, {PARETO_CSV}, {PARETO_HTML}")
    write_tables(study, options.budget, run.home)
    write_pareto_html(study, options.budget, run.home, references, bundle_dir=run.root)
    return pareto_trials(study, options.budget)


def final_report(study: optuna.Study, options: RunOptions, run: RunDir, references: dict[str, tuple[float, float]],
                 selection: SelectionResult | None, retrained: list[Retrained]) -> None:
    """The Pareto plot again, with the selection's candidates (their score at every rung), the retrained finalists
    and the picture of the export."""
    selected = {}
    if selection is not None:
        for t in selection.study.get_trials(deepcopy=False):
            scores = ", ".join(f"{epochs} ep {value:.2f}" for epochs, value in sorted(t.intermediate_values.items()))
            selected[t.user_attrs["search_trial"]] = f"{t.user_attrs['source']}: {scores or 'not trained'}"
    best = exported_finalist(retrained)
    picture = None if best is None else arch_svg(best.model.arch, f"search trial {best.trial} ({best.design})")
    write_pareto_html(study, options.budget, run.home, references, selected=selected,
                      retrained={r.trial: r.val_top1 for r in retrained}, picture=picture, bundle_dir=run.root)
