"""The selection phase: short trainings decide among the search's best candidates and the seed designs.

The proxy score of a weight-sharing supernet is noisy and overrates some archs (small ones); taking the
single highest of many noisy proxies picks the most overrated one (the winner's curse). So the final arch
is chosen the way NSGANetV2 and Hyperband-style systems do it: every candidate (the ``top_k`` best of the
search, spread over the upper MACs band, plus every seed design at the budget) is trained for a few epochs,
starting from its supernet weights (or from scratch), in rungs of 1, 2, 4, ... epochs, and only the better
half goes on to the next rung (successive halving). Scores come from data the search did not select on
(the other half of the validation split, see :func:`nasloc.data.halve_val`). Candidates whose last-rung scores
are tied with the best (within two binomial standard errors of the held-out set) are all finalists
(:func:`finalists`): the short trainings could not order them, so the full-length retraining decides.

The rungs live in an Optuna study (``selection``) in the run's storage: one trial per candidate, one
intermediate value per rung (``trial.report``), so the dashboard shows every candidate's learning curve,
and a rerun resumes where it stopped (a candidate's epochs are checkpointed by its trainer).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import optuna
from optuna.pruners import BasePruner
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from .arch import Arch
from .errors import NaslocError, TrainingDiverged
from .flops import count
from .run import SELECT_INITS, arch_folder
from .rung_pool import Job, RungPool
from .search import SEED_DESIGN_ATTR, evaluated_feasible_trials, optuna_quiet

STUDY_NAME = "selection"
HELD_OUT_ATTR = "held_out"  # images each score of the selection study is measured on
TIE_Z = 2.0  # standard errors of the held-out set within which two scores count as tied


@dataclass(frozen=True)
class Candidate:
    """An arch competing in the selection: search trial ``trial`` of the search study. ``source`` names it:
    the trial's number (``"12"``), or the seed design's name (``"DW shortcut"``) for the seed designs that
    the search queued first (:func:`nasloc.search.enqueue_warm_start`)."""

    source: str
    arch: Arch
    trial: int


def _candidate(trial: FrozenTrial) -> Candidate:
    source = trial.user_attrs.get(SEED_DESIGN_ATTR, str(trial.number))
    return Candidate(source, Arch.from_dict(trial.user_attrs["arch"]), trial.number)


# ------------------------------------------------------------------------------------- candidates
def search_candidates(study: optuna.Study, budget_macs: float, top_k: int, band_low: float) -> list[Candidate]:
    """The ``top_k`` best evaluated trials within budget, spread over the MACs band, then every seed design
    that the search evaluated within budget (if not already among them).

    The band [band_low, budget] is cut into ``ceil(top_k / 2)`` equal sub-bands and each trial competes
    only with the trials of its own sub-band (those below ``band_low`` join the lowest): the supernet
    overrates small archs, so a plain top-k by proxy would hold only the small end. The picks are taken
    round-robin, best first in each sub-band, starting from the sub-band next to the budget.
    """
    bins = max(1, math.ceil(top_k / 2))
    width = max(budget_macs - band_low, 1.0) / bins
    by_bin: list[list[FrozenTrial]] = [[] for _ in range(bins)]
    seen: set[str] = set()
    seeds: list[FrozenTrial] = []
    for trial in sorted(evaluated_feasible_trials(study, budget_macs), key=lambda t: (-t.user_attrs["top1"], t.number)):
        if trial.user_attrs["arch_json"] in seen:  # the same arch proposed twice
            continue
        seen.add(trial.user_attrs["arch_json"])
        if SEED_DESIGN_ATTR in trial.user_attrs:
            seeds.append(trial)
        index = min(bins - 1, max(0, int((trial.user_attrs["macs"] - band_low) // width)))
        by_bin[index].append(trial)
    picked: list[FrozenTrial] = []
    while len(picked) < top_k and any(by_bin):
        for group in reversed(by_bin):  # next to the budget first
            if group and len(picked) < top_k:
                picked.append(group.pop(0))
    picked += sorted((t for t in seeds if t not in picked), key=lambda t: t.number)
    return [_candidate(t) for t in picked]


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


# ------------------------------------------------------------------------------------------- study
@dataclass
class SelectionResult:
    study: optuna.Study
    ranking: list[FrozenTrial]  # best first: the furthest rung reached, then the score there
    held_out: int = 0  # images each score was measured on (0: unknown)


def leading_ties(scores: Sequence[float], held_out: int, z: float = TIE_Z) -> int:
    """How many of ``scores`` (top-1 % at one rung, best first) lie within ``z`` standard errors of the first on
    ``held_out`` images: the lead that the short trainings did not decide (1 without a held-out size).

    Only the binomial error of the held-out set counts (training noise makes more ties, not fewer). On
    CIFAR-10's 2,500 selection images at 50 % top-1, two standard errors of a difference are 2.8 points.
    """
    if not scores or not held_out:
        return min(len(scores), 1)
    p = scores[0] / 100
    lead = 1
    for score in scores[1:]:
        q = score / 100
        if not math.isfinite(q) or p - q > z * math.sqrt((p * (1 - p) + q * (1 - q)) / held_out):
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


Advance = Callable[[int, Candidate, int], float]
"""``advance(trial_number, candidate, epochs) -> top-1 %`` trains the candidate up to ``epochs`` epochs in all
(resuming from what it trained before) and scores it on the selection split."""


def run_selection(candidates: Sequence[Candidate], advance: Advance | RungPool, storage: BaseStorage, *,
                  max_epochs: int, reduction_factor: int = 2, held_out: int = 0,
                  say: Callable[[str], None] = print, progress: bool = False) -> SelectionResult:
    """Run (or resume) successive halving of ``candidates``, one training at a time (``advance``) or several
    (a :class:`RungPool`); returns the study and its ranking. Each score is stored as soon as it comes. The
    candidates of a study are fixed when it is created: a rerun resumes them (trials keep their numbers and
    reported rungs) and ignores ``candidates``. ``held_out``: the images each score is measured on (0: unknown,
    then no two scores count as tied). ``progress``: a bar per rung, of its candidates trained.
    """
    train = advance.train if isinstance(advance, RungPool) else partial(_one_at_a_time, advance)
    rungs = rung_epochs(max_epochs, reduction_factor)
    study = open_selection(candidates, storage, rungs, reduction_factor, held_out)
    for epochs in rungs:
        alive = alive_candidates(study)
        if not alive:
            break
        scored = sum(epochs in t.intermediate_values for t in alive)
        say(f"[nasloc]   rung {epochs} epoch{'s' * (epochs > 1)}: {len(alive)} candidate{'s' * (len(alive) > 1)}"
            + (f" ({scored} already scored)" if scored else ""))
        ids = {t.number: t._trial_id for t in alive}
        pending = [(t.number, candidate_of(t), epochs) for t in alive if epochs not in t.intermediate_values]
        with tqdm(total=len(pending), desc=f"selection rung {epochs}", unit="candidate", disable=not progress) as bar:
            for number, score in train(pending):
                report(study, ids[number], score, epochs)
                bar.set_postfix_str(f"trial {number}: {score:.2f} %", refresh=False)
                bar.update()
        _close_rung(study, epochs, rungs)
    return selection_result(study)


def _one_at_a_time(advance: Advance, jobs: Sequence[Job]) -> Iterator[tuple[int, float]]:
    for number, candidate, epochs in jobs:
        yield number, advance(number, candidate, epochs)


def open_selection(candidates: Sequence[Candidate], storage: BaseStorage, rungs: list[int],
                   reduction_factor: int = 2, held_out: int = 0) -> optuna.Study:
    """The selection study, with one trial per candidate (made once; see :func:`run_selection`). ``held_out``
    (the images each score is measured on) is kept as a study attribute, for :func:`ranking`'s ties."""
    with optuna_quiet(True):  # the rungs are reported by the caller
        study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction="maximize",
                                    load_if_exists=True, pruner=SynchronousHalvingPruner(rungs, reduction_factor))
    _check_rungs(study, rungs)
    if held_out and study.user_attrs.get(HELD_OUT_ATTR) != held_out:
        study.set_user_attr(HELD_OUT_ATTR, held_out)
    _add_candidates(study, candidates)
    return study


def report(study: optuna.Study, trial_id: int, value: float, epochs: int) -> None:
    """Store a candidate's score after ``epochs`` epochs (an intermediate value of its trial, by storage id)."""
    optuna.trial.Trial(study, trial_id).report(value, epochs)


def close_unfinished(study: optuna.Study, rungs: list[int], keep: Collection[int] = ()) -> None:
    """After a scheduler that stops candidates itself (Ray's ASHA): those that reached the last rung are
    COMPLETE with their score there, the others PRUNED; trial numbers in ``keep`` stay in the race."""
    for frozen in alive_candidates(study):
        if frozen.number not in keep:
            close_candidate(study, frozen, rungs)


def close_candidate(study: optuna.Study, frozen: FrozenTrial, rungs: list[int]) -> None:
    """A candidate the scheduler let go: COMPLETE with its last rung's score, or PRUNED where it stopped."""
    if rungs[-1] in frozen.intermediate_values:
        study.tell(frozen.number, frozen.intermediate_values[rungs[-1]])
    elif frozen.intermediate_values:
        study.tell(frozen.number, state=TrialState.PRUNED)


def _check_rungs(study: optuna.Study, rungs: list[int]) -> None:
    stored = study.user_attrs.get("rungs")
    if stored is None:
        study.set_user_attr("rungs", rungs)
    elif list(stored) != rungs:
        raise NaslocError(f"the selection of this run was started with rungs {stored} (epochs), not {rungs}; "
                         "use the same --select-epochs, or another --run-name")


def _add_candidates(study: optuna.Study, candidates: Sequence[Candidate]) -> None:
    """One trial per candidate, made once: a trial cut off before it got its arch (a crash) is failed."""
    trials = study.get_trials(deepcopy=False)
    for orphan in (t for t in trials if t.state == TrialState.RUNNING and "arch" not in t.user_attrs):
        study.tell(orphan.number, state=TrialState.FAIL)
    if study.user_attrs.get("candidates_added"):
        return
    have = {t.user_attrs.get("source") for t in trials if "arch" in t.user_attrs}
    for candidate in candidates:
        if candidate.source in have:
            continue
        trial = study.ask()
        cost = count(candidate.arch)
        trial.set_user_attr("source", candidate.source)
        trial.set_user_attr("search_trial", candidate.trial)
        trial.set_user_attr("macs", int(cost.macs))
        trial.set_user_attr("params", int(cost.params))
        trial.set_user_attr("arch", candidate.arch.to_dict())
    study.set_user_attr("candidates_added", True)


def candidate_of(trial: FrozenTrial) -> Candidate:
    """The candidate a selection trial trains."""
    return Candidate(trial.user_attrs["source"], Arch.from_dict(trial.user_attrs["arch"]), trial.user_attrs["search_trial"])


def alive_candidates(study: optuna.Study) -> list[FrozenTrial]:
    """Candidates still in the race (RUNNING trials)."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if "arch" in t.user_attrs]


def _close_rung(study: optuna.Study, epochs: int, rungs: list[int]) -> None:
    """After every alive candidate has reported ``epochs``: prune the worse ones, or complete the last rung."""
    for frozen in alive_candidates(study):
        if frozen.last_step != epochs:  # went on past this rung in an earlier attempt: its next rung, still
            continue  # being reported, is judged when that one is complete (the pruner judges the last step)
        if epochs == rungs[-1]:
            study.tell(frozen.number, frozen.intermediate_values[epochs])
        elif optuna.trial.Trial(study, frozen._trial_id).should_prune():
            study.tell(frozen.number, state=TrialState.PRUNED)


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


def selection_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per candidate for ``selection.csv``: its rank, source, cost, state and score at every rung."""
    rungs = study.user_attrs.get("rungs", [])
    rows = []
    for rank, trial in enumerate(ranking(study), 1):
        arch = Arch.from_dict(trial.user_attrs["arch"])
        row = dict(rank=rank, source=trial.user_attrs["source"], search_trial=trial.user_attrs["search_trial"],
                   selection_trial=trial.number, state=trial.state.name,
                   macs=trial.user_attrs["macs"], params=trial.user_attrs["params"], locality=arch.describe())
        row.update({f"top1@{e}ep": trial.intermediate_values.get(e) for e in rungs})
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class SelectionConfig:
    """How candidates are trained in the rungs (``--select-*``)."""

    epochs: int = 4  # the last rung; rungs are 1, 2, 4, ... up to it
    top_k: int = 8  # search candidates; the seed designs come on top
    init: str = "scratch"  # "scratch": fresh weights (ranks better, bench/bench_selection.py); "supernet": fine-tune
    reduction_factor: int = 2
    batch_size: int = 64  # as measured in bench/bench_selection.py; more steps per epoch on small data sets
    seed: int = 0


class RungTrainer:
    """``advance`` for :func:`run_selection`: trains a candidate at the supernet's resolution with the
    retraining code (checkpoint every epoch, one folder per selection trial), on the cosine schedule of
    the last rung, with weak augmentation (crop and flip), and scores it on ``splits.val``."""

    def __init__(self, supernet: Any, splits: Any, config: SelectionConfig, folder: Callable[[int], Any],
                 device: str = "auto"):
        if config.init not in SELECT_INITS:
            raise ValueError(f"selection init must be one of {SELECT_INITS}, got {config.init!r}")
        self.supernet, self.splits, self.config, self.folder, self.device = supernet, splits, config, folder, device

    def __call__(self, number: int, candidate: Candidate, epochs: int) -> float:
        import torch

        from .models import LocalityViT
        from .train import RetrainConfig, retrain

        arch = self.supernet.at_resolution(candidate.arch)
        torch.manual_seed(self.config.seed)  # the scratch init (a resumed training loads its checkpoint)
        model = self.supernet.extract(arch) if self.config.init == "supernet" else LocalityViT(arch)
        cfg = RetrainConfig(epochs=self.config.epochs, batch_size=self.config.batch_size, seed=self.config.seed,
                            warmup_epochs=0 if self.config.init == "supernet" else 1, mixup=0.0, cutmix=0.0,
                            randaugment="", ema_decay=0.0, img_size=self.supernet.img_size)
        folder = arch_folder(Path(self.folder(number)), arch)  # resumes this arch's training only
        try:
            result = retrain(model, self.splits, cfg, folder, device=self.device, progress=False, stop_epoch=epochs)
        except TrainingDiverged:  # a candidate whose loss blows up is out of the race, not the end of the run
            return math.nan
        return result.history[epochs - 1]["val_top1"]



@dataclass(frozen=True)
class TrainerSpec:
    """Everything a fresh process (a Ray worker) needs to rebuild a run's :class:`RungTrainer`: the proxy
    evaluator's spec (space, supernet checkpoint, data, resolution, seed, device), the selection config and
    the run folder (each candidate trains in ``RunDir.selection_dir``)."""

    evaluator: Any  # nasloc.evaluate.EvaluatorSpec
    config: SelectionConfig
    run_dir: str

    def __call__(self) -> RungTrainer:
        from .data import halve_val
        from .run import RunDir

        supernet, splits = self.evaluator.load()
        _, selection_half = halve_val(splits, self.evaluator.seed)
        return RungTrainer(supernet, selection_half, self.config, RunDir(Path(self.run_dir)).selection_dir,
                           device=self.evaluator.device)
