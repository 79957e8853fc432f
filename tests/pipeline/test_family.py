"""A model family from one run (``--budget 0.8M,1.2M``): one supernet over both budgets' bands, then a search,
selection, retrain and export per budget, and family.csv / family.html / family.png comparing them. Through the
real command, on the tiny data of ``test_pipeline.py``."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import optuna
import pytest
from test_pipeline import args, make_digits_folder, one_thread, run

from nasloc.cli.main import main
from nasloc.run import RunOptions, RunRecord
from nasloc.space.band import search_band, supernet_bands
from nasloc.space.search_space import SearchSpace
from nasloc.storage.factory import open_storage
from nasloc.supernet.supernet import Supernet
from nasloc.supernet.train import SandwichSampler

FAMILY = "0.8M,1.2M"


@pytest.fixture(scope="module")
def family_run(tmp_path_factory) -> Path:
    data = make_digits_folder(tmp_path_factory.mktemp("digits") / "images")
    results = tmp_path_factory.mktemp("results")
    with one_thread():
        assert run(args(results, data, budget=FAMILY, trials=4, select_top_k=1, select_epochs=1)) == 0
    return results / "tiny-imagefolder-0.8M_1.2M"


def test_each_budget_has_its_studies_folder_and_export(family_run: Path) -> None:
    storage = open_storage(f"sqlite:///{family_run / 'study.db'}")
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage))
    assert names == ["nasloc-0.8M", "nasloc-1.2M", "selection-0.8M", "selection-1.2M"]  # the dashboard lists them
    for label, budget in (("0.8M", 8e5), ("1.2M", 1.2e6)):
        study = optuna.load_study(study_name=f"nasloc-{label}", storage=storage)
        assert study.user_attrs["budget_macs"] == budget
        assert all(t.user_attrs["macs"] <= budget for t in study.trials if "top1" in t.user_attrs)
        assert (family_run / label / "summary.md").read_text().startswith(f"# nasloc run `{family_run.name}`, "
                                                                          f"budget {label}")
        assert {p.name for p in (family_run / label).iterdir()} >= {"trials.csv", "pareto.html", "selection.csv",
                                                                    "selection", "retrain"}
        assert (family_run / "export" / label / "config.json").is_file()
        assert '<script charset="utf-8" src="../plotly.min.js">' in (family_run / label / "pareto.html").read_text()
        assert not (family_run / label / "plotly.min.js").exists()  # one copy, in the run folder
    assert (family_run / "supernet" / "last.pth").is_file()


def test_family_csv_has_a_row_per_budget_and_the_plots_exist(family_run: Path) -> None:
    with open(family_run / "family.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["budget"] for r in rows] == ["0.8M", "1.2M"]
    assert [int(r["budget_macs"]) for r in rows] == [800_000, 1_200_000]
    for row in rows:
        assert 0 < int(row["macs"]) <= int(row["budget_macs"]) and 0 <= float(row["top1"]) <= 100
        assert row["export"] == f"export/{row['budget']}" and row["design"]
    assert (family_run / "family.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (family_run / "summary.md").read_text()  # the family's page: a row per budget, linking its own
    for row in rows:
        line = next(line for line in summary.splitlines() if line.startswith(f"| {row['budget']} |"))
        assert f"| `{row['export']}` | {row['design']} | {row['trial']} | {float(row['top1']):.2f} |" in line
        assert f"[summary]({row['budget']}/summary.md)" in line
    assert "(family.png)" in summary and "## Plan against actual" in summary
    assert "the family (exports)" in (family_run / "family.html").read_text()


def test_nasloc_export_takes_a_trial_of_one_budget(family_run: Path, capsys: pytest.CaptureFixture) -> None:
    storage = open_storage(f"sqlite:///{family_run / 'study.db'}")
    trial = optuna.load_study(study_name="nasloc-1.2M", storage=storage).best_trials[0]
    assert main(["export", "--run", str(family_run), "--trial", str(trial.number), "--budget", "1.2M"]) == 0
    config = json.loads((family_run / "export" / f"1.2M-trial-{trial.number}" / "config.json").read_text())
    assert config["nasloc"]["study"] == "nasloc-1.2M" and config["nasloc"]["budget"] == 1.2e6
    capsys.readouterr()
    for extra, message in (([], "the run is a model family: name one of its budgets with --budget (0.8M, 1.2M)"),
                           (["--budget", "1M"], "budget 1M: not one of the run's budgets (0.8M, 1.2M")):
        assert main(["export", "--run", str(family_run), "--trial", "0", *extra]) == 2
        assert message in capsys.readouterr().err


def test_evaluate_and_check_ranking_take_one_budget(family_run: Path, capsys: pytest.CaptureFixture) -> None:
    storage = open_storage(f"sqlite:///{family_run / 'study.db'}")
    trial = optuna.load_study(study_name="nasloc-0.8M", storage=storage).best_trials[0]
    data = ["--dataset", "imagefolder", "--data-dir", str(json.loads((family_run / "run.json").read_text())
                                                            ["data_dir"])]
    capsys.readouterr()
    assert main(["evaluate", "--model", f"{family_run}:0.8M:{trial.number}", *data, "--throughput-batch", "2",
                 "--json"]) == 0
    measured = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert measured["macs"] == trial.user_attrs["macs"] and 0 <= measured["top1"] <= 100
    for model, message in ((f"{family_run}:{trial.number}", "name one of its budgets with RUN:BUDGET:TRIAL (0.8M, 1.2M)"),
                           (f"{family_run}:1M:{trial.number}", "budget 1M: not one of the run's budgets")):
        assert main(["evaluate", "--model", model, *data]) == 2
        assert message in capsys.readouterr().err

    with one_thread():
        assert main(["check-ranking", "--run", str(family_run), "--budget", "0.8M", "--archs", "3", "--epochs", "1"]) == 0
    rows = capsys.readouterr().out.splitlines()[-6:-2]
    assert all(0.6 <= float(row.split()[1]) <= 0.8 for row in rows[1:])  # 0.8M's band, in M, not 1.2M's
    assert len(list((family_run / "0.8M" / "check-ranking").glob("arch_*/last.pth"))) == 3
    assert main(["check-ranking", "--run", str(family_run), "--archs", "3"]) == 2
    assert "name one of its budgets with --budget" in capsys.readouterr().err


def test_a_rerun_resumes_every_budget_without_new_work(family_run: Path, tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{family_run / 'study.db'}")
    before = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage)}
    data = make_digits_folder(tmp_path / "images")
    with one_thread():
        assert run(args(family_run.parent, data, budget=FAMILY, trials=4, select_top_k=1, select_epochs=1)) == 0
    assert {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage)} == before


def test_the_supernet_spreads_its_random_archs_over_every_budget() -> None:
    space = SearchSpace.load("tiny")
    options = RunOptions(budget=0, space="tiny", family=("0.5M", "1M", "2M"))
    assert options.budget == 2e6 and [label for label, _ in options.members()] == ["0.5M", "1M", "2M"]
    band, buckets = supernet_bands(space, [member.budget for _, member in options.members()])
    assert buckets == [search_band(space, b) for b in (5e5, 1e6, 2e6)] and (band.lo, band.hi) == (buckets[0].lo, 2e6)
    sampler = SandwichSampler(Supernet(space, 16), band, random_subnets=300, sub_bands=3, buckets=buckets)
    from nasloc.space.flops import count

    macs = [count(arch).macs for arch in sampler.step(random.Random(0))[2:]]
    shares = [sum(b.lo <= m <= b.hi for m in macs) / len(macs) for b in buckets]
    assert all(share > 0.2 for share in shares), shares  # each budget's band gets its share of the random archs


def test_members_have_their_own_study_names_and_folders() -> None:
    record = RunRecord(RunOptions(budget=0, space="tiny", family=("1M", "2M")), 10, (0.5,), (0.5,))
    first, second = record.members()
    assert (first.study_name, first.selection_study, first.options.budget) == ("nasloc-1M", "selection-1M", 1e6)
    assert (second.member, second.options.family) == ("2M", ())
    single = RunRecord(RunOptions(budget=1e6, space="tiny"), 10, (0.5,), (0.5,))
    assert single.members() == [single] and single.selection_study == "selection"
