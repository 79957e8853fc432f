"""nasloc.supernet.ranking_check: tau and top-k precision on known inputs, the band sample, the check with stand-in
scores, and resumable standalone trainings on the embedded digits with the tiny space."""
from __future__ import annotations

import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from nasloc.cli import main as cli
from nasloc.space.flops import count
from nasloc.space.search_space import SearchSpace
from nasloc.supernet.ranking_check import (
    FolderTrainer,
    RankingError,
    check_ranking,
    kendall_tau,
    sample_band,
    short_recipe,
    top_k_precision,
)
from nasloc.training.data import load_dataset

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


# ------------------------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A run of the tiny space on the digits with a one-epoch supernet (the search's first phase only)."""
    results = tmp_path_factory.mktemp("results")
    status = cli.main(["search", "--budget", "1.2M", "--space", "tiny", "--supernet-epochs", "1", "--phase", "supernet",
                       "--device", "cpu", "--results-dir", str(results), "--run-name", "r"])
    assert status == 0
    return results / "r"


def test_check_ranking_command_on_digits_resumes(tiny_run, capsys):
    args = ["check-ranking", "--run", str(tiny_run), "--archs", "4", "--epochs", "1"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out.splitlines()
    table = out[out.index(next(line for line in out if line.split()[:1] == ["arch"])):]
    assert len(table) == 1 + 4 + 2
    assert re.fullmatch(r"Kendall tau: -?\d\.\d\d \(p = .+\)", table[-2])
    assert re.fullmatch(r"top-3 precision: [23]/3", table[-1])  # of 4 archs, two top-3 share at least 2
    for i, row in enumerate(table[1:5]):
        index, macs, proxy, standalone = row.split()
        assert int(index) == i and 0.9 <= float(macs) <= 1.2  # the default band: [0.75 budget, budget], in M
        assert 0 <= float(proxy) <= 100 and 0 <= float(standalone) <= 100
    folder = tiny_run / "check-ranking"
    checkpoints = [folder / f"arch_{i}" / "last.pth" for i in range(4)]
    written = [c.stat().st_mtime_ns for c in checkpoints]

    assert cli.main(args) == 0  # finished: read back, not trained again
    assert capsys.readouterr().out.splitlines()[-7:] == table
    assert [c.stat().st_mtime_ns for c in checkpoints] == written

    assert cli.main([*args, "--seed", "1"]) == 2  # another sample would mix with this one's trainings
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rerun with those settings" in err


def test_check_ranking_refuses_bad_input_in_one_line(tiny_run, tmp_path, capsys):
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    shutil.copy(tiny_run / "run.json", untrained / "run.json")
    for args, message in (
        (["--run", str(tmp_path / "nope")], "no such run folder"),
        (["--run", str(tmp_path)], "run.json is missing"),
        (["--run", str(untrained)], "has no trained supernet"),
        (["--run", str(tiny_run), "--archs", "2"], "expected an integer >= 3"),
        (["--run", str(tiny_run), "--band", "1G,2G"], "could not reach the MACs band"),
    ):
        assert cli.main(["check-ranking", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (args, err)
