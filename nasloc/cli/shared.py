"""What the commands share: their one-line error, the data as they read it, a table."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..errors import NaslocError
from ..training.data import EAGER_MAX_SIDE, DataSplits, load_dataset

IN_MEMORY_MAX_SIDE = {"digits": 32, "cifar10": 32, "cifar100": 32, "imagefolder": EAGER_MAX_SIDE}


class CommandError(NaslocError):
    """Bad input to ``nasloc train`` / ``evaluate``; the message is one line."""


# ===================================================================================== helpers
def load_data(dataset: str, data_dir: Path | None, size: int, seed: int, with_test: bool) -> DataSplits:
    """The data as training and evaluation read it: in-memory images stored at most at their own size
    (the loader resizes each batch to ``size`` on the device), so both see the same pixels."""
    return load_dataset(dataset, data_dir, min(size, IN_MEMORY_MAX_SIDE[dataset]), seed=seed, with_test=with_test)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], header: bool = True) -> str:
    lines = [headers, *rows] if header else list(rows)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(lines[0]))]
    text = ["  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    if header:
        text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)
