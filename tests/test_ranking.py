"""nasloc.ranking: tau and top-k precision on known inputs, the band sample, the check with stand-in scores,
and resumable standalone trainings on the embedded digits with the tiny space."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from nasloc.data import load_dataset
from nasloc.flops import count
from nasloc.ranking import (FolderTrainer, RankingError, check_ranking, kendall_tau, sample_band, short_recipe,
                            top_k_precision)
from nasloc.space import SearchSpace

SPACE = SearchSpace.load("tiny")
BAND = (5e5, 1.2e6)


def test_kendall_tau_on_known_orders():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40])[0] == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1])[0] == pytest.approx(-1.0)
    tau, p = kendall_tau([1, 2, 3, 4], [1, 3, 2, 4])  # one discordant pair of six
    assert tau == pytest.approx(4 / 6)
    assert 0 < p < 1
    assert kendall_tau(range(10), range(10))[1] < 0.001  # ten archs in the same order: not chance


def test_top_k_precision_on_known_orders():
    assert top_k_precision([1, 2, 3, 4, 5], [1, 2, 3, 4, 5]) == 3
    assert top_k_precision([1, 2, 3, 4, 5], [5, 4, 3, 2, 1]) == 1  # only the middle one is in both top-3
    assert top_k_precision([5, 1, 2, 3, 4], [1, 2, 3, 4, 5], k=2) == 1
    assert top_k_precision([6, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6]) == 0


def test_sample_band_gives_distinct_archs_of_the_band_and_is_seeded():
    archs = sample_band(SPACE, *BAND, n=10, seed=3)
    assert len(archs) == len(set(archs)) == 10
    assert all(BAND[0] <= count(a).macs <= BAND[1] for a in archs)
    assert sample_band(SPACE, *BAND, n=10, seed=3) == archs
    assert sample_band(SPACE, *BAND, n=4, seed=3) == archs[:4]  # a smaller sample is a prefix
    assert sample_band(SPACE, *BAND, n=10, seed=4) != archs


def test_check_ranking_with_stand_in_scores():
    archs = sample_band(SPACE, *BAND, n=6, seed=0)
    heard = []
    check = check_ranking(archs, proxy=lambda a: count(a).macs / 1e4,
                          standalone=lambda i, a: count(a).macs / 1e4 + (5 if i == 0 else 0), on_arch=heard.append)
    assert [r.index for r in heard] == list(range(6)) and [r.arch for r in check.archs] == archs
    expected_tau, expected_p = kendall_tau([r.proxy for r in check.archs], [r.standalone for r in check.archs])
    assert (check.tau, check.p_value) == (expected_tau, expected_p) and check.tau > 0.3
    report = check.report().splitlines()
    assert report[0].split() == ["arch", "MACs", "(M)", "proxy", "top-1", "standalone", "top-1"]
    assert len(report) == 1 + 6 + 2
    assert report[-2] == f"Kendall tau: {check.tau:.2f} (p = {check.p_value:.3g})"
    assert report[-1] == f"top-3 precision: {check.top3}/3"
    with pytest.raises(RankingError, match="at least 3 archs"):
        check_ranking(archs[:2], proxy=lambda a: 0.0, standalone=lambda i, a: 0.0)


@pytest.fixture(scope="module")
def few_digits():
    digits = load_dataset("digits", None, img_size=16)
    return replace(digits, train=digits.train.subset(np.arange(64)), val=digits.val.subset(np.arange(50)))


def test_folder_trainings_resume_and_refuse_another_sample(few_digits, tmp_path):
    archs = sample_band(SPACE, *BAND, n=3, seed=0)
    trainer = FolderTrainer(tmp_path, few_digits, epochs=1, img_size=16, seed=0, band=BAND, device="cpu")
    trainer.claim(archs)
    top1 = trainer(1, archs[1])
    assert 0 <= top1 <= 100
    checkpoint = tmp_path / "arch_1" / "last.pth"
    written = checkpoint.stat().st_mtime_ns
    assert trainer(1, archs[1]) == top1 and checkpoint.stat().st_mtime_ns == written  # done: only read back
    assert short_recipe(1, 16, 0) == trainer.cfg

    more = sample_band(SPACE, *BAND, n=4, seed=0)  # a larger sample of the same settings extends this one
    FolderTrainer(tmp_path, few_digits, epochs=1, img_size=16, seed=0, band=BAND).claim(more)
    for other in (dict(seed=1), dict(epochs=2), dict(band=(6e5, 1.2e6))):
        settings = dict(epochs=1, img_size=16, seed=0, band=BAND) | other
        with pytest.raises(RankingError, match="rerun with those settings") as error:
            FolderTrainer(tmp_path, few_digits, **settings).claim(archs)
        assert "\n" not in str(error.value)
    with pytest.raises(RankingError, match="other archs"):
        FolderTrainer(tmp_path, few_digits, epochs=1, img_size=16, seed=0, band=BAND).claim(archs[::-1])
