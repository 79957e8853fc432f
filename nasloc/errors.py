"""The base of every error caused by the user's input (a bad arch, space, data folder, budget, ...).

The command line prints these as one line and exits with status 2; any other exception is a bug and
keeps its traceback.
"""


class NaslocError(ValueError):
    """Bad input; the message is one line naming what is wrong and how to fix it."""
