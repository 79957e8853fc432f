"""A full disk (or quota) under a file storage (SQLite, journal) while the study is written: one line, exit status 2.

SQLite answers "database or disk is full" and rolls the transaction back; a journal file's append fails with
ENOSPC before its line is complete, and the journal ignores a torn last line when it is read. Either way
every trial stored before stays, and a rerun of the same command, once there is room, resumes the study (a
trial left RUNNING by the failed write is failed by the rerun, as a killed worker's is).
"""
from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from optuna.storages.journal import JournalFileSymlinkLock

from ..console import say
from ..errors import DiskFullError
from ..fileio import DISK_FULL_ERRNOS
from .reconnect import error_chain

_SQLITE_FULL = "database or disk is full"  # SQLITE_FULL


def disk_full_cause(error: BaseException) -> tuple[str, str | None] | None:
    """Why ``error`` (or what caused it: Optuna and SQLAlchemy wrap the driver's error) is a full disk, and the file
    it names if it names one; None when no full disk caused it."""
    for cause in error_chain(error):
        if isinstance(cause, OSError) and cause.errno in DISK_FULL_ERRNOS:
            return os.strerror(cause.errno), cause.filename
        if isinstance(cause, sqlite3.DatabaseError) and str(cause).lower().startswith(_SQLITE_FULL):
            return str(cause), None
    return None


@contextmanager
def storage_disk_full(storage: str) -> Iterator[None]:
    """Around the phases that write the study in ``storage``: a full disk is a :class:`DiskFullError` (one line).
    (A checkpoint or table on a full disk is one already, raised by :func:`nasloc.fileio.atomic_path`.)"""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised unless a full disk caused it
        found = disk_full_cause(e)
        if found is None:
            raise
        cause, filename = found
        where = f"the study to {storage}" if filename is None or str(filename) in storage else str(filename)
        raise DiskFullError(f"cannot write {where}: {cause}; what was stored before is kept: free some space and "
                            "rerun the same command, which resumes the run") from None


def drop_torn_line(journal: Path) -> None:
    """Cut off a journal file's last line if a write left it without its newline (a full disk, a kill mid-write).

    Optuna reads past such a line only while it stays the last one; the next append would follow it on the same
    line and make the journal unreadable. Done under the journal's own lock (the one its appends take), with one
    line saying so: the write it held never completed, so the study loses nothing that was stored.
    """
    with open(journal, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
    lock = JournalFileSymlinkLock(str(journal))
    while not lock.acquire():
        time.sleep(0.05)
    try:
        data = journal.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            with open(journal, "r+b") as f:
                f.truncate(keep)
                os.fsync(f.fileno())
            say(f"[nasloc] {journal}: dropped its last line, {len(data) - keep} bytes of a write that did not complete "
                "(a full disk or a kill while it was written)")
    finally:
        lock.release()
