"""The budget strategies of the sampler (:class:`nasloc.search.sampler.TrialSeededSampler`): a feasible
start where the wrapped sampler would draw uniformly, and a repair of its proposals that are over budget;
the latency budget beside the MACs one."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

from ..arch import Arch
from ..space.choosers import Chooser, RandomChooser, ReplayChooser, option_label
from ..space.files import SpaceError
from ..space.flops import count
from ..space.search_space import SearchSpace

LATENCY_TRIES = 16  # MACs bounds tried to bring a proposal within the latency budget


@dataclass(frozen=True)
class LatencyBudget:
    """A second budget beside the MACs one: ``predict(arch)``, the latency table's prediction in milliseconds
    (:class:`nasloc.deploy.latency.LatencyModel`), at most ``limit_ms``."""

    limit_ms: float
    predict: Callable[[Arch], float]

    def excess(self, arch: Arch) -> float:
        """Predicted milliseconds over the budget (within it when <= 0)."""
        return self.predict(arch) - self.limit_ms


@dataclass(frozen=True)
class FeasibleStart:
    """The decisions (Optuna labels) of a random arch within the budget(s), for the trials a sampler would
    draw uniformly at random (:meth:`SearchSpace.decisions_in_band`)."""

    space: SearchSpace
    budget_macs: float
    latency: LatencyBudget | None = None

    def __call__(self, rng: random.Random) -> dict[str, Any]:
        return _labels(_within_budgets(self.space, rng, self.budget_macs, self.latency))


@dataclass(frozen=True)
class BudgetRepair:
    """A joint proposal (labels of some genes, e.g. an NSGA-II child) completed at random and, when over
    budget, walked into it one gene re-drawn at a time, the fewest changes that get there (the repair of
    constrained evolutionary NAS). A proposal within budget is kept as it is."""

    space: SearchSpace
    budget_macs: float
    latency: LatencyBudget | None = None

    def __call__(self, proposal: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        start = ReplayChooser(proposal, RandomChooser(rng), labels=True)
        return _labels(_within_budgets(self.space, rng, self.budget_macs, self.latency, start))


def _within_budgets(space: SearchSpace, rng: random.Random, budget_macs: float, latency: LatencyBudget | None,
                    start: Chooser | None = None) -> dict[str, Any]:
    """The decisions of :meth:`SearchSpace.decisions_in_band` within ``budget_macs`` (from ``start`` if given).

    Under a latency budget too, decisions over it are drawn (or walked from ``start``) again under a MACs
    bound lowered by the latency's excess (latency grows with MACs); where no arch of the space is that small,
    drawn again at random under the last bound. At most :data:`LATENCY_TRIES` times: the last decisions are
    returned even if still over it (the trial's constraint then keeps it from evaluation).
    """
    bound = budget_macs
    decisions = space.decisions_in_band(rng, 0.0, bound, start=start)
    for _ in range(LATENCY_TRIES if latency is not None else 0):
        arch = space.build(ReplayChooser(decisions, RandomChooser(rng)))
        predicted = latency.predict(arch)
        if predicted <= latency.limit_ms:
            break
        lower = min(bound, count(arch).macs) * latency.limit_ms / predicted
        try:
            decisions = space.decisions_in_band(rng, 0.0, lower, start=start)
            bound = lower
        except SpaceError:  # no arch of the space is that small
            decisions = space.decisions_in_band(rng, 0.0, bound)
    return decisions


def _labels(decisions: dict[str, Any]) -> dict[str, Any]:
    return {name: option_label(value) for name, value in decisions.items()}
