"""``summary.md``: what a run found, in one page."""
from __future__ import annotations

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
