"""Faults a long search meets (issue 17), each injected for real, through the real command.

- An untrusted run folder: a checkpoint carrying a pickled object is refused in one line and never run.
- A truncated checkpoint (supernet and retrain ``last.pth``): one warning line naming it, and the run goes on
  from the epoch before (``previous.pth``), to the same weights.
- A full disk (a small tmpfs as the results folder) while a checkpoint or the export is written: one line,
  exit status 2, the previous files intact, nothing half-written left behind.
- PostgreSQL restarted while two workers search: they wait for it and go on, no completed trial lost or
  repeated; a worker whose server stays away longer than ``NASLOC_DB_RETRY_SECONDS`` exits with one line.

The runs are those of ``test_robustness.py``: the tiny space on a 200-image ImageFolder of the digits, keeping
every checkpoint (``--keep-checkpoints all``) so that a finished run still has the ``previous.pth`` files a
fault falls back to.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import psycopg2
import pytest
import sqlalchemy
import torch
from optuna.trial import TrialState
from postgres import _stop, postgres_server, server_files, start_server, stop_server
from test_robustness import RUN_SEARCH, Process, Run, assert_unique_and_complete, load_study, poll, write_digits

pytestmark = pytest.mark.timeout(900)

RUN = "base"
OPTIONS = ["--space", "tiny", "--budget", "1M", "--dataset", "imagefolder", "--device", "cpu", "--seed", "0",
           "--trials", "4", "--supernet-epochs", "2", "--select-top-k", "0", "--retrain-top-k", "1",
           "--retrain-epochs", "2", "--run-name", RUN, "--keep-checkpoints", "all"]


def run_args(data: Path, results: Path, *extra: object) -> list[str]:
    """The finished run's command (later options override earlier ones)."""
    return [RUN_SEARCH, *OPTIONS, "--data-dir", str(data), "--results-dir", str(results), *map(str, extra)]


def error_line(run: Run, prog: str = "run_search.py") -> str:
    """The one error line of a run that failed on its input (exit 2); progress bars may come before it."""
    assert run.returncode == 2 and "Traceback" not in run.stderr, str(run)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"{prog}: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], str(run)
    return errors[0]


def copy_run(finished: Path, results: Path) -> Path:
    shutil.copytree(finished, results / RUN)
    return results / RUN


def retrain_dir(run: Path) -> Path:
    [folder] = (run / "retrain").glob("trial_*")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits(tmp_path_factory.mktemp("digits") / "digits")


@pytest.fixture(scope="module")
def finished(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete run (supernet, search, report, retrain, export); tests change copies of it."""
    results = tmp_path_factory.mktemp("finished")
    run = Process(run_args(data, results), results / "logs" / "finished").wait()
    assert run.returncode == 0, str(run)
    return results / RUN


# ----------------------------------------------------------------------------------------- untrusted files
class RunsCode:
    """Unpickling it runs code (here: makes a folder); torch.load(weights_only=False) would do it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("checkpoint, phase", [("supernet/last.pth", "all"), ("supernet/last.pth", "search"),
                                               ("retrain", "all")])
def test_a_checkpoint_carrying_a_pickled_object_is_refused_in_one_line(finished: Path, data: Path, tmp_path: Path,
                                                                       checkpoint: str, phase: str) -> None:
    run = copy_run(finished, tmp_path / "results")
    path = retrain_dir(run) / "last.pth" if checkpoint == "retrain" else run / checkpoint
    marker = tmp_path / "the-pickle-ran"
    torch.save({"model": {}, "epoch": 1, "history": [], "payload": RunsCode(marker)}, path)

    result = Process(run_args(data, tmp_path / "results", "--phase", phase), tmp_path / "logs" / "evil").wait()
    line = error_line(result)
    assert f"{path} carries a pickled Python object (posix.mkdir)" in line and "refused" in line
    assert not marker.exists()


# ----------------------------------------------------------------------------------------- truncated files
def truncate(path: Path) -> None:
    """What a full disk or an interrupted copy leaves: the first half of the file."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_checkpoints_resume_from_the_epoch_before(finished: Path, data: Path, tmp_path: Path) -> None:
    run = copy_run(finished, tmp_path / "results")
    supernet, retrain = run / "supernet", retrain_dir(run)
    trained = torch.load(supernet / "last.pth", weights_only=True)["model"]
    previous = {folder: (folder / "previous.pth").read_bytes() for folder in (supernet, retrain)}
    for folder in (supernet, retrain):
        truncate(folder / "last.pth")

    result = Process(run_args(data, tmp_path / "results"), tmp_path / "logs" / "truncated").wait()
    assert result.returncode == 0 and "Traceback" not in result.stderr, str(result)
    warnings = [line for line in result.stderr.splitlines() if "unreadable checkpoint" in line]
    assert len(warnings) == 2, str(result)
    for folder, warning in zip((supernet, retrain), warnings):
        assert warning.startswith(f"{folder / 'last.pth'}: unreadable checkpoint (")
        assert warning.endswith(f"resuming from {folder / 'previous.pth'}")
        assert (folder / "previous.pth").read_bytes() == previous[folder]  # the good one stays
    # Only the last epoch of each training ran again.
    assert "supernet epoch 2/2" in result.stderr and "supernet epoch 1/2" not in result.stderr, str(result)
    assert f"trial {retrain.name.split('_')[1]}: resumed after epoch 1" in result.stdout, str(result)
    again = torch.load(supernet / "last.pth", weights_only=True)
    assert again["epoch"] == 1 and all(torch.equal(again["model"][k], v) for k, v in trained.items())
    assert torch.load(retrain / "last.pth", weights_only=True)["epoch"] == 2


def test_a_search_worker_refuses_a_truncated_supernet_in_one_line(finished: Path, data: Path, tmp_path: Path) -> None:
    # A worker (--phase search) only reads the trained supernet: it has nothing to fall back on, so it says
    # how the supernet phase repairs it.
    run = copy_run(finished, tmp_path / "results")
    truncate(run / "supernet" / "last.pth")
    result = Process(run_args(data, tmp_path / "results", "--phase", "search"), tmp_path / "logs" / "worker").wait()
    line = error_line(result)
    assert f"{run / 'supernet' / 'last.pth'}: unreadable checkpoint (" in line, line
    assert line.endswith("rerun the training that wrote it (same options): it resumes from the checkpoint before, "
                         "previous.pth, or starts again"), line


# ----------------------------------------------------------------------------------------- a full disk
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of 32 MiB (root only); :func:`fill` shrinks it to what it holds plus some room."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"a small disk needs a tmpfs, which this user cannot mount: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(mount: Path, room: int) -> None:
    """Leave ``room`` bytes free on the tmpfs at ``mount``."""
    used = shutil.disk_usage(mount).used
    subprocess.run(["mount", "-o", f"remount,size={used + room}", str(mount)], check=True)
    assert abs(shutil.disk_usage(mount).free - room) < 8192


def leftovers(folder: Path) -> list[str]:
    """Temporary files and folders of atomic writes (checkpoints, tables, exports)."""
    return sorted(str(p) for p in folder.rglob(".*") if p.name.endswith((".tmp", ".partial", ".old")))


@pytest.mark.parametrize("training", ["supernet", "retrain"])
def test_a_full_disk_while_a_checkpoint_is_written_keeps_the_last_one(finished: Path, data: Path, small_disk: Path,
                                                                      tmp_path: Path, training: str) -> None:
    run = copy_run(finished, small_disk)
    folder = run / "supernet" if training == "supernet" else retrain_dir(run)
    before = {name: (folder / name).read_bytes() for name in ("last.pth", "previous.pth")}
    fill(small_disk, room=len(before["last.pth"]) // 2)  # an epoch more does not fit; the tables do

    result = Process(run_args(data, small_disk, f"--{training}-epochs", 3), tmp_path / "logs" / "full").wait()
    line = error_line(result)
    assert line.endswith(f"cannot write {folder / 'last.pth'}: No space left on device; it is unchanged: "
                         "free some space and rerun"), line
    assert {name: (folder / name).read_bytes() for name in before} == before
    assert leftovers(run) == []


def test_a_full_disk_while_exporting_keeps_the_earlier_export(finished: Path, data: Path, small_disk: Path,
                                                              tmp_path: Path) -> None:
    run = copy_run(finished, small_disk)
    export = run / "export" / "best"
    before = {p.name: p.read_bytes() for p in export.iterdir()}
    fill(small_disk, room=len(before["model.safetensors"]) // 2)  # the tables fit, the model does not

    result = Process(run_args(data, small_disk), tmp_path / "logs" / "full-export").wait()
    line = error_line(result)
    assert f"writing {export} failed" in line and "No space left on device" in line, line
    assert {p.name: p.read_bytes() for p in export.iterdir()} == before
    assert leftovers(run) == []


@pytest.mark.parametrize("storage, room", [("study.db", 150_000), ("journal.log", 60_000)])
def test_a_full_disk_under_the_study_is_one_line_and_the_rerun_resumes(finished: Path, data: Path, small_disk: Path,
                                                                       tmp_path: Path, storage: str,
                                                                       room: int) -> None:
    """SQLite answers "database or disk is full"; a journal's append is cut short (its torn last line is dropped by
    the rerun, which says so). Either way: one line, exit 2, and the same command resumes the study once there
    is room, every trial stored before kept and no number repeated."""
    run = copy_run(finished, small_disk)
    path = run / storage
    url = f"sqlite:///{path}" if storage == "study.db" else str(path)  # a plain path is a journal file
    command = run_args(data, small_disk, "--trials", 40, "--storage", url)
    if storage == "journal.log":  # a new study in a journal beside the run's SQLite one: its seeds are queued first
        assert Process(run_args(data, small_disk, "--phase", "supernet", "--storage", url),
                       tmp_path / "logs" / "queue").wait().returncode == 0
    before = [(t.number, t.state, t.values) for t in load_study(url).trials if t.state.is_finished()]
    fill(small_disk, room=room)

    result = Process(command, tmp_path / "logs" / "full").wait()
    line = error_line(result)
    assert f"cannot write the study to {url}: " in line, line
    assert line.endswith("free some space and rerun the same command, which resumes the run"), line
    stored = load_study(url).trials
    assert 0 < len(stored) < 40 and [(t.number, t.state, t.values) for t in stored][: len(before)] == before

    torn = not path.read_bytes().endswith(b"\n") if storage == "journal.log" else False
    subprocess.run(["mount", "-o", "remount,size=32m", str(small_disk)], check=True)
    again = Process(command, tmp_path / "logs" / "rerun").wait()
    assert again.returncode == 0, str(again)
    assert ("dropped its last line" in again.stdout + again.stderr) == torn, str(again)
    study = load_study(url)
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == list(range(40)), numbers  # every trial once; one cut short by the disk may be FAIL
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) >= 39
    assert [(t.number, t.state, t.values) for t in study.trials][: len(before)] == before


# ----------------------------------------------------------------------------------------- PostgreSQL
WORKER_TRIALS = 30


def trials_in(url: str, state: str) -> int:
    where = sqlalchemy.engine.make_url(url)
    with contextlib.closing(psycopg2.connect(host=where.host, port=where.port, user=where.username,
                                             dbname=where.database)) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM trials WHERE state = %s", (state,))
        return cursor.fetchone()[0]


def completed(url: str) -> int:
    return trials_in(url, "COMPLETE")


def test_workers_ride_out_a_postgresql_restart_and_give_up_in_one_line(finished: Path, data: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    results, logs = tmp_path / "results", tmp_path / "logs"
    copy_run(finished, results)  # its supernet is trained
    restarted = None
    with postgres_server() as url:
        _, port = server_files(url)
        try:
            # The supernet phase (already done) creates the study and queues the seed designs, as in the README.
            first = Process(run_args(data, results, "--storage", url, "--phase", "supernet"), logs / "supernet").wait()
            assert first.returncode == 0, str(first)
            monkeypatch.setenv("NASLOC_DB_RETRY_SECONDS", "60")
            search = run_args(data, results, "--storage", url, "--phase", "search", "--trials", WORKER_TRIALS)
            workers = [Process(search, logs / f"worker-{i}") for i in (1, 2)]
            # both workers in their trial loop (storage open: a worker still starting up on a loaded machine
            # would open it during the outage, and a storage that cannot be opened is bad input, not an outage)
            poll(lambda: completed(url) >= 3 and trials_in(url, "RUNNING") >= 2, workers[0],
                 "three trials completed and both workers running one", interval=0.1)
            command = stop_server(url)
            for worker in workers:  # each notices at its next storage call, which a loaded machine can delay
                poll(lambda w=worker: "lost the connection" in w.err.read_text(errors="replace"), worker,
                     "the worker noticing the outage", interval=0.1, timeout=40)  # < the 60 s of retries
            restarted = start_server(command, port)
            assert completed(url) < WORKER_TRIALS and all(w.alive() for w in workers), "the search ended first"
            for worker in workers:
                run = worker.wait()
                assert run.returncode == 0 and "Traceback" not in run.stderr, str(run)
                assert "lost the connection" in run.stderr and "reconnected after" in run.stderr, str(run)
            assert_unique_and_complete(load_study(url), WORKER_TRIALS)

            # A server that stays away: the worker waits NASLOC_DB_RETRY_SECONDS, then exits with one line.
            monkeypatch.setenv("NASLOC_DB_RETRY_SECONDS", "5")
            more = Process(run_args(data, results, "--storage", url, "--phase", "search",
                                    "--trials", 2 * WORKER_TRIALS), logs / "worker-3")
            poll(lambda: completed(url) > WORKER_TRIALS, more, "a trial completed", interval=0.1)
            _stop(restarted)
            stopped = time.monotonic()
            line = error_line(more.wait())
            assert time.monotonic() - stopped < 5 + 60  # the wait, then a process's exit on a loaded machine
            assert f"storage {url}: lost the connection and could not reconnect within 5 s" in line, line
        finally:
            if restarted is not None:
                _stop(restarted)
