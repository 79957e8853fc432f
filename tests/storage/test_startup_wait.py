"""A worker started while its PostgreSQL server is down waits for it, as a running worker does (issue: the first
connection failed at once): the same backoff, the same limit (``NASLOC_DB_RETRY_SECONDS``), one line saying that
it waits, and one error line when the server stays away. Errors that waiting cannot mend stay immediate.

Real servers throughout (tests/postgres.py): one is stopped, the worker starts, and the server is started again
a few seconds later from another thread, on the same port with the same data.
"""
from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import psycopg2
import pytest
import sqlalchemy
from postgres import (
    _stop,
    free_port,
    postgres_server,
    postgres_url,  # noqa: F401 (a fixture)
    server_files,
    start_server,
    stop_server,
)

from nasloc.errors import StorageError
from nasloc.storage.factory import check_storage, open_storage
from nasloc.storage.reconnect import DB_RETRY_ENV, server_away

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[2]
WAITING = re.compile(r"^\[nasloc\] waiting for the database at 127\.0\.0\.1:(\d+) \(down: .*Connection refused\), "
                     r"up to (\S+) s \(NASLOC_DB_RETRY_SECONDS\)$", re.MULTILINE)


# ------------------------------------------------------------------------------------------- a server stopped, started
@contextlib.contextmanager
def _stopped_server() -> Iterator[tuple[str, Path, list]]:
    """A real server with an empty database, stopped: (its URL, its data folder, the servers started again)."""
    restarted: list[subprocess.Popen] = []
    with postgres_server() as url:
        folder, _ = server_files(url)
        stop_server(url)
        try:
            yield url, folder, restarted
        finally:
            for server in restarted:
                _stop(server)


def _start_later(folder: Path, port: int, seconds: float, started: list) -> threading.Thread:
    """Start the stopped server of ``folder`` again after ``seconds``, from another thread."""
    command = shlex.split((folder / "postmaster.opts").read_text())

    def start() -> None:
        time.sleep(seconds)
        started.append(start_server(command, port))

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    return thread


def _port(url: str) -> int:
    return int(sqlalchemy.engine.make_url(url).port)


def test_a_worker_started_while_the_server_is_down_waits_for_it(monkeypatch, capsys) -> None:
    monkeypatch.setenv(DB_RETRY_ENV, "60")
    with _stopped_server() as (url, folder, restarted):
        # The check before any training (check_storage), then opening the storage and creating the study, each
        # while the server is down: each waits for it and goes on once it is up.
        for step in ("check", "open"):
            if step == "open":
                _stop(restarted.pop())
            capsys.readouterr()
            starter = _start_later(folder, _port(url), 3, restarted)
            started = time.monotonic()
            if step == "check":
                check_storage(url)
            else:
                storage = open_storage(url)
                study = optuna.create_study(storage=storage, study_name="late", directions=["maximize"])
                study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
            waited = time.monotonic() - started
            starter.join()
            out = capsys.readouterr().out
            assert waited >= 2.5, f"{step}: did not wait for the server ({waited:.1f} s)"
            waiting, up = out.splitlines()  # two lines, no more
            assert WAITING.fullmatch(waiting).groups() == (str(_port(url)), "60"), out
            assert re.fullmatch(rf"\[nasloc\] the database at 127\.0\.0\.1:{_port(url)} is up \(waited \d+ s\)", up), out
        # the storage works: the trials are there, for this worker and for the next one
        assert len(optuna.load_study(study_name="late", storage=open_storage(url)).trials) == 2
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


@pytest.mark.parametrize("opening", ["check_storage", "open_storage"])
def test_a_server_that_stays_away_ends_in_one_line_after_the_limit(opening, monkeypatch, capsys) -> None:
    monkeypatch.setenv(DB_RETRY_ENV, "3")
    url = f"postgresql+psycopg2://postgres:secret@127.0.0.1:{free_port()}/nasloc"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(StorageError) as error:
        {"check_storage": check_storage, "open_storage": open_storage}[opening](url)
    waited = time.monotonic() - started
    prefix = "--storage" if opening == "check_storage" else "storage"
    line = str(error.value)
    assert re.fullmatch(rf"{prefix} postgresql\+psycopg2://postgres:\*\*\*@127\.0\.0\.1:\d+/nasloc: cannot connect "
                        r"within 3 s \(.*Connection refused\); rerun the same command once the server is up, or wait "
                        r"longer with NASLOC_DB_RETRY_SECONDS", line), line
    assert 3 <= waited < 3 + 10, waited  # the limit, not more (a try takes at most the connect timeout)
    out = capsys.readouterr().out
    assert out.splitlines() == [WAITING.search(out).group(0)] and WAITING.search(out).group(2) == "3", out


def test_no_wait_with_a_limit_of_zero(monkeypatch, capsys) -> None:
    monkeypatch.setenv(DB_RETRY_ENV, "0")
    started = time.monotonic()
    with pytest.raises(StorageError, match=r": cannot connect \(.*Connection refused\); rerun the same command once "
                                           r"the server is up, or wait for it with NASLOC_DB_RETRY_SECONDS$"):
        check_storage(f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/nasloc")
    assert time.monotonic() - started < 10
    assert capsys.readouterr().out == ""


def test_answers_that_waiting_cannot_mend_stay_immediate(postgres_url: str, monkeypatch, capsys) -> None:  # noqa: F811
    """A server that answers and refuses (an unknown database or user), and a malformed URL: one line at once."""
    monkeypatch.setenv(DB_RETRY_ENV, "60")
    where = sqlalchemy.engine.make_url(postgres_url)
    refused = {
        "unknown database": (where.set(database="no_such_database"), '"no_such_database" does not exist'),
        "unknown user": (where.set(username="nobody"), 'role "nobody" does not exist'),
    }
    for name, (url, message) in refused.items():
        text = url.render_as_string(hide_password=False)
        for opening, prefix, verb in ((check_storage, "--storage", "cannot connect"), (open_storage, "storage",
                                                                                        "cannot open")):
            started = time.monotonic()
            with pytest.raises(StorageError, match=rf"^{prefix} .*: {verb} \(.*{message}") as error:
                opening(text)
            assert time.monotonic() - started < 10, name
            assert "\n" not in str(error.value)
    with pytest.raises(StorageError, match="not a database URL"):
        check_storage("postgresql://user:secret@localhost:port/x")
    assert capsys.readouterr().out == ""  # no "waiting" line


def _driver_error(message: str) -> sqlalchemy.exc.OperationalError:
    """What SQLAlchemy raises when psycopg2 cannot connect: the driver's error under SQLAlchemy's."""
    return sqlalchemy.exc.OperationalError("connect", {}, psycopg2.OperationalError(message))


@pytest.mark.parametrize("message, away", [
    ('connection to server at "db", port 5432 failed: Connection refused\n\tIs the server running', True),
    ('connection to server at "db", port 5432 failed: timeout expired', True),
    ('could not translate host name "db" to address: Name or service not known', True),  # its container not up yet
    ('connection to server at "db", port 5432 failed: FATAL:  the database system is starting up', True),
    ('connection to server at "db", port 5432 failed: FATAL:  sorry, too many clients already', True),
    ('connection to server at "db", port 5432 failed: FATAL:  password authentication failed for user "u"', False),
    ('connection to server at "db", port 5432 failed: FATAL:  database "x" does not exist', False),
    ('connection to server at "db", port 5432 failed: FATAL:  no pg_hba.conf entry for host "10.0.0.2"', False),
])
def test_which_connection_errors_are_waited_for(message: str, away: bool) -> None:
    assert server_away(_driver_error(message)) is away
    assert not server_away(ValueError("not a database error"))


def test_the_command_waits_for_the_server_then_goes_on(tmp_path: Path) -> None:
    """``run_search.py`` itself, started while the server is down: it says that it waits, and once the server is
    up it goes on to the next check (a budget outside the space here, which ends it before any training)."""
    with _stopped_server() as (url, folder, restarted):
        env = {**os.environ, DB_RETRY_ENV: "60"}
        worker = subprocess.Popen(
            [sys.executable, str(REPO / "run_search.py"), "--space", "tiny", "--budget", "0.001M", "--dataset",
             "digits", "--device", "cpu", "--storage", url, "--results-dir", str(tmp_path / "results")],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            first = worker.stdout.readline()  # once the worker has started to wait
            assert WAITING.fullmatch(first.rstrip("\n")), first
            _start_later(folder, _port(url), 1, restarted).join()
            out, err = worker.communicate(timeout=120)
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        assert re.fullmatch(rf"\[nasloc\] the database at 127\.0\.0\.1:{_port(url)} is up \(waited \d+ s\)\n", out), out
        assert worker.returncode == 2 and err.splitlines() == [err.strip()] and "--budget" in err \
            and "outside the space tiny" in err, err
