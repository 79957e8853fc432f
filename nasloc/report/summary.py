"""``summary.md``: what a run found, in one page."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..arch import Arch
from ..fileio import write_atomic
from ..run import RunDir, RunRecord
from ..search.study import SEED_DESIGN_ATTR, evaluated_feasible_trials
from ..units import format_macs

if TYPE_CHECKING:
    from ..selection.halving import SelectionResult
    from ..space.search_space import SearchSpace
    from ..training.retrain import Retrained


def write_summary(run: RunDir, record: RunRecord, space: SearchSpace, study: optuna.Study, pareto: Sequence[FrozenTrial],
                  selection: SelectionResult | None, retrained: Sequence[Retrained],
                  references: Mapping[str, tuple[float, float]], export_dir: Path | None, seconds: float,
                  planned: Mapping[str, float] | None = None, took: Mapping[str, float] | None = None) -> Path:
    """``summary.md``: the budget, the Pareto front, the seed mechanisms alone, the selection, the retrained
    subnets, how to reload the export, and the plan's estimated seconds per phase (``planned``) against the
    seconds each took (``took``)."""
    options = record.options
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]  # not the race losers
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    lines = [
        f"# nasloc run `{run.root.name}`",
        "",
        f"Budget {format_macs(options.budget)} per image at {space.img_size} px (1 multiply-add = 1 FLOP); "
        f"space `{space.name}`; data `{options.dataset}`; {len(trials)} trials ({complete} complete, "
        f"{len(evaluated_feasible_trials(study, options.budget))} evaluated within budget; {options.sampler}); "
        f"this run took {seconds:.0f} s; its folder holds {folder_megabytes(run.root):.0f} MB (checkpoints kept: "
        f"{options.keep_checkpoints}).",
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
    if planned and took:
        lines += _plan_lines(planned, took)
        write_atomic(run.root / "plan.json", json.dumps(dict(planned=planned, took=took), indent=1))
    write_atomic(run.summary, "\n".join(lines) + "\n")
    return run.summary


def _plan_lines(planned: Mapping[str, float], took: Mapping[str, float]) -> list[str]:
    """The plan printed at the start against what this invocation's phases took (a resumed phase takes less)."""
    lines = ["", "## Plan against actual (the estimates printed at the start; this invocation's seconds)", "",
             "| phase | planned (s) | actual (s) | actual / planned |", "|---|---|---|---|"]
    for phase, estimate in planned.items():
        actual = took.get(phase)
        ratio = f"{actual / estimate:.2f}" if actual is not None and estimate > 0 else ""
        lines.append(f"| {phase} | {estimate:.0f} | {'' if actual is None else f'{actual:.0f}'} | {ratio} |")
    return lines


def folder_megabytes(folder: Path) -> float:
    """What the files under ``folder`` take, in MB (10^6 bytes)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def _selection_lines(selection: SelectionResult, finalists: int) -> list[str]:
    from ..selection.halving import tied_note
    from ..selection.study import selection_rows

    rows = selection_rows(selection.study)
    rungs = selection.study.user_attrs["rungs"]
    score = selection.study.user_attrs.get("score", "val")
    lines = ["", f"## Selection (successive halving of short trainings, ranked by {score}; val: top-1 % on the "
             "held-out half of val)", "",
             "| rank | candidate | search trial | " + " | ".join(f"{e} ep" for e in rungs) + " | GMACs | locality |",
             "|---|---|---|" + "---|" * len(rungs) + "---|---|"]
    for row in rows:
        scores = " | ".join("" if row[f"score@{e}ep"] is None else f"{row[f'score@{e}ep']:.2f}" for e in rungs)
        lines.append(f"| {row['rank']} | {row['source']} | {row['search_trial']} | {scores} | "
                     f"{row['macs'] / 1e9:.4f} | {row['locality']} |")
    note = tied_note(selection, finalists)
    if note:
        lines += ["", f"Note: {note}."]
    return lines
