"""The search engine on real Optuna storages (SQLite, journal file), real worker processes and a real local Ray.

The evaluator is a cheap deterministic stand-in (50 + params / 1e4); the supernet evaluator is tested elsewhere.
"""
from __future__ import annotations

import math
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from nasloc.arch import Arch
from nasloc.search.engine import _Budgeted, run_search
from nasloc.search.objective import CONSTRAINT, EvaluationError, Objective, arch_params
from nasloc.search.sampler import TrialSeededSampler, make_sampler
from nasloc.search.study import SEED_DESIGN_ATTR, open_study, pareto_trials
from nasloc.space.flops import count
from nasloc.space.search_space import SearchSpace
from nasloc.space.seed_designs import reference_archs
from nasloc.storage.factory import open_storage

SPACE = SearchSpace.load("tiny")
LOW, HIGH = SPACE.macs_range()
BUDGET = 900_000  # about half of the tiny space's archs are within it
REPO = Path(__file__).resolve().parents[2]
SEEDS = reference_archs(SPACE, BUDGET)  # the seed designs at the budget: 6 in the tiny space


class CostProxy:
    """Picklable stand-in evaluator that counts its calls; ``nan_at`` makes that call return NaN."""

    def __init__(self, nan_at: int | None = None, interrupt_at: int | None = None):
        self.calls, self.nan_at, self.interrupt_at = 0, nan_at, interrupt_at

    def __call__(self, arch: Arch) -> float:
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        if self.calls == self.nan_at:
            return math.nan
        return 50 + count(arch).params / 1e4


def search(storage, n_trials: int, evaluate=None, **kw) -> optuna.Study:
    kw.setdefault("budget_macs", BUDGET)
    kw.setdefault("study_name", "s")
    kw.setdefault("progress", False)
    return run_search(SPACE, evaluate or CostProxy(), storage=storage, n_trials=n_trials, **kw)


def states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.trials]


# ------------------------------------------------------------------------------------------- sampler
def test_make_sampler():
    assert isinstance(make_sampler("nsga2", 0, population_size=6), optuna.samplers.NSGAIISampler)
    assert isinstance(make_sampler("tpe", 0), optuna.samplers.TPESampler)
    assert isinstance(make_sampler("random", 0), optuna.samplers.RandomSampler)
    with pytest.raises(ValueError, match="nsga2, tpe, random"):
        make_sampler("cmaes", 0)
    with pytest.raises(ValueError, match="nsga2, tpe, random"):
        TrialSeededSampler("grid", 0)


# ------------------------------------------------------------------------------------------- constraint
def test_constraint_is_set_and_infeasible_archs_are_not_evaluated(tmp_path):
    # A plain uniform sampler (run_search's feasible start would keep every trial within budget).
    evaluate = CostProxy()
    study = open_study(f"sqlite:///{tmp_path}/study.db", "s", objectives=("top1", "macs"), budget_macs=BUDGET,
                       sampler=make_sampler("random", 3))
    study.optimize(Objective(SPACE, evaluate, budget_macs=BUDGET), n_trials=16)
    trials = study.trials
    assert states(study) == ["COMPLETE"] * 16
    feasible = [t for t in trials if t.user_attrs["macs"] <= BUDGET]
    assert 0 < len(feasible) < 16, "the budget should split the tiny space"
    assert evaluate.calls == len(feasible)  # over-budget archs cost nothing
    assert study.metric_names == ["top1", "macs"]
    for t in trials:
        arch = Arch.from_dict(t.user_attrs["arch"])
        assert Arch.from_json(t.user_attrs["arch_json"]) == arch
        assert t.user_attrs["macs"] == count(arch).macs and t.user_attrs["params"] == count(arch).params
        assert t.constraints == {CONSTRAINT: t.user_attrs["macs"] - BUDGET}
        if t in feasible:
            assert t.user_attrs["evaluated"] is True and t.values[0] == t.user_attrs["top1"] > 50
        else:
            assert t.user_attrs["evaluated"] is False and "top1" not in t.user_attrs and t.values[0] == 0.0
        assert t.values[1] == t.user_attrs["macs"]

    front = pareto_trials(study, BUDGET)
    assert front and all(t.user_attrs["macs"] <= BUDGET for t in front)
    assert [t.user_attrs["macs"] for t in front] == sorted(t.user_attrs["macs"] for t in front)
    for t in front:  # nothing feasible dominates a front member
        assert not any(o.user_attrs["top1"] >= t.user_attrs["top1"] and o.user_attrs["macs"] <= t.user_attrs["macs"]
                       and (o.user_attrs["top1"], o.user_attrs["macs"]) != (t.user_attrs["top1"], t.user_attrs["macs"])
                       for o in feasible)
    for o in feasible:  # and every feasible trial is dominated by (or equal to) a front member
        assert any(t.user_attrs["top1"] >= o.user_attrs["top1"] and t.user_attrs["macs"] <= o.user_attrs["macs"]
                   for t in front)
    tighter = min(t.user_attrs["macs"] for t in front)
    assert [t.number for t in pareto_trials(study, tighter)] == [front[0].number]


@pytest.mark.parametrize("sampler, n_trials", [("random", 12), ("tpe", 10), ("nsga2", 14)])
def test_random_phase_and_nsga2_children_stay_within_budget(tmp_path, sampler, n_trials):
    tight = LOW + 0.1 * (HIGH - LOW)
    rng = random.Random(0)
    uniform = [count(SPACE.sample(rng)).macs <= tight for _ in range(200)]
    assert sum(uniform) < 0.5 * len(uniform), "the budget should reject most uniform archs"
    evaluate = CostProxy()
    # TPE: its whole random phase; NSGA-II: a first population of 6 (feasible start), then children (repaired)
    study = search(f"sqlite:///{tmp_path}/study.db", n_trials, evaluate, budget_macs=tight, sampler=sampler,
                   population_size=6 if sampler == "nsga2" else None)
    assert states(study) == ["COMPLETE"] * n_trials and evaluate.calls == n_trials
    for t in study.trials:
        arch = Arch.from_dict(t.user_attrs["arch"])
        assert t.user_attrs["macs"] <= tight and t.user_attrs["evaluated"] is True
        assert SPACE.suggest(optuna.trial.FixedTrial(t.params)) == arch  # the stored genes are the evaluated arch
    assert len({t.user_attrs["arch_json"] for t in study.trials}) > n_trials // 2


def test_nsga2_first_generation_outlasting_its_population_still_starts_within_budget(tmp_path):
    """A failed trial in NSGA-II's first generation makes that generation take one more trial number than the
    population: that trial, too, is drawn within the budget (NSGA-II proposes nothing until a population
    has finished)."""
    tight = LOW + 0.1 * (HIGH - LOW)
    evaluate = CostProxy(nan_at=2)
    study = search(f"sqlite:///{tmp_path}/study.db", 12, evaluate, budget_macs=tight, sampler="nsga2",
                   population_size=6)
    assert states(study).count("FAIL") == 1 and evaluate.calls == 12
    for t in study.trials:
        assert t.user_attrs["macs"] <= tight and t.user_attrs["evaluated"] is True, t.number


def test_objective_orders_values_and_skips_latency_over_budget(tmp_path):
    measured = []
    objective = Objective(SPACE, CostProxy(), budget_macs=BUDGET, objectives=("macs", "top1", "params", "latency"),
                          latency=lambda arch: measured.append(arch) or 1.5)
    study = optuna.create_study(storage=open_storage(tmp_path / "j.log"), study_name="o",
                                directions=["minimize", "maximize", "minimize", "minimize"],
                                sampler=make_sampler("random", 0))
    study.optimize(objective, n_trials=8)
    for t in study.trials:
        macs, top1, params, latency = t.values
        assert macs == t.user_attrs["macs"] and params == t.user_attrs["params"]
        if t.user_attrs["evaluated"]:
            assert top1 == t.user_attrs["top1"] and latency == t.user_attrs["latency"] == 1.5
        else:
            assert top1 == 0.0 and latency == math.inf
    assert len(measured) == sum(t.user_attrs["evaluated"] for t in study.trials)
    clone = pickle.loads(pickle.dumps(Objective(SPACE, CostProxy(), budget_macs=BUDGET)))  # for other processes
    assert clone.space == SPACE and clone.objectives == ("top1", "macs")
    with pytest.raises(ValueError, match="latency"):
        Objective(SPACE, CostProxy(), budget_macs=BUDGET, objectives=("top1", "latency"))
    with pytest.raises(ValueError, match="choose distinct names"):
        Objective(SPACE, CostProxy(), budget_macs=BUDGET, objectives=("top1", "flops"))


# ------------------------------------------------------------------------------------------- warm start
def seed_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in sorted(study.trials, key=lambda t: t.number) if SEED_DESIGN_ATTR in t.user_attrs]


def test_warm_start_makes_the_seed_designs_the_first_nsga2_population(tmp_path):
    assert len(SEEDS) == 6
    storage = tmp_path / "study.log"
    study = search(storage, 10, sampler="nsga2", population_size=8, warm_start=SEEDS)
    first = sorted(study.trials, key=lambda t: t.number)[: len(SEEDS)]
    assert seed_trials(study) == first
    assert [t.user_attrs[SEED_DESIGN_ATTR] for t in first] == list(SEEDS)
    assert [Arch.from_dict(t.user_attrs["arch"]) for t in first] == list(SEEDS.values())
    for trial, arch in zip(first, SEEDS.values()):
        assert trial.params == arch_params(SPACE, arch)
        assert SPACE.suggest(optuna.trial.FixedTrial(trial.params)) == arch  # the stored genes rebuild the seed arch
        assert trial.state == TrialState.COMPLETE and trial.user_attrs["evaluated"] is True
        assert trial.system_attrs["NSGAIISampler:generation"] == 0

    study = search(storage, 16, sampler="nsga2", population_size=8, warm_start=SEEDS)  # resumed: not queued again
    assert len(study.trials) == 16 and seed_trials(study) == first
    assert states(study) == ["COMPLETE"] * 16
    # Generation 0 held exactly 8 trials, so all of them, the seed designs included, are the children's parents.
    journal = open_storage(storage)
    parents = set(journal.get_study_system_attrs(journal.get_study_id_from_name("s"))["NSGAIISampler:parent:1"])
    assert {t._trial_id for t in first} <= parents


def test_the_dilateformer_seed_design_is_dilated_in_two_stages_and_global_after_as_published():
    arch = reference_archs(SearchSpace.load("imagenet"), 0.7e9)["DilateFormer"]  # a three-stage pyramid
    mixers = [{b.mixer for _, s, _, b in arch.iter_blocks() if s == stage} for stage in range(len(arch.stages))]
    assert mixers == [{"dilated"}, {"dilated"}, {"global"}] and arch.cpe


def test_warm_start_counts_towards_the_trials(tmp_path):
    study = search(tmp_path / "study.log", 3, sampler="random", warm_start=SEEDS)
    assert [t.user_attrs[SEED_DESIGN_ATTR] for t in study.trials] == list(SEEDS)[:3]
    assert states(study) == ["COMPLETE"] * 3  # nothing left queued


def test_arch_params_refuse_an_arch_the_space_cannot_build():
    other = SearchSpace.load("tiny_columnar")
    arch = other.sample(random.Random(0))
    with pytest.raises(ValueError, match="gene s0"):
        arch_params(SPACE, arch)


# ------------------------------------------------------------------------------------------- resume, failures
def test_resume_finished_and_interrupted_studies(tmp_path):
    storage = str(tmp_path / "study.log")
    study = search(storage, 6, sampler="random")
    assert len(study.trials) == 6
    first = [t.user_attrs["arch_json"] for t in study.trials]

    again = CostProxy()
    study = search(storage, 6, again, sampler="random")  # finished: nothing to do
    assert len(study.trials) == 6 and again.calls == 0

    with pytest.raises(KeyboardInterrupt):  # Ctrl-C during the 2nd evaluation of the resumed run
        search(storage, 14, CostProxy(interrupt_at=2), sampler="random")
    interrupted = optuna.load_study(study_name="s", storage=open_storage(storage))
    assert 6 < len(interrupted.trials) < 14 and interrupted.trials[-1].state == TrialState.FAIL

    study = search(storage, 14, sampler="random")
    numbers = [t.number for t in study.trials]
    assert numbers == list(range(14))
    assert sum(t.state == TrialState.FAIL for t in study.trials) == 1
    assert states(study).count("COMPLETE") == 13
    resumed = [t.user_attrs["arch_json"] for t in study.trials[6:] if "arch_json" in t.user_attrs]
    assert not set(resumed) & set(first), "a resumed study must not replay the suggestions of its first trials"


def test_resume_refuses_another_budget_or_objectives(tmp_path):
    storage = open_storage(tmp_path / "study.log")
    search(storage, 2)
    with pytest.raises(ValueError, match="budget"):
        search(storage, 4, budget_macs=BUDGET + 1)
    with pytest.raises(ValueError, match="objectives"):
        search(storage, 4, objectives=("top1", "params"))


def test_nan_accuracy_fails_the_trial_and_the_search_goes_on(tmp_path):
    study = search(tmp_path / "study.log", 8, CostProxy(nan_at=2), budget_macs=HIGH)
    assert [t.number for t in study.trials] == list(range(8))
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].number == 1
    assert "nan" in failed[0].user_attrs["fail_reason"] and failed[0].values is None
    assert states(study).count("COMPLETE") == 7
    assert issubclass(EvaluationError, RuntimeError)


def test_a_worker_that_loses_the_race_for_the_last_trial_prunes_it(tmp_path):
    # Two workers asked for trial 3 of 3 at once; the one given the higher number must not run it.
    study = search(tmp_path / "study.log", 3)
    study.optimize(_Budgeted(Objective(SPACE, CostProxy(), budget_macs=BUDGET), 3), n_trials=5)
    assert states(study) == ["COMPLETE"] * 3 + ["PRUNED"]  # and the worker stopped at once
    assert study.trials[3].user_attrs["surplus"] is True and not study.trials[3].params


def test_threads_in_one_process(tmp_path):
    study = search(tmp_path / "study.log", 8, workers=2)
    assert sorted(t.number for t in study.trials) == list(range(8)) and states(study) == ["COMPLETE"] * 8


# ------------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("sampler, n_trials", [("nsga2", 8), ("tpe", 12), ("random", 8)])
def test_same_seed_same_archs(tmp_path, sampler, n_trials):
    # NSGA-II with a population of 4 makes children from generation 1 on; TPE models after 10 random trials.
    kw = dict(sampler=sampler, population_size=4 if sampler == "nsga2" else None)
    runs = [search(storage, n_trials, seed=seed, **kw) for storage, seed in
            ((f"sqlite:///{tmp_path}/a.db", 7), (f"sqlite:///{tmp_path}/b.db", 7), (tmp_path / "c.log", 8))]
    archs = [[t.user_attrs["arch_json"] for t in study.trials] for study in runs]
    assert archs[0] == archs[1]
    assert archs[0] != archs[2]
    assert [t.params for t in runs[0].trials] == [t.params for t in runs[1].trials]


# ------------------------------------------------------------------------------------------- processes
WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from nasloc.space.flops import count
    from nasloc.search.engine import run_search
    from nasloc.space.search_space import SearchSpace
    from nasloc.storage.factory import open_storage

    storage, mode, me = sys.argv[1], sys.argv[2], sys.argv[3]
    space = SearchSpace.load("tiny")
    done = Path(storage).parent / f"evaluated-{me}"

    def evaluate(arch):
        if mode == "hang":
            time.sleep(3600)
        with open(done, "a") as f:
            f.write("x")
        time.sleep(0.1)
        return 50 + count(arch).params / 1e4

    if mode == "pair":  # start together, so that both really share the work
        Path(storage).parent.joinpath(f"ready-{me}").touch()
        deadline = time.time() + 600
        while len(list(Path(storage).parent.glob("ready-*"))) < 2 and time.time() < deadline:
            time.sleep(0.05)
    kw = dict(heartbeat_interval=1, grace_period=2) if mode == "hang" else {}
    run_search(space, evaluate, budget_macs=space.macs_range()[1], storage=open_storage(storage, **kw),
               study_name="s", n_trials=int(sys.argv[4]), sampler="random", seed=0, progress=False)
""")


def _start(tmp_path: Path, *args: object) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_worker_processes_share_one_journal_file(tmp_path):
    storage = tmp_path / "study.log"
    workers = [_start(tmp_path, storage, "pair", me, 16) for me in (1, 2)]
    for worker in workers:
        out, _ = worker.communicate(timeout=900)
        assert worker.returncode == 0, out
    study = optuna.load_study(study_name="s", storage=open_storage(storage))
    counted = [t for t in study.trials if t.state != TrialState.PRUNED]  # PRUNED = a lost race, not counted
    assert len(counted) == 16 and all(t.state == TrialState.COMPLETE for t in counted)
    numbers = [t.number for t in study.trials]
    assert len(set(numbers)) == len(numbers)
    shares = [len((tmp_path / f"evaluated-{me}").read_text()) for me in (1, 2)]
    assert sum(shares) == 16 and min(shares) > 0, shares
    assert len({t.user_attrs["arch_json"] for t in counted}) > 12, "workers with one seed must not repeat archs"


def test_a_killed_worker_s_trial_is_marked_fail_by_the_next_run(tmp_path):
    # Both storages at once: the worker processes spend most of their time importing torch.
    storages = {"sqlite": f"sqlite:///{tmp_path}/sqlite/study.db", "journal": str(tmp_path / "journal/study.log")}
    for name in storages:
        (tmp_path / name).mkdir()
    workers = {name: _start(tmp_path, url, "hang", 0, 3) for name, url in storages.items()}
    try:
        for name, url in storages.items():
            deadline = time.time() + 240
            while True:  # wait until its first trial is running (and sending heartbeats)
                assert workers[name].poll() is None, workers[name].communicate()[0]
                try:
                    study = optuna.load_study(study_name="s", storage=open_storage(url))
                    if [t.state for t in study.trials] == [TrialState.RUNNING]:
                        break
                except KeyError:
                    pass  # the study is not created yet
                assert time.time() < deadline, "the worker never started a trial"
                time.sleep(0.5)
        time.sleep(1.5)
    finally:
        for worker in workers.values():
            worker.send_signal(signal.SIGKILL)
            worker.wait()
    time.sleep(3.5)  # > the grace period since the last heartbeat (SQLite's clock has 1 s steps)
    for name, url in storages.items():
        study = search(open_storage(url, heartbeat_interval=1, grace_period=2), 3, budget_macs=HIGH)
        assert states(study) == ["FAIL", "COMPLETE", "COMPLETE"], name


# ------------------------------------------------------------------------------------------- Ray
class NanAt:
    """Stand-in evaluator that returns NaN for archs of exactly ``macs`` MACs."""

    def __init__(self, macs: int):
        self.macs = macs

    def __call__(self, arch: Arch) -> float:
        cost = count(arch)
        return math.nan if cost.macs == self.macs else 50 + cost.params / 1e4


class Factory:
    """What a real factory does in a Ray worker: build the evaluator (load a checkpoint) there."""

    def __init__(self, nan_macs: int):
        self.nan_macs = nan_macs

    def __call__(self):
        return NanAt(self.nan_macs)


def test_ray_backend_fills_the_same_study(tmp_path):
    pytest.importorskip("ray")
    import ray.cloudpickle

    from nasloc.search.ray import run_ray_search

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers can't import tests/
    # Trial k's arch depends only on (seed, k, budget) with the random sampler, whatever the backend. Random
    # search stays within budget, so trial 0 is queued: the largest of three archs, over the budget.
    first = sorted(search(tmp_path / "first.log", 3, sampler="random", seed=5, budget_macs=HIGH).trials,
                   key=lambda t: t.user_attrs["macs"])
    large, budget = first[-1].user_attrs["macs"], (first[1].user_attrs["macs"] + first[-1].user_attrs["macs"]) / 2

    def queued(storage) -> optuna.Study:
        study = open_study(storage, "s", objectives=("top1", "macs"), budget_macs=budget)
        study.enqueue_trial(first[-1].params)
        return study

    queued(tmp_path / "preview.log")
    preview = search(tmp_path / "preview.log", 3, sampler="random", seed=5, budget_macs=budget)
    assert preview.trials[0].user_attrs["macs"] == large and len(preview.trials) == 3
    small, middle = sorted(t.user_attrs["macs"] for t in preview.trials[1:])
    assert small < middle <= budget < large
    url = f"sqlite:///{tmp_path}/study.db"
    queued(url)

    run_ray_search(SPACE, Factory(nan_macs=small), budget_macs=budget, storage=url, study_name="s", n_trials=3,
                   sampler="random", seed=5, objectives=("top1", "macs"), max_concurrent=2,
                   results_dir=tmp_path / "ray")
    study = optuna.load_study(study_name="s", storage=open_storage(url))
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.user_attrs["arch_json"] for t in trials] == [t.user_attrs["arch_json"] for t in preview.trials]
    assert study.metric_names == ["top1", "macs"] and study.user_attrs["budget_macs"] == budget
    by_macs = {t.user_attrs["macs"]: t for t in trials}
    for t in trials:
        arch = Arch.from_dict(t.user_attrs["arch"])
        cost = count(arch)
        assert t.user_attrs["macs"] == cost.macs and t.user_attrs["params"] == cost.params
        assert t.constraints == {CONSTRAINT: cost.macs - budget}  # set in the driver, before evaluation
        assert t.user_attrs["backend"] == "ray"
    evaluated, over, nan = by_macs[middle], by_macs[large], by_macs[small]
    assert evaluated.state == TrialState.COMPLETE and evaluated.user_attrs["evaluated"] is True
    assert evaluated.user_attrs["top1"] == pytest.approx(50 + evaluated.user_attrs["params"] / 1e4)
    assert evaluated.values == [evaluated.user_attrs["top1"], middle] and evaluated.user_attrs["eval_seconds"] >= 0
    assert over.state == TrialState.COMPLETE and over.user_attrs["evaluated"] is False
    assert "top1" not in over.user_attrs and over.values == [0.0, large]
    assert nan.state == TrialState.FAIL and "nan" in nan.user_attrs["fail_reason"]
    assert [t.number for t in pareto_trials(study, budget)] == [evaluated.number]

    start = time.time()  # a finished study: nothing to do, and Ray is not even started
    run_ray_search(SPACE, Factory(nan_macs=small), budget_macs=budget, storage=url, study_name="s", n_trials=3,
                   sampler="random", seed=5, results_dir=tmp_path / "ray")
    assert time.time() - start < 5
    assert len(optuna.load_study(study_name="s", storage=open_storage(url)).trials) == 3


def test_ray_backend_queues_the_warm_start(tmp_path):
    pytest.importorskip("ray")
    import ray.cloudpickle

    from nasloc.search.ray import run_ray_search

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers can't import tests/
    seeds = dict(list(SEEDS.items())[:2])
    url = f"sqlite:///{tmp_path}/study.db"
    run_ray_search(SPACE, Factory(nan_macs=-1), budget_macs=BUDGET, storage=url, study_name="s", n_trials=3,
                   sampler="nsga2", seed=0, max_concurrent=2, results_dir=tmp_path / "ray", warm_start=seeds)
    trials = sorted(optuna.load_study(study_name="s", storage=open_storage(url)).trials, key=lambda t: t.number)
    assert [t.user_attrs.get(SEED_DESIGN_ATTR) for t in trials] == [*seeds, None]
    assert [Arch.from_dict(t.user_attrs["arch"]) for t in trials[:2]] == list(seeds.values())
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
