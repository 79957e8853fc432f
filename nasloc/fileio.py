"""Atomic writes: a file appears whole or not at all, even with several writers, a kill -9 or a full disk."""
from __future__ import annotations

import errno
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import DiskFullError

# What a full disk or an exhausted quota looks like: the write of a file that would have fit elsewhere.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


@contextmanager
def atomic_path(path: str | Path, previous: str | Path | None = None) -> Iterator[Path]:
    """Yield a unique temporary path beside ``path``; on success it is synced and renamed onto ``path``.

    With ``previous``, the file that ``path`` held is first renamed to ``previous`` (the last good
    checkpoint stays until the new one is complete). A full disk (ENOSPC, EDQUOT, EFBIG) while the
    temporary file is written is a :class:`DiskFullError` naming ``path``; ``path`` is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        _raise_if_disk_full(e, path)
        raise
    try:
        yield Path(tmp)
        _sync(tmp)  # the data reaches the disk before the rename does: no empty file after a power cut
        os.chmod(tmp, 0o644)
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        _raise_if_disk_full(e, path)
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def sync_folder(folder: str | Path) -> None:
    """fsync every file in ``folder`` and the folder itself, before a rename publishes it (as :func:`atomic_path`
    does for one file): after a power cut the renamed folder holds whole files, not empty ones."""
    for entry in Path(folder).iterdir():
        if entry.is_file():
            _sync(str(entry))
    _sync(str(folder))


def _sync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _raise_if_disk_full(error: OSError, path: Path) -> None:
    """A full disk becomes one line naming ``path`` (the command line's exit status 2); other errors stay bugs."""
    if error.errno in DISK_FULL_ERRNOS:
        state = "it is unchanged" if path.exists() else "nothing was written"
        raise DiskFullError(f"cannot write {path}: {error.strerror}; {state}: free some space and rerun") from None
