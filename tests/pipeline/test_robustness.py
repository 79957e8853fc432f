"""Crash safety, concurrent workers, bad input and determinism, through the real command.

Every run here is ``run_search.py`` in a subprocess, on the tiny space and a 200-image ImageFolder of
scikit-learn's digits (2 supernet steps per epoch, a second per trial), so the processes spend most of
their time importing torch. Processes that don't depend on each other run at the same time, each on
one thread (``OMP_NUM_THREADS=1``).

- crash: SIGKILL during supernet training, rerun (it resumes after the saved epoch), SIGKILL during the
  search, rerun; every completed trial is kept, the killed one is FAIL, numbers are unique and the
  tables list every trial.
- concurrency: ``--phase supernet`` once, then two ``--phase search`` workers on one study, with a journal
  file and with a real PostgreSQL server (``tests/postgres.py``); then the plain run that finishes the
  PostgreSQL recipe (report, retrain, export), as the README describes.
- bad input: one line on stderr, exit status 2, nothing written; corrupt images are skipped and
  counted; an existing export folder is refused; a NaN accuracy fails only its trial.
- determinism: the same seed gives the same supernet weights and the same trials.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState
from PIL import Image
from postgres import create_database, postgres_url  # noqa: F401 (postgres_url is a fixture)

from nasloc.search.engine import run_search
from nasloc.space.search_space import SearchSpace
from nasloc.storage.factory import open_storage

REPO = Path(__file__).resolve().parents[2]
RUN_SEARCH = str(REPO / "run_search.py")
NASLOC = "import sys; from nasloc.cli.main import main; sys.exit(main())"  # the `nasloc` console script
STUDY = "nasloc"
PER_CLASS = 20  # 10 classes: 180 training images (2 steps of 64), 20 for validation
TRIALS = 6
SLOW = 900  # seconds: the limit for one process on a loaded machine

pytestmark = pytest.mark.timeout(1800)


# ----------------------------------------------------------------------------------------- helpers
@dataclass
class Run:
    """A finished (or killed) subprocess: its exit status and output."""

    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"exit status {self.returncode}\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}"


class Process:
    """A command running in the background with its output in files (no pipe to fill up)."""

    def __init__(self, args: list[str], logs: Path):
        logs.parent.mkdir(parents=True, exist_ok=True)
        self.out, self.err = logs.with_suffix(".out"), logs.with_suffix(".err")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.popen = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=out, stderr=err, env=env)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> Run:
        self.popen.send_signal(signal.SIGKILL)
        return self.wait()

    def wait(self, timeout: float = SLOW) -> Run:
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            pytest.fail(f"timed out after {timeout} s:\n{self.result()}")
        return self.result()

    def result(self) -> Run:
        return Run(self.popen.returncode, self.out.read_text(errors="replace"), self.err.read_text(errors="replace"))


def search_args(data: Path, results: Path, *extra: object) -> list[str]:
    return [RUN_SEARCH, "--space", "tiny", "--budget", "1M", "--dataset", "imagefolder", "--data-dir", str(data),
            "--device", "cpu", "--seed", "0", "--trials", str(TRIALS), "--retrain-top-k", "0",
            "--results-dir", str(results), *map(str, extra)]


def run_all(processes: list[Process]) -> list[Run]:
    return [p.wait() for p in processes]


def poll(condition, process: Process, what: str, interval: float = 0.02, timeout: float = SLOW):
    """Wait until ``condition()`` is truthy while ``process`` runs; returns its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if not process.alive():
            pytest.fail(f"the run ended before {what}:\n{process.result()}")
        time.sleep(interval)
    process.kill()
    pytest.fail(f"timed out waiting for {what}")


def sqlite_query(db: Path, sql: str) -> list[tuple]:
    """Rows of a query on an Optuna SQLite file, read-only (never creates it); [] before the tables exist."""
    if not db.exists():
        return []
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as connection:
            return connection.execute(sql).fetchall()
    except sqlite3.OperationalError:  # not created yet, or locked for longer than the timeout
        return []


def sqlite_states(db: Path) -> dict[int, str]:
    """Trial number -> state."""
    return dict(sqlite_query(db, "SELECT number, state FROM trials"))


def being_evaluated(db: Path) -> list[int]:
    """RUNNING trials whose arch is already stored: past the suggestions, in the evaluation."""
    return [n for (n,) in sqlite_query(db, "SELECT t.number FROM trials t JOIN trial_user_attributes a "
                                           "ON a.trial_id = t.trial_id WHERE t.state = 'RUNNING' AND a.key = 'arch_json'")]


def load_study(storage: str) -> optuna.Study:
    return optuna.load_study(study_name=STUDY, storage=open_storage(storage, heartbeat_interval=None))


def checkpoint_epoch(path: Path) -> int:
    """0-based epoch of the last finished epoch in a supernet checkpoint."""
    return torch.load(path, map_location="cpu", weights_only=False)["epoch"]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def one_error_line(run: Run, prog: str = "run_search.py") -> str:
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), str(run)
    return lines[0]


def assert_unique_and_complete(study: optuna.Study, n_trials: int) -> None:
    """Exactly ``n_trials`` trials count, all COMPLETE, numbered 0..n-1; the rest are surplus PRUNED ones."""
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers)), f"duplicated trial numbers: {sorted(numbers)}"
    counted = [t for t in study.trials if t.state != TrialState.PRUNED]
    surplus = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert sorted(t.number for t in counted) == list(range(n_trials)), [(t.number, t.state.name) for t in study.trials]
    assert all(t.state == TrialState.COMPLETE and "arch_json" in t.user_attrs for t in counted), \
        [(t.number, t.state.name) for t in counted]
    assert all(t.user_attrs.get("surplus") for t in surplus)  # a worker that lost the race for the last trial


# ----------------------------------------------------------------------------------------- data
def write_digits(root: Path, per_class: int = PER_CLASS) -> Path:
    """An ImageFolder tree of 8x8 PNGs (scikit-learn's digits): root/<digit>/<index>.png."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in range(10):
        (root / str(label)).mkdir(parents=True)
        for i in np.flatnonzero(digits.target == label)[:per_class]:
            pixels = np.round(digits.images[i] * (255 / 16)).astype(np.uint8)
            Image.fromarray(pixels, "L").save(root / str(label) / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits(tmp_path_factory.mktemp("digits") / "digits")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("results")


# ----------------------------------------------------------------------------------------- crash
@dataclass
class Crash:
    first: Run  # killed during supernet training
    second: Run  # resumed, killed during the search
    third: Run  # resumed to the end
    epoch_at_first_kill: int
    epoch_at_second_kill: int
    at_second_kill: dict[int, str]  # trial number -> state, right after the kill
    trials_at_second_kill: dict[int, optuna.trial.FrozenTrial]
    study: optuna.Study  # the final study
    run_dir: Path


@pytest.fixture(scope="module")
def crash(data: Path, results: Path) -> Crash:
    run_dir = results / "crash"
    args = search_args(data, results, "--run-name", "crash", "--supernet-epochs", 3)
    checkpoint, db = run_dir / "supernet" / "last.pth", run_dir / "study.db"

    first = Process(args, results / "logs" / "crash-1")
    poll(checkpoint.exists, first, "the checkpoint of epoch 1 was written")
    first_run = first.kill()  # SIGKILL, no cleanup of any kind
    epoch_at_first_kill = checkpoint_epoch(checkpoint)

    second = Process(args, results / "logs" / "crash-2")

    def searching() -> bool:
        return list(sqlite_states(db).values()).count("COMPLETE") >= 2 and bool(being_evaluated(db))

    poll(searching, second, "two trials completed and a third was being evaluated", interval=0.05)
    second_run = second.kill()
    at_kill = sqlite_states(db)
    trials_at_kill = {t.number: t for t in load_study(f"sqlite:///{db}").trials}
    epoch_at_second_kill = checkpoint_epoch(checkpoint)

    third_run = Process(args, results / "logs" / "crash-3").wait()
    assert third_run.returncode == 0, str(third_run)
    return Crash(first_run, second_run, third_run, epoch_at_first_kill, epoch_at_second_kill, at_kill, trials_at_kill,
                 load_study(f"sqlite:///{db}"), run_dir)


def test_killed_supernet_training_resumes_after_the_last_checkpoint(crash: Crash) -> None:
    assert crash.first.returncode == -signal.SIGKILL
    assert crash.epoch_at_first_kill == 0, "the first run was to be killed after epoch 1 of 3"
    # The rerun trains epochs 2 and 3 only (the progress bars name them), then searches.
    assert "supernet epoch 2/3" in crash.second.stderr and "supernet epoch 3/3" in crash.second.stderr, str(crash.second)
    assert "supernet epoch 1/3" not in crash.second.stderr, str(crash.second)
    assert crash.epoch_at_second_kill == 2
    # The third run finds the supernet finished and trains nothing.
    assert "supernet epoch" not in crash.third.stderr, str(crash.third)


def test_killed_search_keeps_every_completed_trial(crash: Crash) -> None:
    assert crash.second.returncode == -signal.SIGKILL
    assert "RUNNING" in crash.at_second_kill.values(), "the search was to be killed during a trial"
    final = {t.number: t for t in crash.study.trials}
    for number, state in crash.at_second_kill.items():
        if state == "COMPLETE":
            before, after = crash.trials_at_second_kill[number], final[number]
            assert after.state == TrialState.COMPLETE and after.values == before.values
            assert after.user_attrs["arch_json"] == before.user_attrs["arch_json"]
    numbers = [t.number for t in crash.study.trials]
    assert len(numbers) == len(set(numbers)) and sorted(numbers) == list(range(len(numbers))), numbers
    assert len([t for t in crash.study.trials if t.state != TrialState.PRUNED]) == TRIALS
    # The tables of the final run list every trial, in its final state.
    rows = read_csv(crash.run_dir / "trials.csv")
    assert [(int(r["number"]), r["state"]) for r in rows] == [(t.number, t.state.name) for t in
                                                              sorted(crash.study.trials, key=lambda t: t.number)]


def test_the_trial_killed_mid_search_is_failed_not_lost(crash: Crash) -> None:
    killed = [n for n, state in crash.at_second_kill.items() if state == "RUNNING"]
    assert killed
    final = {t.number: t for t in crash.study.trials}
    for number in killed:
        assert final[number].state == TrialState.FAIL, (
            f"trial {number}, running when its process was killed, is {final[number].state.name} after the rerun")
    completed = [t for t in crash.study.trials if t.state == TrialState.COMPLETE]
    assert len(completed) == TRIALS - len(killed)  # the rerun added trials until --trials


# ----------------------------------------------------------------------------------------- determinism
@pytest.fixture(scope="module")
def supernets(data: Path, results: Path) -> tuple[Path, Path]:
    """Two run folders, "shared" and "twin", each with a supernet trained for 1 epoch by
    ``--phase supernet`` with the same seed (at the same time)."""
    names = ("shared", "twin")
    runs = run_all([Process(search_args(data, results, "--run-name", name, "--supernet-epochs", 1, "--phase", "supernet"),
                            results / "logs" / f"supernet-{name}") for name in names])
    for run in runs:
        assert run.returncode == 0, str(run)
    states = set(sqlite_states(results / "shared" / "study.db").values())
    assert states == {"WAITING"}, "--phase supernet must not search (it only queues the seed designs)"
    return results / "shared", results / "twin"


@pytest.fixture(scope="module")
def searched_twins(data: Path, results: Path, supernets: tuple[Path, Path]) -> tuple[list[dict], list[dict]]:
    """The trials.csv rows of the same search run in both folders (default SQLite storage)."""
    runs = run_all([Process(search_args(data, results, "--run-name", folder.name, "--supernet-epochs", 1),
                            results / "logs" / f"search-{folder.name}") for folder in supernets])
    for run in runs:
        assert run.returncode == 0, str(run)
    return read_csv(supernets[0] / "trials.csv"), read_csv(supernets[1] / "trials.csv")


def test_same_seed_same_supernet_weights(supernets: tuple[Path, Path]) -> None:
    a, b = (torch.load(folder / "supernet" / "last.pth", map_location="cpu", weights_only=False) for folder in supernets)
    assert a["epoch"] == b["epoch"] == 0
    assert a["model"].keys() == b["model"].keys()
    different = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_same_seed_same_trials(searched_twins: tuple[list[dict], list[dict]]) -> None:
    first, second = searched_twins
    assert len(first) == TRIALS
    assert len({r["arch_json"] for r in first}) > 1
    keys = ("number", "state", "arch_json", "macs", "params", "top1", "evaluated")
    assert [[r[k] for k in keys] for r in first] == [[r[k] for k in keys] for r in second]


# ----------------------------------------------------------------------------------------- concurrency
WORKER_TRIALS = 10


def _two_workers(data: Path, results: Path, shared: Path, storage: str, name: str) -> optuna.Study:
    args = search_args(data, results, "--run-name", shared.name, "--supernet-epochs", 1, "--phase", "search",
                       "--storage", storage, "--trials", WORKER_TRIALS)
    runs = run_all([Process(args, results / "logs" / f"{name}-worker-{i}") for i in (1, 2)])
    for run in runs:
        assert run.returncode == 0, str(run)
        assert "2/6 search" in run.stdout and "3/6 report" not in run.stdout, str(run)
    study = load_study(storage)
    assert_unique_and_complete(study, WORKER_TRIALS)
    return study


def test_two_workers_share_a_journal_file(data: Path, results: Path, supernets: tuple[Path, Path]) -> None:
    shared = supernets[0]
    _two_workers(data, results, shared, str(results / "journal" / "study.log"), "journal")


def test_two_workers_share_postgresql_then_one_run_finishes(data: Path, results: Path, supernets: tuple[Path, Path],
                                                            postgres_url: str) -> None:  # noqa: F811
    shared = supernets[0]
    # Optuna's tables are created here first: two workers creating them in an empty database at the same
    # moment is a known bug (see test_workers_starting_together_on_an_empty_postgresql_database).
    open_storage(postgres_url, heartbeat_interval=None)
    study = _two_workers(data, results, shared, postgres_url, "postgres")
    # The README's recipe ends with one plain run: it finds the search done, reports, retrains and exports.
    finish = Process(search_args(data, results, "--run-name", shared.name, "--supernet-epochs", 1,
                                 "--storage", postgres_url, "--trials", WORKER_TRIALS,
                                 "--retrain-top-k", 1, "--retrain-epochs", 1),
                     results / "logs" / "postgres-finish").wait()
    assert finish.returncode == 0, str(finish)
    assert "supernet epoch" not in finish.stderr, "the supernet was trained again"
    after = load_study(postgres_url)
    assert [(t.number, t.state) for t in after.trials] == [(t.number, t.state) for t in study.trials], "no new trials"
    rows = read_csv(shared / "trials.csv")
    assert sorted(int(r["number"]) for r in rows) == sorted(t.number for t in study.trials)
    assert (shared / "export" / "best" / "model.safetensors").is_file()
    assert (shared / "summary.md").is_file()


def test_workers_starting_together_on_an_empty_postgresql_database(postgres_url: str) -> None:  # noqa: F811
    url = create_database(postgres_url, "empty")
    barrier, errors = threading.Barrier(6), []

    def worker() -> None:
        barrier.wait()
        try:
            open_storage(url, heartbeat_interval=None)
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(f"{type(error).__name__}: {str(error).splitlines()[0]}")

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


# ----------------------------------------------------------------------------------------- bad input
def _bad_space(folder: Path) -> Path:
    path = folder / "space.yaml"
    path.write_text("name: broken\nskeleton:\n  img_size: 16\ngenes: {}\nstages: []\n")
    return path


def _class_without_images(folder: Path) -> Path:
    (folder / "data" / "cats").mkdir(parents=True)
    (folder / "data" / "cats" / "notes.txt").write_text("no images here\n")
    return folder / "data"


def _unreadable_only(folder: Path) -> Path:
    for label in ("a", "b"):
        (folder / "data" / label).mkdir(parents=True)
        for i in range(3):
            (folder / "data" / label / f"{i}.png").write_bytes(b"not a png")
    return folder / "data"


# case -> (arguments given the case folder, the digits folder and the case's results folder, words of the message)
BAD_INPUT = {
    "malformed budget": (lambda f, d, r: ["--budget", "0.7GB", "--results-dir", r], "invalid budget '0.7GB'"),
    "infeasible budget": (lambda f, d, r: ["--space", "tiny", "--budget", "100M", "--results-dir", r],
                          "outside the space tiny"),
    "unknown space": (lambda f, d, r: ["--space", "nosuchspace", "--budget", "1M", "--results-dir", r],
                      "--space 'nosuchspace': no such file"),
    "invalid space file": (lambda f, d, r: ["--space", _bad_space(f), "--budget", "1M", "--results-dir", r],
                           "stages: at least one stage is required"),
    "missing data folder": (lambda f, d, r: ["--space", "tiny", "--budget", "1M", "--dataset", "imagefolder",
                                             "--data-dir", f / "nowhere", "--results-dir", r], "is not a folder"),
    "no data folder": (lambda f, d, r: ["--space", "tiny", "--budget", "1M", "--dataset", "imagefolder",
                                        "--results-dir", r], "needs --data-dir"),
    "empty data folder": (lambda f, d, r: ["--space", "tiny", "--budget", "1M", "--dataset", "imagefolder",
                                           "--data-dir", (f / "empty").mkdir() or f / "empty", "--results-dir", r],
                          "is empty"),
    "class folder without images": (lambda f, d, r: ["--space", "tiny", "--budget", "1M", "--dataset", "imagefolder",
                                                     "--data-dir", _class_without_images(f), "--results-dir", r],
                                    "class folder has no images"),
    "only corrupt images": (lambda f, d, r: ["--space", "tiny", "--budget", "1M", "--dataset", "imagefolder",
                                             "--data-dir", _unreadable_only(f), "--results-dir", r],
                            "can be read"),
    "search before supernet": (lambda f, d, r: ["--space", "tiny", "--budget", "1M", "--dataset", "imagefolder",
                                                "--data-dir", d, "--phase", "search", "--results-dir", r],
                               "train it first with --phase supernet"),
}
# Run by calling run_search.py's entry point, cli.search_main, in this process rather than in a new one:
# the same code, without importing torch and timm once more (~8 CPU-seconds a process, even for an error
# that argparse finds: `import nasloc.cli.main` runs nasloc/__init__.py, which imports the models). Each stage
# keeps one case in a real subprocess: argparse ("malformed budget"), the space and budget checks of the
# pipeline ("infeasible budget") and the data loading ("only corrupt images"); they also show that
# importing everything prints nothing else on stderr.
IN_PROCESS = {"unknown space", "missing data folder", "no data folder", "invalid space file", "empty data folder",
              "class folder without images", "search before supernet"}


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory: pytest.TempPathFactory, data: Path) -> dict[str, tuple[Run, Path]]:
    """The bad-input cases run as subprocesses, all at the same time: case -> (its run, its --results-dir)."""
    started = {}
    for case, (make_args, _) in BAD_INPUT.items():
        if case not in IN_PROCESS:
            folder = tmp_path_factory.mktemp(case.replace(" ", "-"))
            out = folder / "results"  # must not exist afterwards
            started[case] = (Process([RUN_SEARCH, *map(str, make_args(folder, data, out))], folder / "logs" / "run"), out)
    return {case: (process.wait(), out) for case, (process, out) in started.items()}


def run_search_main(args: list, capfd: pytest.CaptureFixture) -> Run:
    """``run_search.py ARGS`` in this process: its exit status and what it wrote on stdout and stderr."""
    from nasloc.cli.main import search_main

    capfd.readouterr()
    status = search_main([str(a) for a in args])
    out, err = capfd.readouterr()
    return Run(status, out, err)


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case: str, request: pytest.FixtureRequest, tmp_path: Path,
                                                         data: Path, capfd: pytest.CaptureFixture) -> None:
    if case in IN_PROCESS:
        out = tmp_path / "results"
        run = run_search_main(BAD_INPUT[case][0](tmp_path, data, out), capfd)
    else:
        run, out = request.getfixturevalue("bad_input_runs")[case]
    assert run.returncode == 2, str(run)
    assert BAD_INPUT[case][1] in one_error_line(run)
    assert run.stdout == "", str(run)
    assert not out.exists(), f"{case}: {sorted(p.name for p in out.rglob('*'))} left in {out}"


def test_corrupt_images_are_skipped_and_counted(tmp_path: Path, data: Path) -> None:
    folder = tmp_path / "data"
    shutil.copytree(data, folder)
    (folder / "3" / "junk.png").write_bytes(b"definitely not a png")
    (folder / "7" / "empty.jpg").write_bytes(b"")
    good = next((folder / "5").iterdir()).read_bytes()
    (folder / "5" / "truncated.png").write_bytes(good[: len(good) // 2])
    run = Process(search_args(folder, tmp_path / "results", "--run-name", "corrupt", "--phase", "supernet",
                              "--supernet-epochs", 0), tmp_path / "logs" / "run").wait()
    assert run.returncode == 0, str(run)
    assert "skipped 3 unreadable images" in run.stderr, str(run)
    assert (tmp_path / "results" / "corrupt" / "run.json").is_file()


def test_export_into_an_existing_folder_is_refused(tmp_path: Path, supernets: tuple[Path, Path],
                                                   searched_twins: tuple[list[dict], list[dict]]) -> None:
    run_dir = supernets[1]  # "twin": searched with the default SQLite storage
    trial = searched_twins[1][0]["number"]
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("my file\n")
    run = Process(["-c", NASLOC, "export", "--run", str(run_dir), "--trial", trial, "--out", str(out)],
                  tmp_path / "logs" / "export").wait()
    assert run.returncode == 2, str(run)
    assert "already exists" in one_error_line(run, prog="nasloc export")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "my file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "mine"], "a temporary export was left behind"


# ----------------------------------------------------------------------------------------- NaN trial
def test_a_nan_accuracy_fails_its_trial_and_the_search_goes_on(tmp_path: Path) -> None:
    from nasloc.report.tables import write_tables
    from nasloc.space.flops import count

    space = SearchSpace.load(REPO / "search_spaces" / "tiny.yaml")
    calls = []

    def evaluate(arch) -> float:  # the loss of the second evaluated arch "turned NaN"
        calls.append(arch)
        return math.nan if len(calls) == 2 else 50 + count(arch).params / 1e4

    budget = space.macs_range()[1]  # every arch is evaluated
    study = run_search(space, evaluate, budget_macs=budget, storage=tmp_path / "study.log", study_name=STUDY,
                       n_trials=5, sampler="random", seed=0, progress=False)
    states = [t.state for t in sorted(study.trials, key=lambda t: t.number)]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE, TrialState.COMPLETE]
    failed = study.trials[1]
    assert "nan" in failed.user_attrs["fail_reason"] and "top1" not in failed.user_attrs
    assert len(calls) == 5
    rows = read_csv(write_tables(study, budget, tmp_path)[0])
    assert [r["state"] for r in rows] == [s.name for s in states] and "nan" in rows[1]["fail_reason"]


# ----------------------------------------------------------------------------------------- selection crash
def selection_scores(db: Path) -> dict[tuple[str, int], float]:
    """(candidate, epochs) -> score of every rung reported in the selection study so far."""
    rows = sqlite_query(db, "SELECT a.value_json, v.step, v.intermediate_value FROM studies s "
                            "JOIN trials t ON t.study_id = s.study_id "
                            "JOIN trial_user_attributes a ON a.trial_id = t.trial_id AND a.key = 'source' "
                            "JOIN trial_intermediate_values v ON v.trial_id = t.trial_id "
                            "WHERE s.study_name = 'selection'")
    return {(json.loads(source), int(step)): value for source, step, value in rows}


def test_killed_selection_resumes_without_losing_a_finished_rung(data: Path, results: Path) -> None:
    run_dir = results / "selection-crash"
    args = search_args(data, results, "--run-name", "selection-crash", "--supernet-epochs", 1, "--select-epochs", 4)
    db = run_dir / "study.db"
    first = Process(args, results / "logs" / "selection-1")
    poll(lambda: len(selection_scores(db)) >= 3, first, "three candidates were scored in rung 1", interval=0.05)
    killed = first.kill()
    assert killed.returncode == -signal.SIGKILL
    at_kill = selection_scores(db)

    rerun = Process(args, results / "logs" / "selection-2").wait()
    assert rerun.returncode == 0, str(rerun)
    assert "already scored" in rerun.stdout, str(rerun)
    final = selection_scores(db)
    assert {key: final[key] for key in at_kill} == at_kill  # every score reported before the kill is kept
    selection = optuna.load_study(study_name="selection", storage=open_storage(f"sqlite:///{db}", heartbeat_interval=None))
    sources = [t.user_attrs["source"] for t in selection.trials]
    assert len(sources) == len(set(sources)) == TRIALS  # the candidates once each: here the six seed designs
    assert {t.state for t in selection.trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert max(step for _, step in final) == 4
    assert [r["source"] for r in read_csv(run_dir / "selection.csv")][0] in sources
