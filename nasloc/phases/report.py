"""Phase 3: the search's tables and Pareto plot."""
from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial

from ..console import say
from ..report.pareto_plot import write_pareto_html
from ..report.tables import write_tables
from ..run import PARETO_CSV, PARETO_HTML, TRIALS_CSV, RunDir, RunOptions
from ..search.study import SEED_DESIGN_ATTR, pareto_trials


def reference_points(study: optuna.Study) -> dict[str, tuple[float, float]]:
    """Each seed mechanism alone in the space at the budget (queued first in the search), with its MACs and
    proxy top-1: the reference points of the Pareto plot."""
    return {t.user_attrs[SEED_DESIGN_ATTR]: (t.user_attrs["macs"], t.user_attrs["top1"])
            for t in study.get_trials(deepcopy=False) if SEED_DESIGN_ATTR in t.user_attrs and "top1" in t.user_attrs}


def report_phase(study: optuna.Study, options: RunOptions, run: RunDir, references: dict[str, tuple[float, float]]) -> list[FrozenTrial]:
    say(f"[nasloc] 3/6 report: {TRIALS_CSV}, {PARETO_CSV}, {PARETO_HTML}")
    write_tables(study, options.budget, run.root)
    write_pareto_html(study, options.budget, run.root, references)
    return pareto_trials(study, options.budget)
