"""SQLite as a storage for several processes: transactions that lock from their first statement, a
write-ahead log and patience with locks."""
from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import sqlalchemy
from optuna.storages import RDBStorage

from .disk_full import disk_full_cause


class SQLiteStorage(RDBStorage):
    """An RDBStorage on an SQLite file whose transactions begin with ``BEGIN IMMEDIATE``.

    Optuna makes its read-then-write steps atomic with ``SELECT ... FOR UPDATE``: taking a queued trial
    (WAITING to RUNNING, e.g. a seed design of the warm start) and numbering a new trial. SQLite has no row
    locks, and Python's sqlite3 runs the SELECT outside the transaction of the UPDATE that follows, so two
    processes could both take the same queued trial (2-6 of 100 queued trials with two processes asking as fast
    as they can) and both run it; the slower one then fails with "Cannot tell a COMPLETE trial".
    ``BEGIN IMMEDIATE`` takes SQLite's write lock when a transaction begins, so such steps run one process at
    a time (Optuna's transactions are short; the connections wait up to 60 s for the lock).
    The connections come from :func:`_connect_sqlite` (no implicit transactions), so every transaction is the
    one begun here, also in a copy of the storage unpickled by another process.
    """

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        _begin_immediate(self.engine)

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)  # a new engine
        _begin_immediate(self.engine)

    def record_heartbeat(self, trial_id: int) -> None:
        """A heartbeat that a full disk refused is skipped: the search's next write meets the same disk and stops the
        run in one line (:mod:`nasloc.storage.disk_full`), which a traceback from the heartbeat thread would bury."""
        try:
            super().record_heartbeat(trial_id)
        except Exception as e:  # noqa: BLE001 - re-raised unless a full disk caused it
            if disk_full_cause(e) is None:
                raise


def _begin_immediate(engine: sqlalchemy.engine.Engine) -> None:
    """SQLAlchemy's recipe for SQLite transactions that lock from their first statement."""
    sqlalchemy.event.listen(engine, "begin", lock_on_begin)


def lock_on_begin(connection: sqlalchemy.engine.Connection) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _connect_sqlite(database: str) -> sqlite3.Connection:
    """An SQLite connection for Optuna: write-ahead log, no fsync per commit, patient with locks.

    Optuna commits every suggestion and attribute separately (about 40 commits per trial here), and
    with SQLite's defaults each commit is an fsync: 16 ms on these machines, 0.6 s per trial. In WAL
    mode with synchronous=NORMAL a commit is durable against a crash of the process (not of the OS)
    and readers (optuna-dashboard) never block the writer. WAL needs a local disk, as SQLite itself
    does for several processes: use a journal file or PostgreSQL on NFS. The timeout covers the
    heartbeat thread writing while the main thread does.
    """
    connection = sqlite3.connect(database, timeout=60, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.isolation_level = None  # no implicit BEGIN: SQLiteStorage begins every transaction itself
    return connection


def _is_sqlite_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False
