"""The base of every error caused by the user's input (a bad arch, space, data folder, budget, ...).

The command line prints these as one line and exits with status 2; any other exception is a bug and
keeps its traceback.
"""


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
