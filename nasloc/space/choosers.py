"""How a search space's genes are chosen: at random, replayed from recorded decisions, recorded, by an
Optuna trial, or pinned (:data:`Fixed`, with :data:`FREE` for a gene left to the chooser)."""
from __future__ import annotations

import random
from typing import Any, Callable

Chooser = Callable[[str, tuple], Any]
MISSING = object()  # no decision recorded for a gene


class RandomChooser:
    def __init__(self, rng: random.Random):
        self.rng = rng

    def __call__(self, name: str, options: tuple) -> Any:
        return options[self.rng.randrange(len(options))]


class ReplayChooser:
    """Replays recorded decisions; genes without one (or with an invalid one) go to ``fallback``.

    ``labels=True``: the decisions are Optuna choice labels (:func:`option_label`), as in trial params.
    """

    def __init__(self, decisions: dict[str, Any], fallback: Chooser, labels: bool = False):
        self.decisions, self.fallback, self.labels = decisions, fallback, labels

    def __call__(self, name: str, options: tuple) -> Any:
        value = self.decisions.get(name, MISSING)
        keys = [option_label(o) for o in options] if self.labels else options
        return options[keys.index(value)] if value in keys else self.fallback(name, options)


class RecordingChooser:
    def __init__(self, inner: Chooser):
        self.inner, self.decisions = inner, {}

    def __call__(self, name: str, options: tuple) -> Any:
        value = self.inner(name, options)
        self.decisions[name] = value
        return value


def option_label(option: Any) -> Any:
    """Optuna categorical choices must be scalars: kernel sets become '3+5'."""
    return "+".join(map(str, option)) if isinstance(option, tuple) else option


class OptunaChooser:
    def __init__(self, trial: Any):
        self.trial = trial

    def __call__(self, name: str, options: tuple) -> Any:
        labels = [option_label(o) for o in options]
        return options[labels.index(self.trial.suggest_categorical(name, labels))]


Fixed = Callable[[str, tuple], Any]
FREE = object()  # what a Fixed function returns for a gene it does not pin
