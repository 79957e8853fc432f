"""How a selection candidate is scored at the end of a rung: what its short training predicts of its retrain.

A candidate's training so far is a :class:`Curve` (per epoch: the mean training loss and the top-1 on the
selection's held-out half). Each score reads it, higher is better:

- ``val``: the top-1 at the end of the rung;
- ``tse``: training speed estimation (Ru et al. 2021), minus the sum of the epochs' mean training losses: an arch
  that learns fast now learns well later (rank correlation 0.95 with final accuracy on NAS-Bench-201 from a
  quarter of the training, as reported);
- ``extrapolated``: the top-1 a power law fitted to the rung's curve, ``a - b * epoch ** -c``, predicts at the end
  of the retrain (learning-curve extrapolation, Domhan et al. 2015, in its simplest form).

Which of them ranks candidates as their long retrain does is measured by ``bench/selection_scores.py``
(results/benchmarks.md); the supernet's proxy and MACs are measured there as baselines.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Curve:
    """A candidate's training so far: one entry per epoch trained, on a schedule of ``schedule_epochs``."""

    train_loss: Sequence[float]
    val_top1: Sequence[float]
    schedule_epochs: int

    @classmethod
    def from_history(cls, history: Sequence[dict], schedule_epochs: int) -> "Curve":
        """From :func:`nasloc.training.retrain.retrain`'s ``history`` (``train_loss``, ``val_top1`` per epoch)."""
        return cls(tuple(h["train_loss"] for h in history), tuple(h["val_top1"] for h in history), schedule_epochs)

    def first(self, epochs: int) -> "Curve":
        """The curve as it stood after ``epochs`` epochs (a rung of a longer training)."""
        return Curve(self.train_loss[:epochs], self.val_top1[:epochs], self.schedule_epochs)


def val(curve: Curve) -> float:
    return curve.val_top1[-1]


def tse(curve: Curve) -> float:
    total = sum(curve.train_loss)
    return -total if math.isfinite(total) else -math.inf


def extrapolated(curve: Curve, at: int | None = None) -> float:
    """Top-1 at epoch ``at`` (default: the end of the schedule) by a power law fitted to the curve's top-1;
    with fewer than three epochs there is nothing to fit and the last top-1 stands."""
    points = curve.val_top1
    if len(points) < 3 or not all(math.isfinite(p) for p in points):
        return points[-1]
    import numpy as np
    from scipy.optimize import curve_fit

    epochs = np.arange(1, len(points) + 1, dtype=float)
    target = float(at or curve.schedule_epochs)

    def law(t: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
        return a - b * t ** -c

    start = (min(100.0, points[-1] + 5.0), max(points[-1] - points[0], 1.0), 0.5)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy's covariance warning on an exact fit
            (a, b, c), _ = curve_fit(law, epochs, np.asarray(points, dtype=float), p0=start,
                                     bounds=([0.0, 0.0, 0.05], [100.0, np.inf, 3.0]), maxfev=5000)
    except (RuntimeError, ValueError):  # no fit: the curve is too flat or too noisy to say more
        return points[-1]
    return float(min(100.0, max(0.0, law(np.asarray(target), a, b, c))))


SCORES: dict[str, Callable[[Curve], float]] = {"val": val, "tse": tse, "extrapolated": extrapolated}


def score_of(name: str) -> Callable[[Curve], float]:
    """The score ``--select-score name`` ranks by: one of :data:`SCORES`, or ``complete``, the top-1 of a training
    whose schedule ends with the rung (the trainer restarts each rung; see :class:`nasloc.selection.trainer`)."""
    return val if name == "complete" else SCORES[name]


def all_scores(curve: Curve) -> dict[str, float]:
    """Every score of ``curve`` by name."""
    return {name: score(curve) for name, score in SCORES.items()}
