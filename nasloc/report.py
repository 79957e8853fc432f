"""Results of a search from its Optuna study: trial and Pareto tables (CSV), an interactive Pareto plot, the
run's summary, and optuna-dashboard served live.

Everything is read back from the study (user attributes left by :class:`nasloc.search.Objective` or the Ray
backend), so a report can be rebuilt at any time, while the search runs or long after, from the storage alone.
Files are written atomically (temporary file + rename): a browser or a spreadsheet never sees half a file.

MACs follow the seed papers and fvcore: one multiply-add is one FLOP, per image at the space's deploy
resolution. Top-1 is the proxy accuracy with inherited supernet weights, not a retrained accuracy.
"""
from __future__ import annotations

import csv
import io
import math
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from .arch import Arch
from .errors import NaslocError
from .fileio import write_atomic
from .run import PARETO_CSV, PARETO_HTML, TRIALS_CSV, RunDir, RunRecord
from .search import LATENCY_CONSTRAINT, SEED_DESIGN_ATTR, evaluated_feasible_trials, pareto_trials
from .units import format_macs

if TYPE_CHECKING:
    from .pipeline import Retrained
    from .selection import SelectionResult
    from .space import SearchSpace

MACS_AXIS = "MACs (1 multiply-add = 1 FLOP)"
COLUMNS = (
    "number", "state", "top1", "macs", "gmacs", "params", "mparams", "latency", "feasible", "evaluated",
    "pareto", "datetime_start", "datetime_complete", "duration_seconds", "eval_seconds", "fail_reason", "arch_json",
)


# ------------------------------------------------------------------------------------------- tables
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
    """Rows of equal keys (e.g. :func:`nasloc.selection.selection_rows`) as one CSV file."""
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


# ------------------------------------------------------------------------------------------- plot
def _axis_scale(budget_macs: float) -> tuple[float, str]:
    for scale, unit in ((1e9, "billions"), (1e6, "millions"), (1e3, "thousands")):
        if budget_macs >= scale / 10:
            return scale, unit
    return 1.0, "per image"


def pareto_figure(study: optuna.Study, budget_macs: float,
                  references: Mapping[str, tuple[float, float | None]] | None = None) -> Any:
    """The plotly figure of :func:`write_pareto_html`."""
    import plotly.graph_objects as go

    scale, unit = _axis_scale(budget_macs)
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "macs" in t.user_attrs]
    evaluated = [t for t in trials if t.user_attrs.get("top1") is not None]
    feasible = [t for t in evaluated if t.user_attrs["macs"] <= budget_macs]
    over = [t for t in evaluated if t.user_attrs["macs"] > budget_macs]  # only with a budget tighter than the search's
    skipped = [t for t in trials if t.user_attrs.get("top1") is None]
    front = pareto_trials(study, budget_macs)
    references = dict(references or {})

    tops = [t.user_attrs["top1"] for t in evaluated]
    tops += [top1 for _, top1 in references.values() if top1 is not None and math.isfinite(top1)]
    low, high = (min(tops), max(tops)) if tops else (0.0, 100.0)
    pad = max((high - low) * 0.08, 0.5)
    floor = low - pad  # where archs that were never evaluated are drawn

    def scatter(group: list[FrozenTrial], name: str, color: str, symbol: str, y_floor: bool = False, **kw: Any) -> Any:
        return go.Scatter(
            x=[t.user_attrs["macs"] / scale for t in group],
            y=[floor if y_floor else t.user_attrs["top1"] for t in group],
            mode=kw.pop("mode", "markers"),
            name=name,
            marker=dict(color=color, symbol=symbol, size=kw.pop("size", 8), line=dict(width=0.5, color="#333")),
            customdata=[[t.number, format_macs(t.user_attrs["macs"]), t.user_attrs.get("params", 0) / 1e6,
                         "not evaluated" if y_floor else f"{t.user_attrs['top1']:.2f}%"] for t in group],
            hovertemplate="trial %{customdata[0]}<br>top-1 %{customdata[3]}<br>%{customdata[1]}"
                          "<br>%{customdata[2]:.3f} M params<extra>%{fullData.name}</extra>",
            **kw,
        )

    fig = go.Figure()
    if skipped:
        fig.add_trace(scatter(skipped, f"over budget, not evaluated ({len(skipped)}; drawn at the bottom)",
                              "#b0b0b0", "x-thin-open", y_floor=True))
    if over:
        fig.add_trace(scatter(over, f"over budget ({len(over)})", "#f28e2b", "circle"))
    if feasible:
        fig.add_trace(scatter(feasible, f"within budget ({len(feasible)})", "#4e79a7", "circle"))
    if front:
        fig.add_trace(scatter(front, f"Pareto front ({len(front)})", "#e15759", "circle", mode="lines+markers",
                              size=10, line=dict(color="#e15759", width=2, shape="hv")))
    for name, (macs, top1) in references.items():
        if top1 is None or not math.isfinite(top1):
            fig.add_vline(x=macs / scale, line=dict(color="#59a14f", dash="dot"),
                          annotation_text=f"{name} (not evaluated)", annotation_position="bottom right")
            continue
        fig.add_trace(go.Scatter(
            x=[macs / scale], y=[top1], mode="markers+text", name=name, text=[name], textposition="top center",
            marker=dict(color="#59a14f", symbol="diamond", size=12, line=dict(width=1, color="#333")),
            hovertemplate=f"{name}<br>top-1 %{{y:.2f}}%<br>{format_macs(macs)}<extra>reference</extra>",
        ))
    fig.add_vline(x=budget_macs / scale, line=dict(color="#333", dash="dash"),
                  annotation_text=f"budget {format_macs(budget_macs)}", annotation_position="top left")
    n_all = len(study.get_trials(deepcopy=False))
    fig.update_layout(
        title=f"{study.study_name}: {n_all} trials, {len(feasible)} evaluated within budget, "
              f"{len(front)} on the Pareto front; budget {format_macs(budget_macs)}",
        xaxis_title=f"{MACS_AXIS}, {unit} per image",
        yaxis_title="proxy top-1 accuracy (%), supernet weights",
        template="plotly_white",
        legend=dict(orientation="h", yanchor="top", y=-0.15),
        hovermode="closest",
    )
    fig.update_yaxes(range=[floor - pad / 2, high + pad])
    return fig


def write_pareto_html(
    study: optuna.Study,
    budget_macs: float,
    out_dir: str | Path,
    references: Mapping[str, tuple[float, float | None]] | None = None,
    *,
    filename: str = PARETO_HTML,
    plotlyjs: str = "directory",
) -> Path:
    """An interactive Pareto plot: every trial (within / over budget), the feasible front as a staircase,
    the budget as a vertical line and labelled reference points ``name -> (macs, top1)`` (e.g. the seed
    presets evaluated by the caller; top1 None draws a vertical line only).

    ``plotlyjs='directory'`` (default) writes a ~12 KB HTML file that loads ``plotly.min.js`` from the same
    folder, where it is written once (4.8 MB) and shared by every plot there: rewriting the plot during a
    search stays cheap, and it works offline (no CDN). The price: move the folder, not the HTML file alone.
    ``plotlyjs='embed'`` writes one self-contained 4.8 MB file instead (to mail or attach it).
    """
    if plotlyjs not in ("directory", "embed"):
        raise ValueError("plotlyjs must be 'directory' or 'embed'")
    out_dir = Path(out_dir)
    fig = pareto_figure(study, budget_macs, references)
    if plotlyjs == "directory":
        _ensure_plotlyjs(out_dir)
    html = fig.to_html(include_plotlyjs="directory" if plotlyjs == "directory" else True, full_html=True)
    path = out_dir / filename
    write_atomic(path, html)
    return path


def _ensure_plotlyjs(out_dir: Path) -> None:
    """Write plotly.min.js beside the plots unless the same version is already there."""
    from plotly.offline import get_plotlyjs

    bundle = get_plotlyjs()
    path = out_dir / "plotly.min.js"
    try:
        with open(path, encoding="utf-8") as f:
            if f.read(256) == bundle[:256]:  # the header names the plotly.js version
                return
    except OSError:
        pass
    write_atomic(path, bundle)


# ------------------------------------------------------------------------------------------- summary
def write_summary(run: RunDir, record: RunRecord, space: SearchSpace, study: optuna.Study, pareto: Sequence[FrozenTrial],
                  selection: SelectionResult | None, retrained: Sequence[Retrained],
                  references: Mapping[str, tuple[float, float]], export_dir: Path | None, seconds: float) -> Path:
    """``summary.md``: the budget, the Pareto front, the seed mechanisms alone, the selection, the retrained
    subnets and how to reload the export."""
    options = record.options
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]  # not the race losers
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    lines = [
        f"# nasloc run `{run.root.name}`",
        "",
        f"Budget {format_macs(options.budget)} per image at {space.img_size} px (1 multiply-add = 1 FLOP); "
        f"space `{space.name}`; data `{options.dataset}`; {len(trials)} trials ({complete} complete, "
        f"{len(evaluated_feasible_trials(study, options.budget))} evaluated within budget; {options.sampler}); "
        f"this run took {seconds:.0f} s.",
        "",
        "## Pareto front (proxy top-1 with supernet weights)",
        "",
        "| trial | proxy top-1 (%) | GMACs | params (M) | locality |",
        "|---|---|---|---|---|",
    ]
    for t in sorted(pareto, key=lambda t: t.user_attrs["macs"]):
        lines.append(f"| {t.number} | {t.user_attrs['top1']:.2f} | {t.user_attrs['macs'] / 1e9:.4f} | "
                     f"{t.user_attrs['params'] / 1e6:.3f} | {Arch.from_dict(t.user_attrs['arch']).describe()} |")
    lines += ["", "## Seed mechanisms alone in this space (largest within budget)", "", "| design | proxy top-1 (%) | GMACs |", "|---|---|---|"]
    lines += [f"| {name} | {top1:.2f} | {macs / 1e9:.4f} |" for name, (macs, top1) in references.items()]
    if selection is not None:
        lines += _selection_lines(selection, options.retrain_top_k)
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    lines += ["", "## Retrained from scratch", "",
              "| trial | val top-1 (%) | proxy top-1 (%) | GMACs at deploy | params (M) | design |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.trial} | {r.val_top1:.2f} | {r.proxy_top1:.2f} | {r.macs / 1e9:.4f} | {r.params / 1e6:.3f} | "
              f"{by_number[r.trial].user_attrs.get(SEED_DESIGN_ATTR, 'searched')} |" for r in retrained]
    if export_dir is not None:
        lines += ["", f"Best model exported to `{export_dir}`:", "",
                  f"    import nasloc, timm; timm.create_model(\"local-dir:{export_dir}\", pretrained=True)"]
    write_atomic(run.summary, "\n".join(lines) + "\n")
    return run.summary


def _selection_lines(selection: SelectionResult, finalists: int) -> list[str]:
    from .selection import selection_rows, tied_note

    rows = selection_rows(selection.study)
    rungs = selection.study.user_attrs["rungs"]
    lines = ["", "## Selection (successive halving of short trainings, top-1 % on the held-out half of val)", "",
             "| rank | candidate | search trial | " + " | ".join(f"{e} ep" for e in rungs) + " | GMACs | locality |",
             "|---|---|---|" + "---|" * len(rungs) + "---|---|"]
    for row in rows:
        scores = " | ".join("" if row[f"top1@{e}ep"] is None else f"{row[f'top1@{e}ep']:.2f}" for e in rungs)
        lines.append(f"| {row['rank']} | {row['source']} | {row['search_trial']} | {scores} | "
                     f"{row['macs'] / 1e9:.4f} | {row['locality']} |")
    note = tied_note(selection, finalists)
    if note:
        lines += ["", f"Note: {note}."]
    return lines


# ------------------------------------------------------------------------------------------- dashboard
class DashboardError(NaslocError):
    """--dashboard could not be served."""


def serve_dashboard(storage: str, port: int) -> Any:
    """optuna-dashboard on 127.0.0.1:port in a daemon thread; returns the server (call shutdown(), then
    server_close()). A port that is taken raises :class:`DashboardError` (exit status 2)."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    import optuna_dashboard

    from .storage import open_storage

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep request logs out of the progress bars
            pass

    class Server(ThreadingMixIn, WSGIServer):  # a slow API call must not hold up the page
        daemon_threads = True

    app = optuna_dashboard.wsgi(open_storage(storage))
    try:
        server = make_server("127.0.0.1", port, app, server_class=Server, handler_class=Quiet)
    except OSError as err:
        raise DashboardError(f"--dashboard-port {port}: cannot listen on 127.0.0.1:{port} ({err.strerror or err}); "
                             "choose another port") from None
    threading.Thread(target=server.serve_forever, daemon=True, name="optuna-dashboard").start()
    print(f"[nasloc] dashboard: http://127.0.0.1:{port}/dashboard", flush=True)
    return server
