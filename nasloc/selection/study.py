"""The selection phase: short trainings decide among the search's best candidates and the seed designs.

The proxy score of a weight-sharing supernet is noisy and overrates some archs (small ones); taking the
single highest of many noisy proxies picks the most overrated one (the winner's curse). So the final arch
is chosen the way NSGANetV2 and Hyperband-style systems do it: every candidate (the ``top_k`` best of the
search, spread over the upper MACs band, plus every seed design at the budget) is trained for a few epochs,
starting from its supernet weights (or from scratch), in rungs of 1, 2, 4, ... epochs, and only the better
half goes on to the next rung (successive halving). Scores come from data the search did not select on
(the other half of the validation split, see :func:`nasloc.training.data.halve_val`). Candidates whose last-rung scores
are tied with the best (within two binomial standard errors of the held-out set) are all finalists
(:func:`finalists`): the short trainings could not order them, so the full-length retraining decides.

The rungs live in an Optuna study (``selection``) in the run's storage: one trial per candidate, one
intermediate value per rung (``trial.report``), so the dashboard shows every candidate's learning curve,
and a rerun resumes where it stopped (a candidate's epochs are checkpointed by its trainer).
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from functools import partial
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from ..arch import Arch
from ..errors import NaslocError
from ..run import SELECTION_STUDY
from ..search.study import optuna_quiet
from ..space.flops import count
from .candidates import Candidate, candidate_of
from .halving import HELD_OUT_ATTR, SelectionResult, SynchronousHalvingPruner, ranking, rung_epochs, selection_result
from .pool import Job, RungPool
from .scores import SCORES, Curve, all_scores, score_of

STUDY_NAME = SELECTION_STUDY  # a family member's selection adds its budget (RunRecord.selection_study)
SCHEDULE_ATTR = "schedule_epochs"  # the length of the lr schedule the candidates train on (the retrain's)
Advance = Callable[[int, Candidate, int], Curve]
"""``advance(trial_number, candidate, epochs) -> curve`` trains the candidate up to ``epochs`` epochs in all
(resuming from what it trained before) and returns its learning curve on the selection split."""


def run_selection(candidates: Sequence[Candidate], advance: Advance | RungPool, storage: BaseStorage, *,
                  max_epochs: int, reduction_factor: int = 2, held_out: int = 0, score: str = "val",
                  schedule_epochs: int | None = None, say: Callable[[str], None] = print,
                  progress: bool = False, release: Callable[[int], None] | None = None,
                  study_name: str = STUDY_NAME) -> SelectionResult:
    """Run (or resume) successive halving of ``candidates``, one training at a time (``advance``) or several
    (a :class:`RungPool`); returns the study and its ranking. Each candidate's learning curve is scored by
    ``score`` (:func:`nasloc.selection.scores.score_of`), the rung's value; every score of the curve is kept
    beside it (the trial's user attribute ``scores@<epochs>``). Each is stored as soon as it comes. The
    candidates of a study are fixed when it is created: a rerun resumes them (trials keep their numbers and
    reported rungs) and ignores ``candidates``. ``held_out``: the images each score is measured on (0: unknown,
    then no two scores count as tied). ``schedule_epochs``: kept with the study, for the trainings it resumes.
    ``progress``: a bar per rung, of its candidates trained. ``release(search_trial)`` is called once a rung has
    let a candidate go (pruned, or complete at the last rung): nothing will train it again.
    """
    train = advance.train if isinstance(advance, RungPool) else partial(_one_at_a_time, advance)
    rungs = rung_epochs(max_epochs, reduction_factor)
    study = open_selection(candidates, storage, rungs, reduction_factor, held_out, score, schedule_epochs, study_name)
    rank_by = score_of(score)
    for epochs in rungs:
        alive = alive_candidates(study)
        if not alive:
            break
        scored = sum(epochs in t.intermediate_values for t in alive)
        say(f"[nasloc]   rung {epochs} epoch{'s' * (epochs > 1)}: {len(alive)} candidate{'s' * (len(alive) > 1)}"
            + (f" ({scored} already scored)" if scored else ""))
        ids = {t.number: t._trial_id for t in alive}
        pending = [(t.number, candidate_of(t), epochs) for t in alive if epochs not in t.intermediate_values]
        names = {number: candidate.name for number, candidate, _ in pending}
        with tqdm(total=len(pending), desc=f"selection rung {epochs}", unit="candidate", disable=not progress) as bar:
            for number, curve in train(pending):
                value = rank_by(curve)
                report(study, ids[number], value, epochs, all_scores(curve))
                bar.set_postfix_str(f"{names[number]}: {score} {value:.2f}", refresh=False)
                bar.update()
        _close_rung(study, epochs, rungs)
        if release is not None:
            for number in ids.keys() - {t.number for t in alive_candidates(study)}:
                release(study.trials[number].user_attrs["search_trial"])
    return selection_result(study)


def _one_at_a_time(advance: Advance, jobs: Sequence[Job]) -> Iterator[tuple[int, Curve]]:
    for number, candidate, epochs in jobs:
        yield number, advance(number, candidate, epochs)


def open_selection(candidates: Sequence[Candidate], storage: BaseStorage, rungs: list[int],
                   reduction_factor: int = 2, held_out: int = 0, score: str = "val",
                   schedule_epochs: int | None = None, study_name: str = STUDY_NAME) -> optuna.Study:
    """The selection study, with one trial per candidate (made once; see :func:`run_selection`). ``held_out``
    (the images each score is measured on) is kept as a study attribute, for :func:`ranking`'s ties; the rungs,
    the score and the schedule are fixed when the study is made (a rerun must repeat them)."""
    with optuna_quiet(True):  # the rungs are reported by the caller
        study = optuna.create_study(storage=storage, study_name=study_name, direction="maximize",
                                    load_if_exists=True, pruner=SynchronousHalvingPruner(rungs, reduction_factor))
    _check_fixed(study, "rungs", rungs, "--select-epochs")
    _check_fixed(study, "score", score, "--select-score")
    if schedule_epochs is not None:
        _check_fixed(study, SCHEDULE_ATTR, schedule_epochs, "--retrain-epochs")
    if held_out and study.user_attrs.get(HELD_OUT_ATTR) != held_out:
        study.set_user_attr(HELD_OUT_ATTR, held_out)
    _add_candidates(study, candidates)
    return study


def report(study: optuna.Study, trial_id: int, value: float, epochs: int,
           scores: dict[str, float] | None = None) -> None:
    """Store a candidate's score after ``epochs`` epochs (an intermediate value of its trial, by storage id), and
    every score of its curve there (``scores@<epochs>``, for selection.csv and the dashboard)."""
    trial = optuna.trial.Trial(study, trial_id)
    if scores is not None:
        trial.set_user_attr(f"scores@{epochs}", scores)
    trial.report(value, epochs)


def stored_schedule(storage: BaseStorage, study_name: str = STUDY_NAME) -> int | None:
    """The schedule length the run's selection study was made with, if there is one (a rerun keeps it, even with
    a longer --retrain-epochs)."""
    try:
        return optuna.load_study(study_name=study_name, storage=storage).user_attrs.get(SCHEDULE_ATTR)
    except KeyError:
        return None


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


def _check_fixed(study: optuna.Study, name: str, value: Any, option: str) -> None:
    stored = study.user_attrs.get(name)
    if stored is None:
        study.set_user_attr(name, value)
    elif stored != value:
        raise NaslocError(f"the selection of this run was started with {name} {stored}, not {value}; use the same "
                          f"{option}, or another --run-name")


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


def selection_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per candidate for ``selection.csv``: its rank, source, cost, state, the score it was ranked by at
    every rung (``score@<epochs>ep``) and every other score there (``val@``, ``tse@``, ``extrapolated@``)."""
    rungs = study.user_attrs.get("rungs", [])
    rows = []
    for rank, trial in enumerate(ranking(study), 1):
        arch = Arch.from_dict(trial.user_attrs["arch"])
        row = dict(rank=rank, source=trial.user_attrs["source"], search_trial=trial.user_attrs["search_trial"],
                   selection_trial=trial.number, state=trial.state.name,
                   macs=trial.user_attrs["macs"], params=trial.user_attrs["params"], locality=arch.describe())
        row.update({f"score@{e}ep": trial.intermediate_values.get(e) for e in rungs})
        for name in SCORES:
            row.update({f"{name}@{e}ep": trial.user_attrs.get(f"scores@{e}", {}).get(name) for e in rungs})
        rows.append(row)
    return rows
