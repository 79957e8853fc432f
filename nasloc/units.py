"""FLOPs budgets: parsing and printing.

nasloc follows the seed papers and fvcore: one multiply-add is one FLOP, so "GFLOPs" and "GMACs" are the
same number here. A budget is a count of multiply-adds per image at the search space's deploy resolution.
"""
from __future__ import annotations

import math
import re

ACCEPTED_FORMS = "0.7GFLOPs, 700MFLOPs, 0.7G, 700M or 7e8 (also GMACs/MMACs; 1 FLOP = 1 multiply-add)"

_PREFIXES = {"": 1.0, "g": 1e9, "m": 1e6}
# A number, then an optional G/M prefix, then an optional FLOPs/MACs unit (the unit needs the prefix).
_BUDGET = re.compile(
    r"(?P<number>(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)\s*(?:(?P<prefix>[gm])(?:flops?|macs?)?)?",
    re.IGNORECASE,
)
# A bare number below this almost certainly lost its G or M ("0.7" meant 0.7G); no ViT is that small.
_MIN_BARE_MACS = 1e3


def parse_budget(text: str) -> float:
    """Return the multiply-add count that ``text`` names, e.g. ``"0.7GFLOPs"`` -> ``7e8``.

    Raises ``ValueError`` with a one-line message naming the accepted forms.
    """
    match = _BUDGET.fullmatch(text.strip())
    if match is not None:
        prefix = (match["prefix"] or "").lower()
        macs = float(match["number"]) * _PREFIXES[prefix]
        if math.isfinite(macs) and macs > 0 and (prefix or macs >= _MIN_BARE_MACS):
            return macs
    raise ValueError(f"invalid budget {text!r}: give a positive multiply-add count like {ACCEPTED_FORMS}")


def format_macs(macs: float) -> str:
    """Print a multiply-add count in the unit the seed papers use, e.g. ``"0.70 GFLOPs (multiply-adds)"``."""
    if macs >= 1e8:
        return f"{macs / 1e9:.2f} GFLOPs (multiply-adds)"
    return f"{macs / 1e6:.2f} MFLOPs (multiply-adds)"


def short_macs(macs: float) -> str:
    """A compact budget for names, e.g. ``"0.7G"`` or ``"1.5M"``; :func:`parse_budget` reads it back."""
    if macs >= 1e8:
        return f"{macs / 1e9:g}G"
    return f"{macs / 1e6:g}M"
