"""The search's tables, read back from its Optuna study: ``trials.csv`` and ``pareto.csv``; any rows as CSV."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import optuna
from optuna.trial import FrozenTrial

from ..fileio import write_atomic
from ..run import PARETO_CSV, TRIALS_CSV
from ..search.objective import LATENCY_CONSTRAINT
from ..search.study import pareto_trials

if TYPE_CHECKING:
    pass


COLUMNS = (
    "number", "state", "top1", "macs", "gmacs", "params", "mparams", "latency", "feasible", "evaluated",
    "pareto", "datetime_start", "datetime_complete", "duration_seconds", "eval_seconds", "fail_reason", "arch_json",
)


def _within_latency_budget(trial: FrozenTrial) -> bool:
    return trial.constraints.get(LATENCY_CONSTRAINT, 0.0) <= 0  # no latency budget: no such constraint


def trial_rows(study: optuna.Study, budget_macs: float) -> list[dict[str, Any]]:
    """One row per trial (every state), by trial number; empty cells for what a trial doesn't have.

    ``top1`` is empty for trials that were not evaluated (over budget, or failed): it was not measured,
    whatever pessimistic value the sampler was told. ``feasible`` is against ``budget_macs`` and, under a
    latency budget, against that one too (the trial's latency constraint).
    """
    on_front = {t.number for t in pareto_trials(study, budget_macs)}
    rows = []
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        attrs = trial.user_attrs
        macs, params = attrs.get("macs"), attrs.get("params")
        start, end = trial.datetime_start, trial.datetime_complete
        rows.append({
            "number": trial.number,
            "state": trial.state.name,
            "top1": attrs.get("top1"),
            "macs": macs,
            "gmacs": None if macs is None else macs / 1e9,
            "params": params,
            "mparams": None if params is None else params / 1e6,
            "latency": attrs.get("latency"),
            "feasible": None if macs is None else macs <= budget_macs and _within_latency_budget(trial),
            "evaluated": attrs.get("evaluated"),
            "pareto": trial.number in on_front,
            "datetime_start": None if start is None else start.isoformat(sep=" ", timespec="seconds"),
            "datetime_complete": None if end is None else end.isoformat(sep=" ", timespec="seconds"),
            "duration_seconds": None if start is None or end is None else (end - start).total_seconds(),
            "eval_seconds": attrs.get("eval_seconds"),
            "fail_reason": attrs.get("fail_reason"),
            "arch_json": attrs.get("arch_json"),
        })
    return rows


def write_tables(study: optuna.Study, budget_macs: float, out_dir: str | Path) -> tuple[Path, Path]:
    """``trials.csv`` (every trial) and ``pareto.csv`` (the feasible Pareto front, by increasing MACs)."""
    out_dir = Path(out_dir)
    rows = trial_rows(study, budget_macs)
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["macs"])
    trials_csv, pareto_csv = out_dir / TRIALS_CSV, out_dir / PARETO_CSV
    write_atomic(trials_csv, _csv_text(rows))
    write_atomic(pareto_csv, _csv_text(front))
    return trials_csv, pareto_csv


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """Rows of equal keys (e.g. :func:`nasloc.selection.study.selection_rows`) as one CSV file."""
    write_atomic(path, _csv_text(rows, list(rows[0]) if rows else []))
    return path


def _csv_text(rows: list[dict[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    return buffer.getvalue()


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.10g}"
    return value
