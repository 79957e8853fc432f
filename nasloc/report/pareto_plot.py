"""The interactive Pareto plot (plotly HTML): every trial, the feasible front, the budget and the seed designs."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..fileio import write_atomic
from ..run import PARETO_HTML
from ..search.study import pareto_trials
from ..units import format_macs

PLOTLY_JS = "plotly.min.js"  # the bundle that plots written with plotlyjs='directory' load

if TYPE_CHECKING:
    pass


MACS_AXIS = "MACs (1 multiply-add = 1 FLOP)"


def _axis_scale(budget_macs: float) -> tuple[float, str]:
    for scale, unit in ((1e9, "billions"), (1e6, "millions"), (1e3, "thousands")):
        if budget_macs >= scale / 10:
            return scale, unit
    return 1.0, "per image"


REFERENCE_SYMBOLS = ("diamond", "square", "triangle-up", "triangle-down", "pentagon", "hexagon", "star-diamond")


def pareto_figure(study: optuna.Study, budget_macs: float,
                  references: Mapping[str, tuple[float, float | None]] | None = None,
                  selected: Mapping[int, str] | None = None, retrained: Mapping[int, float] | None = None) -> Any:
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
    for index, (name, (macs, top1)) in enumerate(references.items()):
        if top1 is None or not math.isfinite(top1):
            fig.add_vline(x=macs / scale, line=dict(color="#59a14f", dash="dot"),
                          annotation_text=f"{name} (not evaluated)", annotation_position="bottom right")
            continue
        # Named in the legend, one symbol each: the seed designs sit at the budget with close scores, and labels
        # on the plot ran over each other.
        fig.add_trace(go.Scatter(
            x=[macs / scale], y=[top1], mode="markers", name=f"seed design: {name}",
            marker=dict(color="#59a14f", symbol=REFERENCE_SYMBOLS[index % len(REFERENCE_SYMBOLS)], size=12,
                        line=dict(width=1, color="#333")),
            hovertemplate=f"{name}<br>top-1 %{{y:.2f}}%<br>{format_macs(macs)}<extra>seed design</extra>",
        ))
    by_number = {t.number: t for t in evaluated}
    marked = [(n, by_number[n]) for n in (selected or {}) if n in by_number]
    if marked:
        fig.add_trace(go.Scatter(
            x=[t.user_attrs["macs"] / scale for _, t in marked], y=[t.user_attrs["top1"] for _, t in marked],
            mode="markers", name=f"selection candidates ({len(marked)})",
            # An open symbol is drawn in the marker's colour: a transparent one hid the rings.
            marker=dict(color="#b07aa1", symbol="circle-open", size=18, line=dict(width=2)),
            customdata=[[n, selected[n]] for n, _ in marked],
            hovertemplate="trial %{customdata[0]}<br>selection: %{customdata[1]}<extra>selection</extra>"))
    finished = [(n, by_number[n]) for n in (retrained or {}) if n in by_number]
    if finished:
        best = max(finished, key=lambda item: retrained[item[0]])[0]
        fig.add_trace(go.Scatter(
            x=[t.user_attrs["macs"] / scale for _, t in finished], y=[t.user_attrs["top1"] for _, t in finished],
            mode="markers", name=f"retrained finalists ({len(finished)}; star: the export)",
            marker=dict(color=["#f1ce63" if n == best else "#ff9da7" for n, _ in finished],
                        symbol=["star" if n == best else "star-open" for n, _ in finished], size=20,
                        line=dict(width=1.5, color="#333")),
            customdata=[[n, retrained[n]] for n, _ in finished],
            hovertemplate="trial %{customdata[0]}<br>retrained top-1 %{customdata[1]:.2f}%<extra>retrained</extra>"))
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
    selected: Mapping[int, str] | None = None,
    retrained: Mapping[int, float] | None = None,
    picture: str | None = None,
    filename: str = PARETO_HTML,
    plotlyjs: str = "directory",
    bundle_dir: str | Path | None = None,
) -> Path:
    """An interactive Pareto plot: every trial (within / over budget), the feasible front as a staircase,
    the budget as a vertical line and labelled reference points ``name -> (macs, top1)`` (e.g. the seed
    presets evaluated by the caller; top1 None draws a vertical line only).

    ``plotlyjs='directory'`` (default) writes a ~12 KB HTML file that loads ``plotly.min.js`` from the same
    folder, where it is written once (4.8 MB) and shared by every plot there: rewriting the plot during a
    search stays cheap, and it works offline (no CDN). The price: move the folder, not the HTML file alone.
    ``plotlyjs='embed'`` writes one self-contained 4.8 MB file instead (to mail or attach it).

    After the selection and the retrain: ``selected`` (search trial -> its selection scores, as text) rings the
    candidates, ``retrained`` (search trial -> retrained top-1) stars the finalists (the export filled), and
    ``picture`` (an SVG document, the export's arch) is shown under the plot.
    """
    if plotlyjs not in ("directory", "embed"):
        raise ValueError("plotlyjs must be 'directory' or 'embed'")
    out_dir = Path(out_dir)
    fig = pareto_figure(study, budget_macs, references, selected, retrained)
    include: str | bool = True
    if plotlyjs == "directory":
        bundle_dir = Path(bundle_dir or out_dir)
        ensure_plotlyjs(bundle_dir)
        include = Path(os.path.relpath(bundle_dir / PLOTLY_JS, out_dir)).as_posix()  # a .js path: a <script src>
    html = fig.to_html(include_plotlyjs=include, full_html=True)
    if picture is not None:
        figure = ('<figure style="margin: 1em 3em"><figcaption style="font-family: sans-serif">The exported '
                  f'arch</figcaption>{picture}</figure>')
        html = html.replace("</body>", figure + "</body>", 1)
    path = out_dir / filename
    write_atomic(path, html)
    return path


def ensure_plotlyjs(out_dir: Path) -> None:
    """Write plotly.min.js beside the plots unless the same version is already there."""
    from plotly.offline import get_plotlyjs

    bundle = get_plotlyjs()
    path = out_dir / PLOTLY_JS
    try:
        with open(path, encoding="utf-8") as f:
            if f.read(256) == bundle[:256]:  # the header names the plotly.js version
                return
    except OSError:
        pass
    write_atomic(path, bundle)
