"""Successive halving: the rungs, the synchronous pruner, the ranking of the candidates and the ties that
go to the retraining whole."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import optuna
from optuna.pruners import BasePruner
from optuna.trial import FrozenTrial

HELD_OUT_ATTR = "held_out"  # images each score of the selection study is measured on
TIE_Z = 2.0  # standard errors of the held-out set within which two scores count as tied


# ------------------------------------------------------------------------------------------- rungs
def rung_epochs(max_epochs: int, reduction_factor: int = 2) -> list[int]:
    """Cumulative epochs at which candidates are scored: 1, eta, eta^2, ... and ``max_epochs`` last."""
    if max_epochs < 1:
        raise ValueError(f"select epochs must be >= 1, got {max_epochs}")
    rungs = [1]
    while rungs[-1] * reduction_factor < max_epochs:
        rungs.append(rungs[-1] * reduction_factor)
    if rungs[-1] != max_epochs:
        rungs.append(max_epochs)
    return rungs


class SynchronousHalvingPruner(BasePruner):
    """Successive halving over a cohort that reports each rung before any is judged.

    Optuna's ``SuccessiveHalvingPruner`` is asynchronous (ASHA): it judges a trial against the trials that
    reached the rung before it, so with one worker the first candidate always goes through. Here a
    trial's value at a rung step is ranked among every trial that has a value at that step (pruned ones
    included, so the decision does not depend on the order of the calls nor change on resume): it goes on
    when it is among the best ``ceil(n / reduction_factor)``; ties go to the older trial.
    """

    def __init__(self, rungs: Sequence[int], reduction_factor: int = 2):
        self.rungs, self.reduction_factor = tuple(rungs), reduction_factor

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step not in self.rungs[:-1]:  # the last rung completes, it does not prune
            return False
        value = trial.intermediate_values[step]
        if math.isnan(value):
            return True
        cohort = [(t.intermediate_values[step], t.number) for t in study.get_trials(deepcopy=False)
                  if step in t.intermediate_values]  # a NaN (diverged) candidate counts, as the worst
        keep = math.ceil(len(cohort) / self.reduction_factor)
        better = sum(1 for v, n in cohort if v > value or (v == value and n < trial.number))  # NaN > x is False
        return better >= keep


# ------------------------------------------------------------------------------------------- ranking and ties
@dataclass
class SelectionResult:
    study: optuna.Study
    ranking: list[FrozenTrial]  # best first: the furthest rung reached, then the score there
    held_out: int = 0  # images each score was measured on (0: unknown)


def scores_tied(best: float, other: float, held_out: int, z: float = TIE_Z) -> bool:
    """Whether ``other`` lies within ``z`` standard errors of the difference from ``best`` (top-1 %, each measured
    on ``held_out`` images; never without a held-out size). Only the binomial error of the held-out set counts
    (training noise makes more ties, not fewer). On CIFAR-10's 2,500 selection images at 50 % top-1 the margin
    is 2.8 points."""
    if not held_out:
        return False
    p, q = best / 100, other / 100
    return math.isfinite(q) and p - q <= z * math.sqrt((p * (1 - p) + q * (1 - q)) / held_out)


def tie_margin(held_out: int, top1: float = 50.0, z: float = TIE_Z) -> float:
    """The points by which two scores near ``top1`` % on ``held_out`` images must differ not to tie."""
    p = top1 / 100
    return 100 * z * math.sqrt(2 * p * (1 - p) / held_out)


def leading_ties(scores: Sequence[float], held_out: int, z: float = TIE_Z) -> int:
    """How many of ``scores`` (top-1 % at one rung, best first) are tied with the first on ``held_out`` images
    (:func:`scores_tied`): the lead that the short trainings did not decide (1 without a held-out size)."""
    if not scores:
        return 0
    lead = 1
    for score in scores[1:]:
        if not scores_tied(scores[0], score, held_out, z):
            break
        lead += 1
    return lead


def _leaders(trials: Sequence[FrozenTrial], held_out: int) -> int:
    """How many candidates lead: those of the furthest rung whose scores are tied with the best there."""
    if not trials:
        return 0
    last = max(t.last_step for t in trials)
    return leading_ties(sorted((_score(t) for t in trials if t.last_step == last), reverse=True), held_out)


def finalists(selection: SelectionResult, top_k: int) -> list[FrozenTrial]:
    """The candidates the retrain step takes, best first: the ranking's first ``top_k`` and every candidate tied
    with the best at the last rung, since a tie the short trainings could not break is left to the full-length
    retraining; none when ``top_k`` is 0 (no retraining).

    Why the whole tie: in the CIFAR-10 evidence two searches each ended with four candidates tied within 1.5
    points after 4 epochs, and after 10 epochs neither their 4-epoch order nor the order of their MACs (a
    tie-break tried in between) named the best of them in both (results/evidence_full/README.md).
    """
    if top_k == 0:
        return []
    return selection.ranking[: max(top_k, _leaders(selection.ranking, selection.held_out))]


def tied_note(selection: SelectionResult, top_k: int) -> str:
    """For the console and the summary when candidates tied with the best at the last rung: which ranks, and
    that the retrain step takes them all (beyond ``--retrain-top-k`` ``top_k`` if need be); "" when nothing is
    tied."""
    lead = _leaders(selection.ranking, selection.held_out)
    if lead < 2:
        return ""
    epochs = selection.ranking[0].last_step
    note = (f"selection ranks 1-{lead} scored within 2 standard errors of the best after {epochs} "
            f"epoch{'s' * (epochs > 1)} on {selection.held_out} held-out images, a tie the short trainings cannot "
            f"break")
    if top_k == 0:
        return f"{note}; none is retrained (--retrain-top-k 0)"
    tied = "both" if lead == 2 else f"all {lead}"
    return f"{note}, so {tied} are retrained" + (f" (--retrain-top-k {top_k} and the tie)" if lead > top_k else "")


def ranking(study: optuna.Study) -> list[FrozenTrial]:
    """Selection trials, best first: those that reached a later rung before the others, then by their score
    at their last rung (:func:`finalists` says which of them the retrain step takes)."""
    scored = [t for t in study.get_trials(deepcopy=False) if t.intermediate_values and "arch" in t.user_attrs]
    return sorted(scored, key=lambda t: (-t.last_step, -_score(t), t.number))


def selection_result(study: optuna.Study) -> SelectionResult:
    """The study with its ranking and the held-out size it keeps (the one :func:`ranking` used)."""
    return SelectionResult(study, ranking(study), study.user_attrs.get(HELD_OUT_ATTR, 0))


def _score(trial: FrozenTrial) -> float:
    """A trial's score at its last rung; a diverged (NaN) candidate last among its rung."""
    value = trial.intermediate_values[trial.last_step]
    return -math.inf if math.isnan(value) else value
