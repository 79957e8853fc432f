"""Several selection trainings at once (nasloc.selection.pool): real trainings on digits in spawned processes."""
import os
import random

import optuna
import pytest
import torch

from nasloc.phases.supernet import save_untrained
from nasloc.run import RunDir
from nasloc.selection.candidates import Candidate
from nasloc.selection.pool import RungPool, SelectionWorkerDied
from nasloc.selection.scores import Curve
from nasloc.selection.study import run_selection
from nasloc.selection.trainer import RungTrainer, SelectionConfig, TrainerSpec
from nasloc.space.search_space import SearchSpace
from nasloc.supernet.proxy import EvaluatorSpec
from nasloc.supernet.supernet import Supernet
from nasloc.training.data import halve_val, load_dataset

optuna.logging.set_verbosity(optuna.logging.WARNING)
CONFIG = SelectionConfig(epochs=2, batch_size=64)
SIZE = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A run folder with an (untrained) supernet checkpoint for the tiny space on digits, and 4 candidates."""
    splits = load_dataset("digits", None, SIZE, seed=0)
    space = SearchSpace.load("tiny").for_classes(splits.num_classes)
    torch.manual_seed(0)
    supernet = Supernet(space, SIZE)
    root = tmp_path_factory.mktemp("run")
    checkpoint = save_untrained(supernet, RunDir(root))
    rng, archs = random.Random(0), []
    while len(archs) < 4:
        arch = space.sample(rng)
        if arch not in archs:
            archs.append(arch)
    candidates = [Candidate(f"c{i}", arch, i) for i, arch in enumerate(archs)]
    evaluator = EvaluatorSpec("tiny", str(checkpoint), SIZE, "digits", None, 0, device="cpu", search_half=True)
    return supernet, splits, evaluator, candidates


def scores(result) -> dict:
    return {t.user_attrs["source"]: t.intermediate_values for t in result.study.get_trials()}


def test_two_processes_score_the_candidates_as_one_at_a_time(setup, tmp_path):
    supernet, splits, evaluator, candidates = setup
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the pool's processes get one thread each: the same float sums
    try:
        _, selection_half = halve_val(splits, 0)
        one = RungTrainer(supernet, selection_half, CONFIG, RunDir(tmp_path / "one").selection_dir, device="cpu")
        alone = run_selection(candidates, one, optuna.storages.InMemoryStorage(), max_epochs=2, say=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    with RungPool(TrainerSpec(evaluator, CONFIG, str(tmp_path / "two")), workers=2, threads=1) as pool:
        together = run_selection(candidates, pool, optuna.storages.InMemoryStorage(), max_epochs=2, say=lambda m: None)
    assert scores(together) == scores(alone)
    assert sorted(len(v) for v in scores(alone).values()) == [1, 1, 2, 2]  # rung 1 for all, rung 2 for the best 2
    assert all((tmp_path / "two" / "selection" / f"trial_{t.user_attrs['search_trial']}").is_dir()
               for t in together.study.trials)


class DyingSpec:
    """A TrainerSpec whose trainer kills its process on candidate c1 (an out-of-memory kill, say)."""

    def __call__(self):
        def train(number, candidate, epochs):
            if candidate.source == "c1":
                os._exit(9)
            return Curve((1.0,), (float(number),), epochs)
        return train


def test_a_process_that_dies_is_one_error_and_a_rerun_resumes(setup, tmp_path):
    *_, candidates = setup
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    with RungPool(DyingSpec(), workers=2, threads=1) as pool:
        with pytest.raises(SelectionWorkerDied, match="rerun the same command"):
            run_selection(candidates, pool, storage, max_epochs=2, say=lambda m: None)
    trained = []

    def advance(number, candidate, epochs):
        trained.append((candidate.source, epochs))
        return Curve((1.0,), (float(number),), epochs)

    result = run_selection(candidates, advance, storage, max_epochs=2, say=lambda m: None)
    assert ("c1", 1) in trained and len(trained) <= 6  # rung 1 (what was not scored yet), then rung 2 for 2
    assert sorted(len(v) for v in scores(result).values()) == [1, 1, 2, 2]
