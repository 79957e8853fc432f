"""What nasloc prints for the user on the console (progress bars aside)."""
from __future__ import annotations


def say(message: str) -> None:
    """One line on stdout at once (a run's phases and the commands' results; flushed for logs and pipes)."""
    print(message, flush=True)
