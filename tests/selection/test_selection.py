"""The selection phase's logic: candidates, rungs, halving, resume (fast: a deterministic trainer).

The end-to-end selection with real training on digits, and its SIGKILL resume, are in test_pipeline.py
and test_robustness.py.
"""
import math
import random

import optuna
import pytest
from optuna.trial import TrialState

from nasloc.arch import Arch
from nasloc.errors import NaslocError
from nasloc.search.study import SEED_DESIGN_ATTR
from nasloc.selection.candidates import Candidate, search_candidates
from nasloc.selection.halving import (
    SelectionResult,
    SynchronousHalvingPruner,
    finalists,
    leading_ties,
    ranking,
    rung_epochs,
    selection_result,
    tied_note,
)
from nasloc.selection.scores import Curve
from nasloc.selection.study import run_selection, selection_rows
from nasloc.space.flops import count
from nasloc.space.search_space import SearchSpace

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def space():
    return SearchSpace.load("tiny")


def archs(space, n, seed=0):
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        arch = space.sample(rng)
        if arch.to_json() not in seen:
            seen.add(arch.to_json())
            out.append(arch)
    return out


def curve(top1, epochs):
    """A learning curve that ends at ``top1`` after ``epochs`` epochs, each of training loss 1."""
    return Curve((1.0,) * epochs, (top1,), schedule_epochs=epochs)


class Trainer:
    """A deterministic stand-in for training: candidate i scores quality[i] * epochs; records every call."""

    def __init__(self, quality):
        self.quality, self.calls = quality, []

    def __call__(self, number, candidate, epochs):
        self.calls.append((candidate.source, epochs))
        return curve(self.quality[candidate.source] * epochs, epochs)


def test_rungs_double_up_to_the_last():
    assert rung_epochs(1) == [1]
    assert rung_epochs(4) == [1, 2, 4]
    assert rung_epochs(5) == [1, 2, 4, 5]
    assert rung_epochs(9, 3) == [1, 3, 9]
    with pytest.raises(ValueError, match="select epochs"):
        rung_epochs(0)


def test_successive_halving_keeps_the_better_half_at_each_rung(space):
    cands = [Candidate(f"c{i}", a, i) for i, a in enumerate(archs(space, 8))]
    quality = {f"c{i}": q for i, q in enumerate([5, 1, 7, 3, 8, 2, 6, 4])}
    trainer = Trainer(quality)
    result = run_selection(cands, trainer, optuna.storages.InMemoryStorage(), max_epochs=4, say=lambda m: None)
    trials = result.study.get_trials()
    states = {t.user_attrs["source"]: t.state for t in trials}
    assert [s for s, st in states.items() if st == TrialState.COMPLETE] == ["c2", "c4"]  # the best two of 8
    assert sum(st == TrialState.PRUNED for st in states.values()) == 6
    # rung 1: all 8; rung 2: best 4 (c4, c2, c6, c0); rung 4: best 2
    assert [e for _, e in trainer.calls].count(1) == 8
    assert sorted(s for s, e in trainer.calls if e == 2) == ["c0", "c2", "c4", "c6"]
    assert sorted(s for s, e in trainer.calls if e == 4) == ["c2", "c4"]
    best = ranking(result.study)
    assert [t.user_attrs["source"] for t in best[:3]] == ["c4", "c2", "c6"]
    assert best[0].intermediate_values == {1: 8, 2: 16, 4: 32}
    rows = selection_rows(result.study)
    assert rows[0]["source"] == "c4" and rows[0]["score@4ep"] == 32 and rows[-1]["score@2ep"] is None
    assert rows[0]["val@4ep"] == 32 and rows[0]["tse@4ep"] == -4.0  # every score of the curve beside it


def test_halving_decision_does_not_depend_on_the_order_of_calls(space):
    """Optuna's own SuccessiveHalvingPruner (ASHA) lets the first reporter through; this one ranks the cohort."""
    study = optuna.create_study(direction="maximize", pruner=SynchronousHalvingPruner([1, 2]))
    trials = [study.ask() for _ in range(4)]
    for trial, value in zip(trials, [1.0, 4.0, 3.0, 2.0]):
        trial.report(value, 1)
    assert [t.should_prune() for t in trials] == [True, False, False, True]
    assert [t.should_prune() for t in reversed(trials)] == [True, False, False, True]


def test_a_rerun_resumes_without_training_a_reported_rung_again(space, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    cands = [Candidate(f"c{i}", a, i) for i, a in enumerate(archs(space, 4))]
    quality = {"c0": 1, "c1": 2, "c2": 3, "c3": 4}

    class Crash(Exception):
        pass

    def crashing(number, candidate, epochs):
        if epochs == 2:
            raise Crash
        return Trainer(quality)(number, candidate, epochs)

    with pytest.raises(Crash):
        run_selection(cands, crashing, storage, max_epochs=2, say=lambda m: None)
    trainer = Trainer(quality)
    result = run_selection(cands[:1], trainer, storage, max_epochs=2, say=lambda m: None)  # candidates are fixed
    assert sorted(trainer.calls) == [("c2", 2), ("c3", 2)]  # rung 1 is not trained again
    assert len(result.study.trials) == 4
    assert [t.user_attrs["source"] for t in ranking(result.study)][:2] == ["c3", "c2"]
    with pytest.raises(ValueError, match="rungs"):
        run_selection(cands, trainer, storage, max_epochs=4, say=lambda m: None)


def test_a_rerun_in_the_middle_of_a_rung_judges_it_only_when_it_is_complete(space, tmp_path):
    # Interrupted after 2 of the 4 survivors of rung 1 reported rung 2 (the two best): the rerun must not judge
    # rung 2 on those two alone (keeping 1 of 2), but on all four once the other two have reported (keeping 2).
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    cands = [Candidate(f"c{i}", a, i) for i, a in enumerate(archs(space, 8))]
    quality = {f"c{i}": q for i, q in enumerate([8, 1, 7, 3, 5, 2, 6, 4])}  # survivors c0, c2, c4, c6

    class Crash(Exception):
        pass

    trained_at_2 = []

    def crashing(number, candidate, epochs):
        if epochs == 2:
            if len(trained_at_2) == 2:
                raise Crash
            trained_at_2.append(candidate.source)
        return Trainer(quality)(number, candidate, epochs)

    with pytest.raises(Crash):
        run_selection(cands, crashing, storage, max_epochs=4, say=lambda m: None)
    assert trained_at_2 == ["c0", "c2"]
    trainer = Trainer(quality)
    result = run_selection(cands, trainer, storage, max_epochs=4, say=lambda m: None)
    assert trainer.calls == [("c4", 2), ("c6", 2), ("c0", 4), ("c2", 4)]
    complete = [t.user_attrs["source"] for t in result.study.get_trials() if t.state == TrialState.COMPLETE]
    assert sorted(complete) == ["c0", "c2"]  # as without the interruption


def test_search_candidates_cover_the_upper_budget_and_add_the_seed_designs(space):
    study = optuna.create_study(directions=["maximize", "minimize"])
    pool = archs(space, 30, seed=1)
    budget = sorted(count(a).macs for a in pool)[-3]  # a few over budget
    low = min(count(a).macs for a in pool)
    small = min(pool, key=lambda a: count(a).macs)
    for i, arch in enumerate(pool + pool[:2]):  # two archs proposed twice
        macs = count(arch).macs
        attrs = dict(arch=arch.to_dict(), arch_json=arch.to_json(), macs=macs, params=0,
                     top1=100.0 - macs / budget)  # the proxy overrates small archs
        if arch is small and i < len(pool):
            attrs[SEED_DESIGN_ATTR] = "DW shortcut"
        study.add_trial(optuna.trial.create_trial(values=[attrs["top1"], float(macs)], user_attrs=attrs))
    picked = search_candidates(study, budget, 6, low)
    assert len({c.arch.to_json() for c in picked}) == len(picked)
    assert all(count(c.arch).macs <= budget for c in picked)
    upper = [c for c in picked if count(c.arch).macs >= low + 2 * (budget - low) / 3]
    assert len(upper) >= 2  # a plain top-6 by proxy would hold only the smallest archs
    assert [c.source for c in picked].count("DW shortcut") == 1  # the seed design, by its name
    assert len(picked) == 6 + 1  # --select-top-k searched archs, and the seed design on top
    by_source = {c.source: c for c in picked}
    assert by_source["DW shortcut"].arch == small
    assert all(c.source == str(c.trial) for c in picked if c.source != "DW shortcut")


def test_a_candidate_that_diverges_is_pruned_and_the_others_go_on(space):
    cands = [Candidate(f"c{i}", a, i) for i, a in enumerate(archs(space, 3))]
    trainer = Trainer({"c0": math.nan, "c1": 2, "c2": 1})  # c0's loss became NaN (RungTrainer returns NaN)
    result = run_selection(cands, trainer, optuna.storages.InMemoryStorage(), max_epochs=2, say=lambda m: None)
    states = {t.user_attrs["source"]: t.state for t in result.study.trials}
    assert states == {"c0": TrialState.PRUNED, "c1": TrialState.COMPLETE, "c2": TrialState.COMPLETE}


class FailingTrainer:
    """Picklable factory of a deterministic trainer (Ray workers build it) whose ``fail`` candidate crashes."""

    def __init__(self, quality, fail=None):
        self.quality, self.fail = quality, fail

    def __call__(self):
        return self

    def train(self, number, candidate, epochs):
        if candidate.source == self.fail:
            raise RuntimeError(f"{candidate.source} ran out of memory")
        return curve(self.quality[candidate.source] * epochs, epochs)


@pytest.mark.timeout(300)
def test_ray_selection_ranks_a_diverged_candidate_last_and_keeps_a_crashed_one_for_the_rerun(space, tmp_path):
    """ASHA would keep a NaN going (NaN < cutoff is False) and took a crash for a stop; here the diverged
    candidate is pruned, the crashed one stays in the race with an error naming it, and the rerun retries it."""
    pytest.importorskip("ray")
    import sys

    import ray.cloudpickle

    from nasloc.search.ray import ray_session
    from nasloc.selection.ray import run_ray_selection

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers can't import tests/
    cands = [Candidate(f"c{i}", a, i) for i, a in enumerate(archs(space, 4))]
    quality = {"c0": 2, "c1": 1, "c2": math.nan, "c3": 3}
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/selection.db")

    def select(fail):
        factory = FailingTrainer(quality, fail)
        return run_ray_selection(cands, lambda: factory().train, storage, max_epochs=2, max_concurrent=1,
                                 results_dir=tmp_path / "ray", say=lambda m: None)

    with ray_session(None, 1):  # one Ray for both runs (each run would start and stop its own)
        with pytest.raises(RuntimeError, match=r"1 of the selection's Ray trials failed \(selection trial 3: "
                                               r"RuntimeError: c3 ran out of memory\)"):
            select(fail="c3")
        states = {t.user_attrs["source"]: t.state
                  for t in optuna.load_study(study_name="selection", storage=storage).trials}
        assert states == {"c0": TrialState.COMPLETE, "c1": TrialState.PRUNED, "c2": TrialState.PRUNED,
                          "c3": TrialState.RUNNING}
        result = select(fail=None)
    assert [t.user_attrs["source"] for t in result.ranking][:2] == ["c3", "c0"]
    assert {t.user_attrs["source"]: t.state for t in result.study.trials}["c3"] == TrialState.COMPLETE


@pytest.mark.parametrize("init", ["scratch", "supernet"])
def test_rung_trainer_trains_a_candidate_and_resumes_its_checkpoint(space, tmp_path, init):
    from nasloc.selection.trainer import RungTrainer, SelectionConfig
    from nasloc.supernet.supernet import Supernet
    from nasloc.training.data import load_dataset

    splits = load_dataset("digits", None, img_size=16)
    supernet = Supernet(space.for_classes(splits.num_classes), img_size=16)
    trainer = RungTrainer(supernet, splits, SelectionConfig(epochs=2, init=init, batch_size=64),
                          lambda number: tmp_path / f"trial_{number}", device="cpu")
    candidate = Candidate("c", archs(space, 1)[0].replace(num_classes=splits.num_classes), 0)
    first = trainer(3, candidate, 1)  # selection trial 3 trains search trial 0, in the folder of search trial 0
    assert len(first.val_top1) == 1 and 0 <= first.val_top1[0] <= 100 and (tmp_path / "trial_0" / "last.pth").is_file()
    assert trainer(3, candidate, 1) == first  # the rung is read back from the checkpoint, not trained again
    second = trainer(3, candidate, 2)
    assert second.first(1) == first and len(second.train_loss) == 2 and 0 <= second.val_top1[1] <= 100


def test_rung_trainer_refuses_an_unknown_start(space):
    from nasloc.selection.trainer import RungTrainer, SelectionConfig

    with pytest.raises(ValueError, match="selection init"):
        RungTrainer(None, None, SelectionConfig(init="pretrained"), lambda n: n)


def test_a_folder_of_another_arch_is_moved_aside_not_resumed(space, tmp_path):
    """A run folder shared by two studies (a rerun with another --storage): selection trial 0 of the second
    study is another arch than trial 0 of the first, whose checkpoint would not even load."""
    from nasloc.selection.trainer import RungTrainer, SelectionConfig
    from nasloc.supernet.supernet import Supernet
    from nasloc.training.data import load_dataset

    splits = load_dataset("digits", None, img_size=16)
    supernet = Supernet(space.for_classes(splits.num_classes), img_size=16)
    trainer = RungTrainer(supernet, splits, SelectionConfig(epochs=1, batch_size=64), lambda n: tmp_path / f"trial_{n}",
                          device="cpu")
    first, second = (Candidate("c", a.replace(num_classes=10), 0) for a in archs(space, 2, seed=3))
    trainer(0, first, 1)
    with pytest.warns(UserWarning, match="another arch; moved it to trial_0.other-arch-1"):
        assert 0 <= trainer(0, second, 1).val_top1[-1] <= 100
    assert Arch.from_json((tmp_path / "trial_0.other-arch-1" / "arch.json").read_text()) == supernet.at_resolution(first.arch)
    assert (tmp_path / "trial_0.other-arch-1" / "last.pth").is_file()


# ------------------------------------------------------------------------------- ties at the last rung
def _ranked(*scores: tuple[str, dict[int, float]]) -> list:
    return [optuna.trial.create_trial(state=TrialState.PRUNED, intermediate_values=values, user_attrs={"source": source})
            for source, values in scores]


# The NSGA-II selection of the CIFAR-10 evidence: four finalists within 1.5 points after 4 epochs on 2,500 images,
# with their MMACs; after 10 epochs (and after 30) they finished in the order 49, 22, 53, 36, the reverse of these
# scores (and in the replicate search, in neither the order of the scores nor that of the MACs).
EVIDENCE_SCORES = [("36", {1: 41.72, 2: 48.36, 4: 53.44}, 24.8), ("22", {1: 41.6, 2: 48.84, 4: 52.44}, 25.7),
                   ("49", {1: 38.28, 2: 45.72, 4: 52.24}, 29.0), ("53", {1: 38.72, 2: 46.68, 4: 51.96}, 25.4),
                   ("DilateFormer", {1: 37.48, 2: 44.32}, 28.8)]
EVIDENCE = _ranked(*((source, values) for source, values, _ in EVIDENCE_SCORES))


def test_scores_within_two_standard_errors_of_the_best_lead_together():
    assert leading_ties([53.44, 52.44, 52.24, 51.96], held_out=2500) == 4  # 2 SE of a difference: 2.8 points
    assert leading_ties([53.44, 52.44, 52.24, 51.96], held_out=1_000_000) == 1  # SE 0.07 points
    assert leading_ties([53.08, 52.36, 50.48, 50.20], held_out=2500) == 3  # 2.88 points behind: out
    assert leading_ties([60.0, 50.0, 49.9], held_out=2500) == 1  # 10 points: 7 SE
    assert leading_ties([50.0, math.nan, 49.9], held_out=2500) == 1  # a diverged candidate is never tied
    assert leading_ties([50.0, 49.9], held_out=0) == 1  # no held-out size: no ties
    assert leading_ties([], held_out=2500) == 0


def _selection_study(rows, held_out):
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("held_out", held_out)
    for source, values, mmacs in rows:
        last = max(values)
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.COMPLETE if last == 4 else TrialState.PRUNED, value=values[last] if last == 4 else None,
            intermediate_values=values, user_attrs=dict(source=source, arch={}, macs=int(mmacs * 1e6))))
    return study


def test_the_ranking_is_by_score_and_the_finalists_take_the_whole_tie():
    study = _selection_study(EVIDENCE_SCORES, held_out=2500)
    assert [t.user_attrs["source"] for t in ranking(study)] == ["36", "22", "49", "53", "DilateFormer"]

    def names(held_out, top_k):
        study.set_user_attr("held_out", held_out)
        return [t.user_attrs["source"] for t in finalists(selection_result(study), top_k)]
    assert names(2500, 2) == ["36", "22", "49", "53"]  # all four tied: the retraining decides, not the 4-epoch order
    assert names(2500, 1) == ["36", "22", "49", "53"]
    assert names(2500, 5) == ["36", "22", "49", "53", "DilateFormer"]  # --retrain-top-k beyond the tie
    assert names(2500, 0) == []  # no retraining
    assert names(1_000_000, 2) == ["36", "22"]  # every difference decided: the first --retrain-top-k
    assert names(0, 2) == ["36", "22"]  # no held-out size: no ties


def test_a_selection_keeps_its_held_out_size_and_its_finalists_on_resume(space, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    cands = [Candidate(f"c{i}", a, i) for i, a in enumerate(archs(space, 4, seed=5))]
    macs = {c.source: count(c.arch).macs for c in cands}
    small, large = sorted(["c0", "c1"], key=macs.get)
    assert macs[small] < macs[large]
    quality = {small: 25.0, large: 24.8, "c2": 10.0, "c3": 5.0}  # the two finalists 0.4 points apart at 2 epochs
    result = run_selection(cands, Trainer(quality), storage, max_epochs=2, held_out=2500, say=lambda m: None)
    assert [t.user_attrs["source"] for t in result.ranking] == [small, large, "c2", "c3"]
    assert [t.user_attrs["source"] for t in finalists(result, 1)] == [small, large]  # tied: both retrained
    assert result.held_out == 2500
    again = run_selection(cands, Trainer(quality), storage, max_epochs=2, say=lambda m: None)  # resumed, size kept
    assert again.held_out == 2500  # the size the ties were judged on, so a rerun retrains the same finalists
    assert [t.user_attrs["source"] for t in finalists(again, 1)] == [small, large]
    assert selection_rows(again.study)[0]["source"] == small


def test_the_note_names_the_ties_and_says_that_all_of_them_are_retrained():
    selection = SelectionResult(study=None, ranking=EVIDENCE, held_out=2500)
    note = tied_note(selection, 2)
    assert "ranks 1-4 scored within 2 standard errors of the best after 4 epochs on 2500 held-out" in note
    assert note.endswith("so all 4 are retrained (--retrain-top-k 2 and the tie)")
    assert tied_note(selection, 4).endswith("so all 4 are retrained")
    assert tied_note(selection, 0).endswith("none is retrained (--retrain-top-k 0)")
    assert tied_note(SelectionResult(None, EVIDENCE, held_out=1_000_000), 2) == ""
    assert tied_note(SelectionResult(None, EVIDENCE, held_out=0), 2) == ""
    assert tied_note(SelectionResult(None, _ranked(("1", {4: 50.0}), ("2", {4: math.nan})), held_out=2500), 1) == ""


def test_rung_trainer_trains_on_the_retrain_schedule_or_on_one_that_ends_with_each_rung(space, tmp_path):
    from nasloc.selection.trainer import RungTrainer, SelectionConfig
    from nasloc.supernet.supernet import Supernet
    from nasloc.training.checkpoint import load_checkpoint
    from nasloc.training.data import load_dataset

    splits = load_dataset("digits", None, img_size=16)
    supernet = Supernet(space.for_classes(splits.num_classes), img_size=16)
    candidate = Candidate("c", archs(space, 1)[0].replace(num_classes=splits.num_classes), 0)

    def trainer(score, folder):
        config = SelectionConfig(epochs=2, schedule_epochs=6, score=score, batch_size=64)
        return RungTrainer(supernet, splits, config, lambda n: tmp_path / folder / f"trial_{n}", device="cpu")

    def schedule(path):
        return load_checkpoint(path, keys=("cfg",))["cfg"]["epochs"]

    on_the_retrain = trainer("tse", "retrain")(0, candidate, 2)  # the first 2 epochs of the 6-epoch retrain
    assert on_the_retrain.schedule_epochs == 6 and len(on_the_retrain.train_loss) == 2
    assert schedule(tmp_path / "retrain" / "trial_0" / "last.pth") == 6
    complete = trainer("complete", "complete")
    one, two = complete(0, candidate, 1), complete(0, candidate, 2)  # each rung a training of its own
    assert (one.schedule_epochs, len(one.val_top1), two.schedule_epochs, len(two.val_top1)) == (1, 1, 2, 2)
    assert [schedule(tmp_path / "complete" / "trial_0" / f"rung_{e}" / "last.pth") for e in (1, 2)] == [1, 2]


def test_a_rerun_keeps_the_score_the_selection_was_started_with(space, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    cands = [Candidate(f"c{i}", a, i) for i, a in enumerate(archs(space, 2))]
    trainer = Trainer({"c0": 1, "c1": 2})
    result = run_selection(cands, trainer, storage, max_epochs=1, score="tse", schedule_epochs=5, say=lambda m: None)
    assert result.study.user_attrs["score"] == "tse" and result.study.user_attrs["schedule_epochs"] == 5
    assert [t.intermediate_values[1] for t in result.study.trials] == [-1.0, -1.0]  # minus the training losses
    with pytest.raises(NaslocError, match="started with score tse, not val; use the same --select-score"):
        run_selection(cands, trainer, storage, max_epochs=1, score="val", say=lambda m: None)
    from nasloc.selection.study import stored_schedule
    assert stored_schedule(optuna.storages.RDBStorage(storage)) == 5
