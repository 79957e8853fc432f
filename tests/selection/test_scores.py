"""nasloc.selection.scores on known curves: the end-of-rung top-1, training speed and a power law's prediction."""
from __future__ import annotations

import math

import pytest

from nasloc.selection.scores import SCORES, Curve, all_scores, extrapolated, tse, val


def law(epoch: float, a: float = 80.0, b: float = 50.0, c: float = 0.7) -> float:
    return a - b * epoch ** -c


def test_val_is_the_last_top1_and_tse_the_negated_loss_sum() -> None:
    curve = Curve(train_loss=(2.0, 1.5, 1.25), val_top1=(30.0, 45.0, 50.0), schedule_epochs=30)
    assert val(curve) == 50.0
    assert tse(curve) == -4.75
    assert tse(Curve((2.0, math.nan), (30.0, 31.0), 30)) == -math.inf  # a diverged training ranks last


def test_a_power_law_is_extrapolated_to_the_end_of_the_schedule() -> None:
    points = tuple(law(e) for e in range(1, 9))
    curve = Curve(train_loss=(1.0,) * 8, val_top1=points, schedule_epochs=30)
    assert extrapolated(curve) == pytest.approx(law(30), abs=0.05)
    assert extrapolated(curve, at=8) == pytest.approx(points[-1], abs=0.05)
    # the faster learner now, the slower later: extrapolation orders them by where they end, the last top-1 not
    fast = Curve((1.0,) * 6, tuple(law(e, a=70, b=20, c=1.5) for e in range(1, 7)), 100)
    slow = Curve((1.0,) * 6, tuple(law(e, a=85, b=60, c=0.5) for e in range(1, 7)), 100)
    assert val(fast) > val(slow) and extrapolated(slow) > extrapolated(fast)


def test_short_or_broken_curves_fall_back_to_the_last_top1() -> None:
    assert extrapolated(Curve((1.0, 0.9), (20.0, 30.0), 30)) == 30.0  # two points: nothing to fit
    assert extrapolated(Curve((1.0,) * 3, (20.0, math.nan, 30.0), 30)) == 30.0
    flat = Curve((1.0,) * 4, (50.0,) * 4, 30)
    assert extrapolated(flat) == pytest.approx(50.0, abs=0.5)


def test_a_history_becomes_a_curve_and_every_score_reads_it() -> None:
    history = [dict(epoch=e, train_loss=2.0 / e, val_top1=law(e), lr=1e-3, seconds=1.0) for e in range(1, 6)]
    curve = Curve.from_history(history, schedule_epochs=10)
    assert curve.first(2) == Curve((2.0, 1.0), (law(1), law(2)), 10)
    scores = all_scores(curve)
    assert set(scores) == set(SCORES) == {"val", "tse", "extrapolated"}
    assert scores["val"] == law(5) and scores["tse"] == pytest.approx(-2.0 * sum(1 / e for e in range(1, 6)))
