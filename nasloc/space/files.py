"""Where search-space files are found: a path, or the name of a space shipped in ``search_spaces/``.

Apart from :mod:`nasloc.space` (which needs torch through the MACs counter), so that the command line
can find ``--space`` before anything heavy loads.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import NaslocError

SPACES_DIR = Path(__file__).resolve().parents[2] / "search_spaces"


class SpaceError(NaslocError):
    """An invalid search space; the message is one line naming the file, the field and the reason."""


def resolve_space_path(path: str | Path) -> Path:
    """A space file by path, or by name/relative path inside the shipped ``search_spaces/``."""
    candidates = [Path(path), SPACES_DIR / Path(path).name, SPACES_DIR / f"{path}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise SpaceError(f"{path}: no such space file (shipped spaces: {shipped_spaces()})")


def shipped_spaces() -> str:
    """The names of the shipped spaces, for messages: ``cifar, imagenet, tiny, ...``."""
    return ", ".join(sorted(p.stem for p in SPACES_DIR.glob("*.yaml")))
