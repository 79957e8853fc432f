"""The candidates of the selection: the search's best trials spread over the MACs band, and the seed designs."""
from __future__ import annotations

import math
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial

from ..arch import Arch
from ..search.study import SEED_DESIGN_ATTR, evaluated_feasible_trials


@dataclass(frozen=True)
class Candidate:
    """An arch competing in the selection: search trial ``trial`` of the search study. ``source`` names it:
    the trial's number (``"12"``), or the seed design's name (``"DW shortcut"``) for the seed designs that
    the search queued first (:func:`nasloc.search.study.enqueue_warm_start`)."""

    source: str
    arch: Arch
    trial: int

    @property
    def name(self) -> str:
        """How a person reads it: the seed design's name, or ``search trial 12``."""
        return f"search trial {self.source}" if self.source.isdigit() else self.source


def _candidate(trial: FrozenTrial) -> Candidate:
    source = trial.user_attrs.get(SEED_DESIGN_ATTR, str(trial.number))
    return Candidate(source, Arch.from_dict(trial.user_attrs["arch"]), trial.number)


def search_candidates(study: optuna.Study, budget_macs: float, top_k: int, band_low: float) -> list[Candidate]:
    """The ``top_k`` best evaluated searched trials within budget, spread over the MACs band, then every seed
    design that the search evaluated within budget: ``top_k`` search candidates compete with the seed designs.

    The band [band_low, budget] is cut into ``ceil(top_k / 2)`` equal sub-bands and each trial competes
    only with the trials of its own sub-band (those below ``band_low`` join the lowest): the supernet
    overrates small archs, so a plain top-k by proxy would hold only the small end. The picks are taken
    round-robin, best first in each sub-band, starting from the sub-band next to the budget.
    """
    bins = max(1, math.ceil(top_k / 2))
    width = max(budget_macs - band_low, 1.0) / bins
    by_bin: list[list[FrozenTrial]] = [[] for _ in range(bins)]
    feasible = sorted(evaluated_feasible_trials(study, budget_macs), key=lambda t: (-t.user_attrs["top1"], t.number))
    seeds = list({t.user_attrs["arch_json"]: t for t in reversed(feasible) if SEED_DESIGN_ATTR in t.user_attrs}.values())
    seen = {t.user_attrs["arch_json"] for t in seeds}  # a searched trial that repeats a seed design is that design
    for trial in feasible:
        if trial.user_attrs["arch_json"] in seen:  # a seed design, or the same arch proposed twice
            continue
        seen.add(trial.user_attrs["arch_json"])
        index = min(bins - 1, max(0, int((trial.user_attrs["macs"] - band_low) // width)))
        by_bin[index].append(trial)
    picked: list[FrozenTrial] = []
    while len(picked) < top_k and any(by_bin):
        for group in reversed(by_bin):  # next to the budget first
            if group and len(picked) < top_k:
                picked.append(group.pop(0))
    picked += sorted(seeds, key=lambda t: t.number)
    return [_candidate(t) for t in picked]


def candidate_of(trial: FrozenTrial) -> Candidate:
    """The candidate a selection trial trains."""
    return Candidate(trial.user_attrs["source"], Arch.from_dict(trial.user_attrs["arch"]), trial.user_attrs["search_trial"])
