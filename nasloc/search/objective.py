"""The objective of a search: one trial = one arch, suggested gene by gene, costed, constrained and
evaluated (see :mod:`nasloc.search.engine`)."""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import optuna

from ..arch import Arch
from ..space.choosers import RecordingChooser, option_label
from ..space.flops import count
from ..space.search_space import SearchSpace
from .budget import LatencyBudget

#: Objective names and their directions. top1 is the proxy top-1 accuracy (%) with supernet weights.
OBJECTIVES: dict[str, str] = {"top1": "maximize", "macs": "minimize", "params": "minimize", "latency": "minimize"}
CONSTRAINT = "macs_budget"
LATENCY_CONSTRAINT = "latency_budget"  # predicted ms - the latency budget, with --latency-budget


class EvaluationError(RuntimeError):
    """``evaluate`` gave no usable accuracy (NaN or infinite): the trial fails, the search goes on."""


# ------------------------------------------------------------------------------------------- objective
def check_objectives(objectives: Sequence[str], latency: Any = None) -> tuple[str, ...]:
    objectives = tuple(objectives)
    unknown = [o for o in objectives if o not in OBJECTIVES]
    if unknown or not objectives or len(set(objectives)) != len(objectives):
        raise ValueError(f"objectives {list(objectives)}: choose distinct names from {', '.join(OBJECTIVES)}")
    if "latency" in objectives and latency is None:
        raise ValueError("the latency objective needs a latency function (arch -> seconds or ms)")
    return objectives


def pessimistic_values(objectives: Sequence[str], macs: int, params: int) -> list[float]:
    """Values of an arch that was not evaluated: real MACs and params, top-1 0 and infinite latency."""
    known = {"top1": 0.0, "macs": float(macs), "params": float(params), "latency": math.inf}
    return [known[o] for o in objectives]


def record_arch(trial: Any, arch: Arch, budget_macs: float,
                latency_budget: LatencyBudget | None = None) -> tuple[int, int, bool]:
    """Store the arch and its cost on ``trial`` and set the budget constraint(s); returns (macs, params, whether
    the arch is within every budget).

    With ``latency_budget``, the predicted latency (ms) is stored as ``latency`` and constrained too. Shared by
    the plain objective and the Ray backend, so both leave the same user attributes.
    """
    cost = count(arch)
    trial.set_user_attr("arch", arch.to_dict())
    trial.set_user_attr("arch_json", arch.to_json())
    trial.set_user_attr("macs", int(cost.macs))
    trial.set_user_attr("params", int(cost.params))
    trial.set_constraint(CONSTRAINT, float(cost.macs - budget_macs))
    within = cost.macs <= budget_macs
    if latency_budget is not None:
        excess = latency_budget.excess(arch)
        trial.set_user_attr("latency", excess + latency_budget.limit_ms)
        trial.set_constraint(LATENCY_CONSTRAINT, excess)
        within = within and excess <= 0
    return int(cost.macs), int(cost.params), within


class Objective:
    """The Optuna objective of a search (picklable when ``evaluate`` and ``latency`` are).

    ``evaluate(arch) -> top-1 %`` (proxy accuracy; NaN allowed, the trial then fails) and the optional
    ``latency(arch) -> float`` (the latency table's prediction in ms) run only for archs within budget: the MACs
    budget and, when given, ``latency_budget``. User attributes left on every trial: ``arch`` (dict),
    ``arch_json``, ``macs``, ``params``, ``worker`` (host:pid), ``evaluated`` (and ``latency`` under a latency
    budget); and, when evaluated, ``top1``, ``eval_seconds`` (and ``latency``); ``fail_reason`` for a failed
    evaluation.
    """

    def __init__(
        self,
        space: SearchSpace,
        evaluate: Callable[[Arch], float],
        *,
        budget_macs: float,
        objectives: Sequence[str] = ("top1", "macs"),
        latency: Callable[[Arch], float] | None = None,
        latency_budget: LatencyBudget | None = None,
    ):
        self.space, self.evaluate, self.latency = space, evaluate, latency
        self.budget_macs, self.latency_budget = float(budget_macs), latency_budget
        self.objectives = check_objectives(objectives, latency)

    def __call__(self, trial: optuna.Trial) -> list[float]:
        arch = self.space.suggest(trial)
        # the constraints are set before evaluating
        macs, params, within = record_arch(trial, arch, self.budget_macs, self.latency_budget)
        if not within:
            trial.set_user_attr("evaluated", False)
            return pessimistic_values(self.objectives, macs, params)
        start = time.perf_counter()
        top1 = float(self.evaluate(arch))
        trial.set_user_attr("eval_seconds", time.perf_counter() - start)
        trial.set_user_attr("evaluated", True)
        if not math.isfinite(top1):
            reason = f"evaluate returned top-1 {top1}"
            trial.set_user_attr("fail_reason", reason)
            raise EvaluationError(reason)
        trial.set_user_attr("top1", top1)
        values = {"top1": top1, "macs": float(macs), "params": float(params)}
        if "latency" in self.objectives:
            assert self.latency is not None
            values["latency"] = float(self.latency(arch))
            trial.set_user_attr("latency", values["latency"])
        return [values[o] for o in self.objectives]


# ------------------------------------------------------------------------------------------- warm start
class _ArchChooser:
    """Chooses, for every gene :meth:`SearchSpace.build` asks, the option that ``arch`` took (so that the
    recorded decisions rebuild it). Gene names as in :mod:`nasloc.space`; skeleton-wide genes are the arch's
    fields of that name."""

    def __init__(self, arch: Arch):
        self.arch = arch
        self.shortcuts = {s.start: s for s in arch.shortcuts}
        self.offsets = [sum(stage.depth for stage in arch.stages[:i]) for i in range(len(arch.stages))]

    def __call__(self, name: str, options: tuple) -> Any:
        try:
            value = self._value(name, options)
        except (IndexError, AttributeError):  # a stage, block or head the arch does not have
            value = None
        if value not in options:
            raise ValueError(f"the arch has no choice among {[option_label(o) for o in options]} for gene {name}")
        return options[options.index(value)]  # the space's own option (2, not the arch's 2.0)

    def _value(self, name: str, options: tuple) -> Any:
        parts = name.split(".")
        if len(parts) == 1:
            return getattr(self.arch, name)
        i = int(parts[0][1:])
        stage = self.arch.stages[i]
        if len(parts) == 2:
            return getattr(stage, parts[1])
        j, gene = int(parts[1][1:]), parts[-1]
        block = stage.blocks[j]
        if gene == "dilation":
            return block.dilations[int(parts[2][1:])]
        if gene == "shortcut_kernels":
            return self.shortcuts[self.offsets[i] + j].kernels
        if gene == "shortcut":
            shortcut = self.shortcuts.get(self.offsets[i] + j)
            span, left = (shortcut.span if shortcut else 0), stage.depth - j
            # build() shortens a span to the blocks left in the stage: any option it shortens to this span will do.
            return next((o for o in options if min(o, left) == span), span)
        return getattr(block, gene)


def arch_params(space: SearchSpace, arch: Arch) -> dict[str, Any]:
    """The Optuna parameters (choice labels) with which ``space.suggest`` builds exactly ``arch``.

    ValueError (naming the gene) when the space cannot build it.
    """
    chooser = RecordingChooser(_ArchChooser(arch))
    if space.build(chooser) != arch:
        raise ValueError(f"the space {space.name} does not build this arch (same genes, other skeleton)")
    return {name: option_label(value) for name, value in chooser.decisions.items()}
