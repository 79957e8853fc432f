"""A database server that goes away during a search (a restart, a failover), or is not up yet when a worker
starts, is waited for.

:class:`ReconnectingRDBStorage` (what :func:`nasloc.storage.factory.open_storage` gives for a database server) retries
each call that reaches the database with backoff for up to ``NASLOC_DB_RETRY_SECONDS`` (default 120 s), then
stops the worker with one line (:class:`nasloc.errors.StorageError`); :func:`storage_errors_unmasked` keeps
that line from being hidden by Optuna. :func:`connect_waiting` gives a worker's first connection (checking the
storage, creating it) the same backoff and the same limit, and says in one line that it waits; it waits only
while the server cannot be reached (:func:`server_away`), not on an answer that waiting cannot change (a wrong
password, user or database name).
"""
from __future__ import annotations

import functools
import logging
import math
import os
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import sqlalchemy
from optuna.storages import RDBStorage
from sqlalchemy.engine import URL

from ..console import say
from ..errors import StorageError, first_line

_logger = logging.getLogger(__name__)


#: How long a worker waits for a database server that went away before it gives up (environment variable).
DB_RETRY_ENV = "NASLOC_DB_RETRY_SECONDS"
DB_RETRY_SECONDS = 120.0
RETRY_DELAYS_S = (0.5, 8.0)  # the first wait between tries, doubled up to the last


def db_retry_seconds() -> float:
    """``NASLOC_DB_RETRY_SECONDS`` (default 120): how long a worker waits for its database server to come back."""
    text = os.environ.get(DB_RETRY_ENV)
    if text is None:
        return DB_RETRY_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise StorageError(f"{DB_RETRY_ENV}={text!r}: give the seconds to wait for the database server (>= 0)")
    return seconds


class ReconnectingRDBStorage(RDBStorage):
    """An RDBStorage on a database server that rides out the server's restart (or a failover).

    Each call that reaches the database is tried again, after 0.5 s, 1 s, 2 s, ... (at most 8 s), while the
    server cannot be reached; the first failure of an outage starts its clock, and once ``retry_seconds`` have
    passed the call raises :class:`StorageError` (one line) and so does every later call that fails. The
    outage and the reconnection are logged in one line each. Connections that died with the server are
    replaced before use (the engine's ``pool_pre_ping``). A missed heartbeat is skipped, not retried: the next
    one comes, and the grace period is as long as the outages a worker waits for.

    Optuna writes each change in a transaction of its own, and a transaction cut off by the outage did not
    happen, so trying it again neither loses nor repeats it. (A commit that went through but whose
    acknowledgement was lost would be tried again: a window this does not close.)
    """

    def __init__(self, url: str, *, retry_seconds: float, **kwargs: Any) -> None:
        self.retry_seconds = retry_seconds
        self._outage_since: float | None = None
        super().__init__(url, **kwargs)

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except Exception as e:  # noqa: BLE001 - any driver's error
            if not _lost_connection(e):
                raise

    def _retrying(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        delays = _delays()
        while True:
            try:
                result = method(self, *args, **kwargs)
            except Exception as e:  # noqa: BLE001 - any driver's error
                if not _lost_connection(e):
                    raise
                waited = self._outage(e)
                if waited >= self.retry_seconds:
                    raise StorageError(
                        f"storage {self.shown_url()}: lost the connection and could not reconnect within "
                        f"{self.retry_seconds:g} s ({_cause(e)}); rerun the same command once the server is back "
                        f"(completed trials are kept), or wait longer with {DB_RETRY_ENV}") from None
                time.sleep(min(next(delays), self.retry_seconds - waited))
                continue
            if self._outage_since is not None:
                _logger.warning("storage %s: reconnected after %.0f s", self.shown_url(),
                                time.monotonic() - self._outage_since)
                self._outage_since = None
            return result

    def _outage(self, error: BaseException) -> float:
        """Seconds since the outage began (now, for its first failure)."""
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = now
            _logger.warning("storage %s: lost the connection (%s); retrying for up to %g s (%s)",
                            self.shown_url(), _cause(error), self.retry_seconds, DB_RETRY_ENV)
        return now - self._outage_since

    def shown_url(self) -> str:
        return shown_url(sqlalchemy.engine.make_url(self.url))


#: RDBStorage's methods that reach the database (those of BaseStorage, and those that Optuna's cache in front
#: of an RDBStorage calls directly).
_DATABASE_CALLS = (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr", "get_study_id_from_name",
    "get_study_name_from_id", "get_study_directions", "get_study_user_attrs", "get_study_system_attrs",
    "get_all_studies", "create_new_trial", "_create_new_trial", "set_trial_param", "_set_trial_param",
    "get_trial_param", "set_trial_state_values", "set_trial_intermediate_value", "set_trial_user_attr",
    "set_trial_system_attr", "get_trial_id_from_study_id_trial_number", "get_trial", "get_all_trials",
    "_get_trials", "get_best_trial", "_get_best_trial_id", "get_trial_user_attrs", "get_trial_system_attrs",
    "_get_stale_trial_ids",
)


def _retried(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(self: ReconnectingRDBStorage, *args: Any, **kwargs: Any) -> Any:
        return self._retrying(method, *args, **kwargs)

    return call


for _name in _DATABASE_CALLS:
    setattr(ReconnectingRDBStorage, _name, _retried(getattr(RDBStorage, _name)))


@contextmanager
def storage_errors_unmasked() -> Iterator[None]:
    """Around ``Study.optimize``: a :class:`StorageError` raised while a trial is told its result comes out as itself.

    Optuna 5.0's ``_run_trial`` reads the trial's state back after a failed ``tell``; when that read fails too
    (the server is still away) its ``finally`` raises an UnboundLocalError instead, with the real error as
    its context.
    """
    try:
        yield
    except UnboundLocalError as e:
        storage_error = next((cause for cause in error_chain(e) if isinstance(cause, StorageError)), None)
        if storage_error is None:
            raise
        raise storage_error from None


def error_chain(error: BaseException) -> list[BaseException]:
    """``error`` and what caused it (Optuna wraps SQLAlchemy's errors, which wrap the driver's)."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _delays() -> Iterator[float]:
    """The waits between tries: 0.5 s, 1 s, 2 s, ... (at most 8 s)."""
    delay, longest = RETRY_DELAYS_S
    while True:
        yield delay
        delay = min(2 * delay, longest)


T = TypeVar("T")


def connect_waiting(connect: Callable[[], T], url: URL, retry_seconds: float, prefix: str = "storage") -> T:
    """``connect()`` (a first connection to the server of ``url``), tried again while the server cannot be reached.

    The waits are those of :class:`ReconnectingRDBStorage` (0.5 s, 1 s, ... at most 8 s), for up to
    ``retry_seconds`` (``NASLOC_DB_RETRY_SECONDS``): one line on stdout says that the worker waits (and why), one
    more when the server has come up. Past the limit: :class:`StorageError`, one line beginning with ``prefix`` and
    the URL (password hidden). An error that is not the server being away (:func:`server_away`: a wrong password,
    an unknown database) is raised at once, as it is, for the caller to word.
    """
    delays, since = _delays(), None
    while True:
        try:
            result = connect()
        except Exception as e:  # any driver's error
            if not server_away(e):
                raise
            now = time.monotonic()
            if since is None:
                since = now
                if retry_seconds > 0:
                    say(f"[nasloc] waiting for the database at {_address(url)} (down: {_cause(e)}), up to "
                        f"{retry_seconds:g} s ({DB_RETRY_ENV})")
            waited = now - since
            if waited >= retry_seconds:
                within, wait = (f" within {retry_seconds:g} s", "wait longer") if retry_seconds > 0 else ("", "wait for it")
                raise StorageError(f"{prefix} {shown_url(url)}: cannot connect{within} ({_cause(e)}); rerun the same "
                                   f"command once the server is up, or {wait} with {DB_RETRY_ENV}") from None
            time.sleep(min(next(delays), retry_seconds - waited))
            continue
        if since is not None:
            say(f"[nasloc] the database at {_address(url)} is up (waited {time.monotonic() - since:.0f} s)")
        return result


#: PostgreSQL's refusals that waiting mends (SQLSTATE classes: connection exception, insufficient resources such as
#: too many clients, operator intervention such as a server starting up or shutting down) ...
_AWAY_SQLSTATE_CLASSES = ("08", "53", "57")
#: ... and their texts, for a driver that does not give the SQLSTATE of a refused connection (psycopg2).
_AWAY_REFUSALS = ("the database system is starting up", "the database system is shutting down",
                  "the database system is in recovery mode", "the database system is not yet accepting connections",
                  "the database system is not accepting connections", "too many clients already",
                  "remaining connection slots are reserved")
#: MySQL's error numbers of a server out of reach (can't connect, unknown host, gone away, lost, too many
#: connections, shutting down); any other (access denied, unknown database, ...) is not waited for.
_AWAY_MYSQL_ERRORS = (2002, 2003, 2005, 2006, 2013, 1040, 1053)


def server_away(error: BaseException) -> bool:
    """Whether ``error``, met while connecting, is a server that cannot be reached or is not ready (refused
    connection, timeout, unknown host name, starting up): what waiting can mend. A server that answered and
    refused the user, the password or the database (PostgreSQL's ``FATAL:`` replies, MySQL's 1045 and 1049) is
    not away: waiting for it would only delay the one line that says what to fix."""
    if not _lost_connection(error):
        return False
    chain = error_chain(error)
    driver = next((e.orig for e in chain if isinstance(e, sqlalchemy.exc.DBAPIError) and e.orig is not None), chain[-1])
    sqlstate = getattr(driver, "sqlstate", None) or getattr(driver, "pgcode", None)
    if isinstance(sqlstate, str) and sqlstate:
        return sqlstate[:2] in _AWAY_SQLSTATE_CLASSES
    number = driver.args[0] if driver.args else None
    if isinstance(number, int):  # MySQL's drivers: (error number, message)
        return number in _AWAY_MYSQL_ERRORS
    text = str(driver)
    if "FATAL:" in text:  # PostgreSQL answered the connection, and refused it
        return any(refusal in text for refusal in _AWAY_REFUSALS)
    return True


def _address(url: URL) -> str:
    """``host:port`` of the server of ``url`` (the driver's default port when the URL names none)."""
    port = url.port or {"postgresql": 5432, "mysql": 3306, "mariadb": 3306}.get(url.get_backend_name())
    host = url.host or "localhost"
    return f"{host}:{port}" if port else host


def _lost_connection(error: BaseException) -> bool:
    """Whether ``error`` is a database server out of reach."""
    lost = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.DisconnectionError)
    return any(isinstance(e, lost) or (isinstance(e, sqlalchemy.exc.DBAPIError) and e.connection_invalidated)
               for e in error_chain(error))


def _cause(error: BaseException) -> str:
    """The first line of the database driver's own message under ``error``."""
    chain = error_chain(error)
    driver = next((e.orig for e in chain if isinstance(e, sqlalchemy.exc.DBAPIError) and e.orig is not None), chain[-1])
    return first_line(driver)


def shown_url(url: URL) -> str:
    """``url`` with its password hidden, for messages."""
    return url.render_as_string(hide_password=True)
