"""Checkpoints of a run folder: written whole or not at all, the previous one kept, read without running code.

A run folder may be shared by several machines (README, "Several workers, several machines"), so nothing
read from it may execute code: checkpoints hold only tensors and plain values (dicts, lists, str, int,
float, bool, None) and are read with ``torch.load(weights_only=True)``; one that carries a pickled object
is refused (:class:`UnsafeCheckpointError`).

:func:`save_checkpoint` writes ``last.pth`` through a temporary file and a rename, and keeps the file it
replaces as ``previous.pth``. :func:`resume_checkpoint` (a training that resumes) reads ``last.pth``;
when that is unreadable (truncated by a full disk or a copy, corrupt) it says so in one line, moves it
aside (``last.pth.unreadable``) and falls back to ``previous.pth``, or starts the training again when
there is none. :func:`load_checkpoint`
(a finished phase's result) has no fallback: an unreadable file is a :class:`CheckpointError`.
"""
from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..errors import NaslocError, first_line
from ..fileio import atomic_path

_logger = logging.getLogger(__name__)


class CheckpointError(NaslocError):
    """A checkpoint that cannot be read (truncated, corrupt, or not a checkpoint of this kind)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holding a pickled Python object, which loading would execute: never loaded."""


def previous_checkpoint(path: Path) -> Path:
    """Where :func:`save_checkpoint` keeps the checkpoint that ``path`` held before."""
    return path.with_name(f"previous{path.suffix}")


def save_checkpoint(path: Path, state: dict[str, Any], keep_previous: bool = True) -> None:
    """Write ``state`` (tensors and plain values only) to ``path``; the file it replaces becomes
    :func:`previous_checkpoint` (with ``keep_previous``). A full disk is a :class:`nasloc.errors.DiskFullError`
    and changes nothing."""
    with atomic_path(path, previous=previous_checkpoint(path) if keep_previous else None) as tmp:
        # Through a Python file: a full disk is then an OSError (ENOSPC), not an opaque RuntimeError of torch's writer.
        with open(tmp, "wb") as f:
            torch.save(state, f)


def finish_checkpoint(path: Path, keep: Iterable[str]) -> None:
    """Cut a finished training's checkpoint down to the ``keep`` keys that later phases and a rerun read (the
    optimizer's state, twice the size of the weights with AdamW, goes) and drop the previous one. A training
    that a rerun lengthens resumes such a checkpoint with a fresh optimizer (see the trainings' resume)."""
    keep = tuple(keep)
    state = load_checkpoint(path, keys=keep)
    if set(state) != set(keep):  # once: a rerun of a finished phase rewrites nothing
        save_checkpoint(path, {key: state[key] for key in keep}, keep_previous=False)
    previous_checkpoint(path).unlink(missing_ok=True)


def drop_checkpoints(folder: Path) -> None:
    """Delete the checkpoints under ``folder`` (a selection candidate the halving let go: nothing reads them)."""
    for pattern in ("last.pth", "previous.pth"):
        for path in folder.rglob(pattern):
            path.unlink(missing_ok=True)


def load_checkpoint(path: Path, device: str | torch.device = "cpu", keys: Iterable[str] = ("model",)) -> dict[str, Any]:
    """The checkpoint at ``path`` (a finished training's), loaded without running code; a dict with ``keys``.

    Raises:
        UnsafeCheckpointError: it carries a pickled object (one line naming the file and the object).
        CheckpointError: it is missing, unreadable, or lacks one of ``keys`` (one line naming the file and
            saying how to repair it).
    """
    try:
        return _read(path, device, tuple(keys))
    except UnsafeCheckpointError:
        raise
    except CheckpointError as e:
        raise CheckpointError(f"{e}; rerun the training that wrote it (same options): it resumes from the "
                              f"checkpoint before, {previous_checkpoint(path).name}, or starts again") from None


def resume_checkpoint(path: Path, device: str | torch.device = "cpu",
                      keys: Iterable[str] = ("model",)) -> dict[str, Any] | None:
    """The checkpoint to resume a training from: ``path``, else :func:`previous_checkpoint`; None for none.

    An unreadable one is reported in one line (a warning naming it and what happens instead) and moved aside
    (``.unreadable`` appended to its name), so that the next :func:`save_checkpoint` does not keep it as the
    previous one. A pickled object is never skipped over: :class:`UnsafeCheckpointError`.
    """
    keys = tuple(keys)
    previous = previous_checkpoint(path)
    problems = []
    for candidate in (path, previous):
        if not candidate.exists():
            continue
        try:
            state = _read(candidate, device, keys)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as e:
            problems.append(str(e))
            _move_aside(candidate)
            continue
        if problems:
            _logger.warning("%s; resuming from %s", "; ".join(problems), candidate)
        return state
    if problems:
        _logger.warning("%s; no earlier checkpoint: starting this training again in %s", "; ".join(problems),
                        path.parent)
    return None


def _read(path: Path, device: str | torch.device, keys: tuple[str, ...]) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except pickle.UnpicklingError as e:
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(e))
        if unsafe:
            raise UnsafeCheckpointError(
                f"{path} carries a pickled Python object ({unsafe.group(1)}), which loading would run; nasloc writes "
                "only tensors and plain values: refused (delete the file if you did not write it)") from None
        raise CheckpointError(f"{path}: unreadable checkpoint ({_described(e)})") from None
    except Exception as e:  # noqa: BLE001 - a truncated zip is an OSError, a corrupt one a RuntimeError, ...
        raise CheckpointError(f"{path}: unreadable checkpoint ({_described(e)})") from None
    missing = [key for key in keys if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path}: not a checkpoint of this kind (no {missing[0]!r})")
    return state


def _move_aside(path: Path) -> None:
    try:
        path.replace(path.with_name(path.name + ".unreadable"))
    except FileNotFoundError:  # another rank of the same training moved it first
        pass


def _described(error: BaseException) -> str:
    """``Type: first line`` of an exception, for the messages about unreadable files."""
    return f"{type(error).__name__}: {first_line(error)}" if str(error).strip() else type(error).__name__
