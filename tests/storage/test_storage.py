"""Opening and checking Optuna storages: SQLite, journal files and a real PostgreSQL server on localhost.

A server restarted mid-search is in test_faults.py."""
from __future__ import annotations

import multiprocessing
import pickle
import re
import sqlite3
import time

import optuna
import pytest
import sqlalchemy
from optuna.storages import JournalStorage, RDBStorage
from postgres import postgres_url  # noqa: F401 (a fixture)

from nasloc.errors import NaslocError, StorageError
from nasloc.storage.factory import check_storage, open_storage
from nasloc.storage.heartbeat import HeartbeatJournalStorage
from nasloc.storage.reconnect import (
    DB_RETRY_ENV,
    DB_RETRY_SECONDS,
    ReconnectingRDBStorage,
    db_retry_seconds,
    storage_errors_unmasked,
)
from nasloc.storage.sqlite import SQLiteStorage, lock_on_begin


# ------------------------------------------------------------------------------------------- open_storage
def test_open_storage_picks_the_backend_and_creates_folders(tmp_path):
    sqlite = open_storage(f"sqlite:///{tmp_path}/a/b/study.db")
    assert isinstance(sqlite, RDBStorage) and (tmp_path / "a/b/study.db").is_file()
    assert sqlite.get_heartbeat_interval() and sqlite.get_heartbeat_stale_trial_callback() is not None
    assert isinstance(open_storage(tmp_path / "c/study.sqlite"), RDBStorage)
    journal = open_storage(tmp_path / "d/study.log")
    assert isinstance(journal, HeartbeatJournalStorage) and (tmp_path / "d").is_dir()
    assert journal.get_heartbeat_interval() == 30
    # an existing SQLite file is never mistaken for a journal, whatever its name
    sqlite3.connect(tmp_path / "study.bin").execute("CREATE TABLE t (x)").connection.commit()
    assert isinstance(open_storage(tmp_path / "study.bin"), RDBStorage)


def _take_queued_trials(storage: str, n: int, taken: multiprocessing.Queue) -> None:
    """A worker process: ask for ``n`` trials as fast as it can; report their numbers."""
    study = optuna.load_study(study_name="queue", storage=open_storage(storage, heartbeat_interval=None))
    taken.put([study.ask().number for _ in range(n)])


@pytest.mark.parametrize("name", ["study.db", "study.log"])
def test_two_processes_never_take_the_same_queued_trial(tmp_path, name):
    """SQLite ignores Optuna's SELECT ... FOR UPDATE: without SQLiteStorage's BEGIN IMMEDIATE, two processes
    took 2-6 of 100 queued trials both (and both ran them; the second's tell then failed)."""
    storage = str(tmp_path / name)
    study = optuna.create_study(study_name="queue", storage=open_storage(storage, heartbeat_interval=None))
    for x in range(100):
        study.enqueue_trial({"x": x})
    context = multiprocessing.get_context("spawn")
    taken = context.Queue()
    workers = [context.Process(target=_take_queued_trials, args=(storage, 60, taken)) for _ in range(2)]
    for worker in workers:
        worker.start()
    first, second = taken.get(timeout=120), taken.get(timeout=120)
    for worker in workers:
        worker.join()
    assert set(first).isdisjoint(second) and len(set(first) | set(second)) == 120


def test_a_copied_sqlite_storage_still_locks_its_transactions(tmp_path):
    """Ray and spawned processes get storages by pickling: the copy makes a new engine, which must lock too."""
    storage = open_storage(tmp_path / "study.db", heartbeat_interval=None)
    copy = pickle.loads(pickle.dumps(storage))
    for s in (storage, copy):
        assert sqlalchemy.event.contains(s.engine, "begin", lock_on_begin)
    optuna.create_study(study_name="copied", storage=copy).enqueue_trial({"x": 1})
    assert len(optuna.load_study(study_name="copied", storage=storage).trials) == 1


def test_open_only_never_creates_a_storage(tmp_path):
    for missing, message in ((f"sqlite:///{tmp_path}/none.db", "no such SQLite file"),
                             (tmp_path / "none.db", "no such file"), (tmp_path / "run/none.log", "no such file")):
        with pytest.raises(StorageError, match=message):
            open_storage(missing, create=False)
    assert list(tmp_path.iterdir()) == []


def test_open_only_finds_a_relative_path_under_base(tmp_path, monkeypatch):
    run = tmp_path / "run"
    optuna.create_study(storage=open_storage(run / "study.db"), study_name="db")
    optuna.create_study(storage=open_storage(run / "study.log"), study_name="log")
    monkeypatch.chdir(tmp_path)
    sqlite = open_storage("study.db", create=False, base=run, heartbeat_interval=None)
    journal = open_storage("study.log", create=False, base=run, heartbeat_interval=None)
    assert isinstance(sqlite, RDBStorage) and sqlite.get_heartbeat_interval() is None
    assert type(journal) is JournalStorage  # no heartbeat: Optuna's own journal storage
    assert [s.study_name for s in journal.get_all_studies()] == ["log"]
    assert [s.study_name for s in sqlite.get_all_studies()] == ["db"]
    with pytest.raises(StorageError, match="no such file"):
        open_storage("study.log", create=False)  # without base, relative to the working folder only


# ------------------------------------------------------------------------------------------- check_storage
@pytest.mark.parametrize("url, message", [
    ("postgres://user@localhost/x", "unknown database or driver 'postgres'"),
    ("sqlit:///study.db", "unknown database or driver 'sqlit'"),
    ("postgresql+nodriver://user@localhost/x", "unknown database or driver 'postgresql+nodriver'"),
    ("postgresql://user:secret@localhost:port/x", "not a database URL"),
])
def test_check_storage_refuses_a_malformed_url(url, message):
    with pytest.raises(StorageError, match=re.escape(message)) as error:
        check_storage(url)
    assert isinstance(error.value, NaslocError) and "\n" not in str(error.value)
    assert "secret" not in str(error.value)


def test_check_storage_fails_fast_on_an_unreachable_server(monkeypatch):
    monkeypatch.setenv(DB_RETRY_ENV, "0")  # not told to wait for it (the wait: test_startup_wait.py)
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"storage postgresql\+psycopg2://nouser:\*\*\*@127.0.0.1:1/x: cannot connect"
                                           r" \(.*Connection refused") as error:
        check_storage("postgresql+psycopg2://nouser:secret@127.0.0.1:1/x")
    assert time.monotonic() - started < 10
    assert "\n" not in str(error.value)


def test_check_storage_creates_no_file(tmp_path):
    check_storage(f"sqlite:///{tmp_path}/new-run/study.db")
    check_storage(tmp_path / "new-run" / "study.log")
    check_storage(tmp_path / "new-run" / "study.db")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(StorageError, match="is a folder"):
        check_storage(tmp_path)


def test_check_storage_connects_to_a_real_server(postgres_url: str) -> None:  # noqa: F811
    check_storage(postgres_url)
    missing = postgres_url.rsplit("/", 1)[0] + "/no_such_database"
    with pytest.raises(StorageError, match='cannot connect .*"no_such_database" does not exist'):
        check_storage(missing)


def test_the_plain_postgresql_url_takes_the_installed_driver(postgres_url: str) -> None:  # noqa: F811
    """``postgresql://`` names psycopg (3), which is not installed; nasloc opens it with psycopg2, its dependency."""
    plain = "postgresql://" + postgres_url.split("://", 1)[1]
    check_storage(plain)
    storage = open_storage(plain, heartbeat_interval=None)
    study = optuna.create_study(storage=storage, study_name="plain-url")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    assert len(optuna.load_study(study_name="plain-url", storage=open_storage(postgres_url)).trials) == 2


# ------------------------------------------------------------------------------------------- a server that goes away
def test_a_database_server_is_reconnected_to_and_sqlite_is_not(tmp_path, postgres_url: str) -> None:  # noqa: F811
    server = open_storage(postgres_url, heartbeat_interval=None)
    assert isinstance(server, ReconnectingRDBStorage) and server.retry_seconds == DB_RETRY_SECONDS == 120
    assert server.engine.pool._pre_ping  # connections that died with a restarted server are replaced before use
    sqlite = open_storage(tmp_path / "study.db")
    assert type(sqlite) is SQLiteStorage  # a local file: nothing to reconnect to


@pytest.mark.parametrize("value, seconds", [("5", 5.0), ("0.5", 0.5), ("0", 0.0)])
def test_the_time_to_wait_for_the_server_comes_from_the_environment(monkeypatch, value, seconds):
    monkeypatch.setenv(DB_RETRY_ENV, value)
    assert db_retry_seconds() == seconds


@pytest.mark.parametrize("value", ["soon", "-1", "inf", "nan", ""])
def test_a_bad_time_to_wait_is_one_line(monkeypatch, value):
    monkeypatch.setenv(DB_RETRY_ENV, value)
    with pytest.raises(StorageError, match=rf"^NASLOC_DB_RETRY_SECONDS='{value}': give the seconds") as error:
        db_retry_seconds()
    assert "\n" not in str(error.value)


def _run_trial(tell, read_back) -> None:
    """The shape of Optuna 5.0's _run_trial after the objective: tell, and on failure read the trial back."""
    try:
        updated_state = tell()
    except Exception:
        updated_state = read_back()
        raise
    finally:
        assert updated_state is not None  # unbound when both failed


def test_a_storage_error_masked_by_optuna_comes_out_as_itself():
    def lost() -> None:
        raise StorageError("storage x: lost the connection")

    with pytest.raises(StorageError, match="lost the connection"), storage_errors_unmasked():
        _run_trial(lost, lost)
    with pytest.raises(UnboundLocalError), storage_errors_unmasked():  # any other one is left as it is
        _run_trial(lambda: 1 / 0, lambda: 1 / 0)
