"""``summary.md``: what a run found, in one page."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from optuna.trial import TrialState

from ..arch import Arch
from ..arch_view import LEGEND, arch_svg, locality, stage_table
from ..fileio import write_atomic
from ..run import RunDir, RunRecord
from ..search.study import evaluated_feasible_trials
from ..selection.halving import scores_tied
from ..units import format_macs

from .family import BudgetResult, exported_finalist

if TYPE_CHECKING:
    from ..selection.halving import SelectionResult
    from ..space.search_space import SearchSpace
    from ..training.retrain import Retrained


def write_summary(run: RunDir, record: RunRecord, space: SearchSpace, result: BudgetResult, seconds: float,
                  val_images: int = 0, planned: Mapping[str, float] | None = None,
                  took: Mapping[str, float] | None = None) -> Path:
    """``summary.md``: the result first (the exported model, its margin over the seed designs retrained beside it,
    the next command), then the retrained finalists, the budget, the Pareto front, the seed mechanisms alone,
    the selection, and the plan's estimated seconds per phase (``planned``) against what each took (``took``).
    The winner's picture goes beside it as ``arch.svg``. ``val_images``: the validation images of the retrain's
    top-1, for its standard error."""
    options = record.options
    study, pareto, selection, retrained = result.study, result.pareto, result.selection, result.retrained
    references, export_dir = result.references, result.export_dir
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]  # not the race losers
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    lines = [f"# nasloc run `{run.root.name}`" + (f", budget {run.member}" if run.member else ""), ""]
    lines += _result_lines(run, record, retrained, val_images, export_dir)
    lines += _retrained_lines(retrained, val_images)
    lines += [
        "", "## Run", "",
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
                     f"{t.user_attrs['params'] / 1e6:.3f} | {locality(Arch.from_dict(t.user_attrs['arch']))} |")
    lines += ["", "## Seed mechanisms alone in this space (largest within budget)", "", "| design | proxy top-1 (%) | GMACs |", "|---|---|---|"]
    lines += [f"| {name} | {top1:.2f} | {macs / 1e9:.4f} |" for name, (macs, top1) in references.items()]
    if selection is not None:
        lines += _selection_lines(selection, options.retrain_top_k)
    lines += ["", f"Locality: {LEGEND}."]
    if planned and took:
        lines += _plan_lines(planned, took)
        write_atomic(run.home / "plan.json", json.dumps(dict(planned=planned, took=took), indent=1))
    write_atomic(run.summary, "\n".join(lines) + "\n")
    return run.summary


def write_family_summary(run: RunDir, record: RunRecord, results: Sequence[BudgetResult], seconds: float,
                         val_images: int, planned: Mapping[str, float] | None = None,
                         took: Mapping[str, float] | None = None) -> Path:
    """A model family's ``summary.md`` in the run folder: one row per budget (its export, seed design or searched,
    retrained top-1 with two standard errors, MACs, params, its own summary), the family plot, the plan."""
    lines = [f"# nasloc family `{run.root.name}`", "",
             f"One supernet, then a search, selection and retrain per budget; {len(results)} exports. This run took "
             f"{seconds:.0f} s; its folder holds {folder_megabytes(run.root):.0f} MB.", "",
             "| budget | export | design | trial | top-1 (%) | ± 2 SE | GMACs | params (M) | details |",
             "|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        best, member = result.exported, run.member_dir(result.label)
        if best is None:
            lines.append(f"| {result.label} | - | nothing retrained | | | | | | [summary]({result.label}/summary.md) |")
            continue
        lines.append(f"| {result.label} | `{run.relative(member.best_export)}` | {best.design} | {best.trial} | "
                     f"{best.val_top1:.2f} | {two_standard_errors(best.val_top1, val_images):.2f} | "
                     f"{best.macs / 1e9:.4f} | {best.params / 1e6:.3f} | [summary]({result.label}/summary.md) |")
    lines += ["", "![retrained top-1 against MACs: the family and the seed designs retrained beside it](family.png)",
              "", f"The same as a table: `family.csv`; interactive: `family.html`. Data `{record.options.dataset}`, "
              f"retrained {record.options.retrain_epochs} epochs, top-1 on {val_images} validation images."]
    if planned and took:
        lines += _plan_lines(planned, took)
    write_atomic(run.summary, "\n".join(lines) + "\n")
    return run.summary


def two_standard_errors(top1: float, images: int) -> float:
    """Two binomial standard errors of a top-1 (%) measured on ``images`` images (0 when unknown)."""
    if not images:
        return 0.0
    p = min(max(top1 / 100, 0.0), 1.0)
    return 200 * math.sqrt(p * (1 - p) / images)


def _result_lines(run: RunDir, record: RunRecord, retrained: Sequence[Retrained], val_images: int,
                  export_dir: Path | None) -> list[str]:
    """The exported model, what it is, its top-1 with two standard errors, its cost, its margin over the best
    seed design retrained in this run, its picture and arch, and the next command."""
    options = record.options
    if not retrained or export_dir is None:
        return ["## Result", "", "Nothing was retrained (--retrain-top-k 0): no model was exported; "
                "`nasloc export --run RUN --trial N` exports a trial with its supernet weights.", ""]
    best = exported_finalist(retrained)
    what = "an arch the search found" if best.design == "searched" else f"the {best.design} seed design"
    seeds = [r for r in retrained if r.design != "searched" and r is not best]
    if best.design != "searched":
        margin = "the search's own archs did not beat it in this run"
    elif seeds:
        top_seed = max(seeds, key=lambda r: r.val_top1)
        margin = (f"{best.val_top1 - top_seed.val_top1:+.2f} points over the best seed design retrained beside it "
                  f"({top_seed.design}, {top_seed.val_top1:.2f} %)")
    else:
        margin = "no seed design was among the finalists (the selection ranked them lower)"
    svg = run.home / "arch.svg"
    write_atomic(svg, arch_svg(best.model.arch, f"search trial {best.trial}: {what}"))
    data = f" --dataset {options.dataset}" + (f" --data-dir {options.data_dir}" if options.data_dir else "")
    return ["## Result", "",
            f"Exported: search trial {best.trial}, {what}: retrained top-1 **{best.val_top1:.2f} %** "
            f"(± {two_standard_errors(best.val_top1, val_images):.2f}, two standard errors over {val_images} "
            f"validation images; {options.retrain_epochs} epochs at {options.retrain_img_size} px), "
            f"{format_macs(best.macs)}, {best.params / 1e6:.3f} M params; {margin}.", "",
            "![the exported arch](arch.svg)", "", *stage_table(best.model.arch), "",
            "Next: train it longer with the full recipe, e.g.", "",
            f"    nasloc train --model {export_dir}{data} --epochs 300", "",
            "or load it as trained:", "",
            f"    import nasloc, timm; timm.create_model(\"local-dir:{export_dir}\", pretrained=True)", ""]


def _retrained_lines(retrained: Sequence[Retrained], val_images: int) -> list[str]:
    """The retrained finalists, best first: the winner marked, and those tied with it by the selection's rule."""
    if not retrained:
        return []
    ranked = sorted(retrained, key=lambda r: -r.val_top1)
    best = ranked[0]
    lines = ["## Retrained from scratch", "",
             "| | trial | design | val top-1 (%) | ± 2 SE | proxy top-1 (%) | GMACs at deploy | params (M) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in ranked:
        error = two_standard_errors(r.val_top1, val_images)
        tied = r is not best and scores_tied(best.val_top1, r.val_top1, val_images)
        mark = "winner" if r is best else "tie" if tied else ""
        lines.append(f"| {mark} | {r.trial} | {r.design} | {r.val_top1:.2f} | {error:.2f} | {r.proxy_top1:.2f} | "
                     f"{r.macs / 1e9:.4f} | {r.params / 1e6:.3f} |")
    if any(scores_tied(best.val_top1, r.val_top1, val_images) for r in ranked[1:]):
        lines += ["", "tie: within two standard errors of the difference from the winner on these validation images "
                  "(the selection's rule); the export is the "
                  "winner, the ties are as good as far as this validation set can tell."]
    return lines


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
    rows_arch = {t.number: t.user_attrs["arch"] for t in selection.study.get_trials(deepcopy=False)}
    rungs = selection.study.user_attrs["rungs"]
    score = selection.study.user_attrs.get("score", "val")
    lines = ["", f"## Selection (successive halving of short trainings, ranked by {score}; val: top-1 % on the "
             "held-out half of val)", "",
             "| rank | candidate | search trial | " + " | ".join(f"{e} ep" for e in rungs) + " | GMACs | locality |",
             "|---|---|---|" + "---|" * len(rungs) + "---|---|"]
    for row in rows:
        scores = " | ".join("" if row[f"score@{e}ep"] is None else f"{row[f'score@{e}ep']:.2f}" for e in rungs)
        lines.append(f"| {row['rank']} | {row['source']} | {row['search_trial']} | {scores} | "
                     f"{row['macs'] / 1e9:.4f} | {locality(Arch.from_dict(rows_arch[row['selection_trial']]))} |")
    note = tied_note(selection, finalists)
    if note:
        lines += ["", f"Note: {note}."]
    return lines
