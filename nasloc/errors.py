"""The base of every error caused by the user's input (a bad arch, space, data folder, budget, ...).

The command line prints these as one line and exits with status 2; any other exception is a bug and
keeps its traceback.
"""
import re


class NaslocError(ValueError):
    """Bad input; the message is one line naming what is wrong and how to fix it."""


class TrainingDiverged(NaslocError, FloatingPointError):
    """The training loss became NaN or infinite (too high a learning rate, or broken data).

    A NaslocError, so the command line prints it as one line; the last completed epoch's checkpoint is kept.
    """


class DiskFullError(NaslocError):
    """A file could not be written for lack of space (or quota); the file it would have replaced is unchanged."""


class StorageError(NaslocError):
    """A storage that cannot be opened: malformed URL, unknown database driver, server unreachable, no such file;
    or a database server that stayed away for longer than ``NASLOC_DB_RETRY_SECONDS``."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


class OutOfMemory(NaslocError):
    """The device ran out of memory training an arch (``torch.cuda.OutOfMemoryError``). The message names the arch,
    the batch size and half of it to rerun with; the checkpoints written before are kept, and a rerun resumes."""


def out_of_memory(doing: str, batch_size: int, kept: str, error: BaseException | str | None = None) -> OutOfMemory:
    """The one line of an out-of-memory ``error`` met ``doing`` something (e.g. "training search trial 12 (...)"):
    the batch size, what the device was asked for, half the batch size to rerun with, and what is ``kept``."""
    asked = re.search(r"[Tt]ried to allocate ([\d.]+ ?[KMGT]?i?B)", str(error or ""))
    detail = f" (tried to allocate {asked[1]})" if asked else ""
    fix = (f"rerun with --batch-size {batch_size // 2}" if batch_size > 1 else
           "the batch size is already 1: use a device with more memory, or a smaller --budget or image size")
    return OutOfMemory(f"CUDA out of memory {doing} at --batch-size {batch_size}{detail}; {fix}; {kept}")
