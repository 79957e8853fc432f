"""Optuna storages: what makes a search persistent, resumable and shareable.

:func:`open_storage` turns a URL or a file path into a storage:

- ``sqlite:///results/run/study.db`` (the default of the command), ``postgresql://...`` or any SQLAlchemy URL
  → an RDB storage with a heartbeat: a worker killed with SIGKILL leaves its trial RUNNING, and the next
  worker (or rerun) marks it FAIL once it has missed its heartbeats for ``grace_period`` seconds.
- a plain file path (``study.log``, ``trials.jsonl``) → an Optuna journal file, the storage for several
  processes on one machine or on NFS. Optuna 5's ``JournalStorage`` has no heartbeat (only ``RDBStorage``
  and its cache implement ``BaseHeartbeat``), so :class:`HeartbeatJournalStorage` adds one: the heartbeat is
  a trial system attribute, rewritten every ``heartbeat_interval`` seconds while the trial runs.

:func:`check_storage` fails at once on a storage that cannot work (a misspelled URL, a wrong password or
database name), before hours of training end in :func:`open_storage`. A database server that goes away during a
search (a restart, a failover) is waited for: :class:`ReconnectingRDBStorage` retries each call with backoff
for up to ``NASLOC_DB_RETRY_SECONDS`` (default 120 s), then stops the worker with one line. A server that is not
up yet when a worker starts is waited for alike, by both functions (:func:`connect_waiting`).
:func:`fail_stale_trials` marks FAIL the trials whose worker is gone. Several processes share an SQLite file on a
local disk (:class:`SQLiteStorage` locks each transaction, e.g. ``--workers N``); on NFS use a journal file or a server.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
import random
import re
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import sqlalchemy
from optuna.exceptions import ExperimentalWarning
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from ..errors import StorageError, first_line
from .disk_full import drop_torn_line
from .heartbeat import HeartbeatJournalStorage, log_stale_trial
from .reconnect import ReconnectingRDBStorage, connect_waiting, db_retry_seconds, shown_url
from .sqlite import SQLiteStorage, _connect_sqlite, _is_sqlite_file

_logger = logging.getLogger(__name__)
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
CONNECT_TIMEOUT_S = 5


#: The connect-timeout argument of each database driver that has one (SQLAlchemy driver names).
_CONNECT_TIMEOUT_ARGS = {"psycopg2": "connect_timeout", "psycopg": "connect_timeout", "pg8000": "timeout",
                         "pymysql": "connect_timeout", "mysqldb": "connect_timeout",
                         "mysqlconnector": "connection_timeout"}


# ------------------------------------------------------------------------------------------- opening
def open_storage(
    url_or_path: str | os.PathLike,
    *,
    create: bool = True,
    base: str | os.PathLike | None = None,
    heartbeat_interval: int | None = 30,
    grace_period: int | None = 120,
) -> BaseStorage:
    """An Optuna storage from a URL or a file path, with a heartbeat unless ``heartbeat_interval`` is None.

    - Anything with ``://`` is an SQLAlchemy URL (``sqlite:///...``, ``postgresql://...``,
      ``mysql+pymysql://...``) → ``RDBStorage``.
    - A file ending in .db/.sqlite/.sqlite3, or an existing file with an SQLite header, is SQLite.
    - Any other path (``study.log``, ``trials.jsonl``) is an Optuna journal file
      (:class:`HeartbeatJournalStorage`, or Optuna's plain ``JournalStorage`` without a heartbeat).

    ``create=True`` (a search) creates the folders of an SQLite or journal file. ``create=False`` (code
    that reads an existing run) never creates a file: a missing SQLite or journal file is a
    :class:`StorageError`, and a relative path that does not exist is looked up under ``base`` as well.

    A trial whose worker died is marked FAIL by the next worker, or rerun, once it has missed its
    heartbeat for ``grace_period`` seconds (default 2 x interval when None). The grace period is
    generous because a loaded 2-core machine can starve the heartbeat thread.
    ``heartbeat_interval=None`` turns the heartbeat off (readers, and ask/tell users such as Ray).

    Raises:
        StorageError: no such file (``create=False``), or the database cannot be opened (one line).
    """
    text = os.fspath(url_or_path)
    if "://" not in text:
        path = _file_path(text, create, base)
        if path.suffix.lower() not in SQLITE_SUFFIXES and not _is_sqlite_file(path):
            return _journal_storage(path, create, heartbeat_interval, grace_period)
        text = f"sqlite:///{path}"
    url = _parse_url(text)
    engine_kwargs: dict[str, Any] = {}
    database = _sqlite_database(url)
    if database is not None:
        if create:
            database.parent.mkdir(parents=True, exist_ok=True)
        elif not database.is_file():
            raise StorageError(f"storage {text}: no such SQLite file")
        engine_kwargs = {"creator": functools.partial(_connect_sqlite, str(database))}
    server = url.get_backend_name() != "sqlite"
    if server:  # replace the connections that died with a restarted server before use; don't hang on connecting
        timeout_arg = _CONNECT_TIMEOUT_ARGS.get(url.get_driver_name())
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {timeout_arg: CONNECT_TIMEOUT_S} if timeout_arg else {}}
    if heartbeat_interval is None:
        grace_period = None  # RDBStorage accepts a grace period only with a heartbeat
    make: Callable[..., RDBStorage]
    if server:
        make = functools.partial(ReconnectingRDBStorage, retry_seconds=db_retry_seconds())
    else:  # SQLiteStorage needs the connections of _connect_sqlite, which an in-memory database does not get
        make = RDBStorage if database is None else SQLiteStorage
    opening = functools.partial(_rdb_storage, make, url.render_as_string(hide_password=False), engine_kwargs,
                                heartbeat_interval, grace_period)
    try:  # a server that is not up yet is waited for, as one that goes away later
        return connect_waiting(opening, url, db_retry_seconds()) if server else opening()
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001 - driver missing, wrong password, not a database, ...
        raise StorageError(f"storage {shown_url(url)}: cannot open ({first_line(e)})") from None


def _file_path(text: str, create: bool, base: str | os.PathLike | None) -> Path:
    """The absolute path of a storage file; open-only, it must exist (here or under ``base``)."""
    path = Path(text).expanduser()
    if not create:
        if not path.is_file() and base is not None and not path.is_absolute():
            path = Path(base) / path
        if not path.is_file():
            raise StorageError(f"storage {text}: no such file")
    return path.resolve()


def _journal_storage(path: Path, create: bool, heartbeat_interval: int | None,
                     grace_period: int | None) -> JournalStorage:
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        drop_torn_line(path)
    backend = JournalFileBackend(str(path))
    if heartbeat_interval is None:
        return JournalStorage(backend)
    return HeartbeatJournalStorage(backend, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                                   heartbeat_stale_trial_callback=log_stale_trial)


def _sqlite_database(url: URL) -> Path | None:
    """The database file of an SQLite URL; None for any other database and for an in-memory one."""
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database
    return Path(database).expanduser() if database and database != ":memory:" else None


def _parse_url(text: str) -> URL:
    """The SQLAlchemy URL of ``text``, with an installed driver for a plain ``postgresql://`` (see
    :func:`_installed_driver`)."""
    try:
        return _installed_driver(sqlalchemy.engine.make_url(text))
    except (sqlalchemy.exc.ArgumentError, ValueError) as e:  # ValueError: a port that is not a number
        shown = re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", text)  # the password, as SQLAlchemy hides it
        raise StorageError(f"--storage {shown}: not a database URL ({first_line(e)}); give an SQLAlchemy URL "
                           "such as postgresql+psycopg2://user@host/db, or a file path") from None


def _installed_driver(url: URL) -> URL:
    """``postgresql://`` names SQLAlchemy's default driver, psycopg (3) since SQLAlchemy 2.1; nasloc depends on
    psycopg2. When psycopg is not installed, the plain form takes psycopg2, the URL most users write."""
    if url.drivername == "postgresql" and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return url.set(drivername="postgresql+psycopg2")
    return url


def _rdb_storage(make: Callable[..., RDBStorage], url: str, engine_kwargs: dict[str, Any],
                 heartbeat_interval: int | None, grace_period: int | None, attempts: int = 8) -> RDBStorage:
    """``make(url, ...)`` (an RDBStorage class), retried: workers that open an empty PostgreSQL database at the
    same moment all try to create Optuna's tables, and all but one fail with a duplicate-key error; a retry
    finds them."""
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeat_interval is "experimental"
                return make(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                    heartbeat_stale_trial_callback=log_stale_trial,  # Optuna 5's name for failed_trial_callback
                )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(random.uniform(0.2, 1.0) * (attempt + 1))
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------- checking
def check_storage(url_or_path: str | os.PathLike) -> None:
    """Fail at once, with one line, on a storage that :func:`open_storage` could not open; create nothing.

    Call it before any long work (training the supernet) that ends in :func:`open_storage`:

    - a URL must parse and name an SQLAlchemy dialect whose driver imports (``postgres://...``, a
      misspelled scheme or a driver that is not installed fail here);
    - a server URL (PostgreSQL, MySQL, ...) is connected to, with a connect timeout of
      :data:`CONNECT_TIMEOUT_S` seconds where the driver has one: an unknown user, a wrong password or a
      missing database fail here at once; a server that cannot be reached (not up yet, restarting) is waited
      for with the backoff of a running worker, for up to ``NASLOC_DB_RETRY_SECONDS``, and fails here after that;
    - an SQLite URL or a file path is not opened, so a new file in a run folder that does not exist yet
      passes (:func:`open_storage` creates it); only a path that is a folder fails.

    Raises:
        StorageError: one line naming the storage (password hidden) and what is wrong.
    """
    text = os.fspath(url_or_path)
    if "://" not in text:
        if Path(text).expanduser().is_dir():
            raise StorageError(f"--storage {text}: is a folder; give a file in it, such as {Path(text) / 'study.log'}")
        return
    url = _parse_url(text)
    shown = shown_url(url)
    try:  # loads the dialect and imports its driver, connects to nothing
        timeout_arg = _CONNECT_TIMEOUT_ARGS.get(url.get_driver_name())
        engine = sqlalchemy.create_engine(url, poolclass=NullPool,
                                          connect_args={timeout_arg: CONNECT_TIMEOUT_S} if timeout_arg else {})
    except sqlalchemy.exc.NoSuchModuleError:
        raise StorageError(f"--storage {shown}: unknown database or driver {url.drivername!r}; use an SQLAlchemy URL "
                           "such as sqlite:///study.db or postgresql+psycopg2://user@host/db") from None
    except ImportError as e:
        raise StorageError(f"--storage {shown}: its database driver is not installed ({first_line(e)}); install it "
                           "or name an installed one, e.g. postgresql+psycopg2://user@host/db") from None
    try:
        database = _sqlite_database(url)
        if database is not None and database.is_dir():
            raise StorageError(f"--storage {shown}: is a folder; give a file in it, such as {database / 'study.db'}")
        if url.get_backend_name() != "sqlite":
            _check_connects(engine, url)
    finally:
        engine.dispose()


def _check_connects(engine: sqlalchemy.engine.Engine, url: URL) -> None:
    def connect() -> None:
        with engine.connect():
            pass

    try:
        connect_waiting(connect, url, db_retry_seconds(), prefix="--storage")
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001 - every driver has its own errors
        raise StorageError(f"--storage {shown_url(url)}: cannot connect "
                           f"({first_line(getattr(e, 'orig', None) or e)})") from None
