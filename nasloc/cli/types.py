"""The command line's value types: each parses and checks one argument's text, raising argparse's
``ArgumentTypeError`` (argparse turns it into one line and exit status 2). Torch-free, as
:mod:`nasloc.cli.arguments`."""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, Callable

from ..run import OBJECTIVES, RunError, parse_family
from ..units import parse_budget

_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def budget(text: str) -> float:
    """A MACs budget as the units module reads it (``0.7GFLOPs``, ``30M``)."""
    try:
        return parse_budget(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def budgets(text: str) -> tuple[str, ...]:
    """One budget, or a model family's comma list of them in increasing order, as written."""
    parts = tuple(part.strip() for part in text.split(","))
    try:
        if len(parts) > 1:
            parse_family(parts)
        else:
            parse_budget(text)
    except (ValueError, RunError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return parts


_LATENCY = re.compile(r"(?P<number>(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)\s*(?P<unit>ms|us|µs)", re.IGNORECASE)
_LATENCY_UNITS = {"ms": 1.0, "us": 1e-3, "µs": 1e-3}


def parse_latency_ms(text: str) -> float:
    """The milliseconds that ``text`` names: ``"5ms"`` -> 5.0, ``"500us"`` -> 0.5; ValueError (one line) otherwise."""
    match = _LATENCY.fullmatch(text.strip())
    if match is not None:
        ms = float(match["number"]) * _LATENCY_UNITS[match["unit"].lower()]
        if 0 < ms < float("inf"):
            return ms
    raise ValueError(f"invalid latency budget {text!r}: give a positive time with its unit, like 5ms, 0.5ms or 500us")


def latency_budget(text: str) -> float:
    """A latency budget in milliseconds (:func:`parse_latency_ms`)."""
    try:
        return parse_latency_ms(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _number(convert: Callable[[str], Any], what: str, bounds: str, within: Callable[[Any], bool]) -> Callable[[str], Any]:
    """The type of a number ``convert`` reads and ``within`` accepts; the error names ``what`` and its ``bounds``."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not within(value):
            raise argparse.ArgumentTypeError(f"expected {what} {bounds}, got {text!r}")
        return value

    return parse


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """The type of an integer of at least ``low`` (and at most ``high``)."""
    bounds = f">= {low}" if high is None else f"in {low}..{high}"
    return _number(int, "an integer", bounds, lambda value: low <= value and (high is None or value <= high))


def objectives(text: str) -> tuple[str, ...]:
    """A comma list of search objectives, each once, top1 among them."""
    names = tuple(name.strip() for name in text.split(","))
    unknown = [name for name in names if name not in OBJECTIVES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown objective(s) {unknown}; choose from {','.join(OBJECTIVES)}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"objective listed twice in {text!r}")
    if "top1" not in names:
        # Without accuracy the search would just return the smallest network.
        raise argparse.ArgumentTypeError(f"objectives must include top1, got {text!r}")
    return names


def band(text: str) -> tuple[float, float]:
    """``LO,HI``: a MACs band, low end first."""
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected LO,HI (two multiply-add counts), got {text!r}")
    lo, hi = (budget(part) for part in parts)
    if lo >= hi:
        raise argparse.ArgumentTypeError(f"the band's low end must be below its high end, got {text!r}")
    return lo, hi


def float_at_least(low: float, below: float | None = None) -> Callable[[str], float]:
    """The type of a number of at least ``low`` (and below ``below``)."""
    bounds = f">= {low:g}" if below is None else f">= {low:g} and < {below:g}"
    return _number(float, "a number", bounds, lambda value: low <= value < (float("inf") if below is None else below))


def recipe_type(name: str) -> Callable[[str], Any]:
    """The type of ``nasloc train``'s recipe option ``name``."""
    if name == "batch_size":
        return int_in(1)
    if name == "randaugment":
        return str  # checked against timm by the train command (importing timm here would slow --help)
    if name in ("label_smoothing", "ema_decay"):  # 1 would leave no target / never move the average
        return float_at_least(0, below=1)
    return float_at_least(0)


def user_path(text: str) -> Path:
    """A path, ``~`` expanded."""
    return Path(text).expanduser()  # the shell leaves "~" alone in --out=~/x


def run_name(text: str) -> str:
    """A run name: one folder under --results-dir."""
    # The name becomes one folder under --results-dir, so no separators and no leading dot.
    if not _RUN_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected letters, digits, '.', '_' or '-', got {text!r}")
    return text
