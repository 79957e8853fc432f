"""nasloc.phases.plan and --dry-run: the plan of a run, timed on the device, and nothing written."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from torch.utils.data import Subset

from nasloc.cli.main import search_main
from nasloc.phases import plan as planning
from nasloc.phases.inputs import load_inputs
from nasloc.phases.plan import make_plan
from nasloc.run import RunOptions

TINY = dict(budget=1.2e6, space="tiny", supernet_epochs=2, trials=10, select_top_k=4, retrain_epochs=3)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return load_inputs(RunOptions(**TINY, results_dir=tmp_path_factory.mktemp("results")))


def test_the_plan_names_every_phase_with_its_epochs_images_and_seconds(inputs) -> None:
    space, splits, record = inputs
    plan = make_plan(record, space, splits)
    assert [p.name for p in plan.phases] == ["supernet", "search", "selection", "retrain", "export"]
    supernet, search, selection, retrain, _ = plan.phases
    assert (supernet.epochs, supernet.images, search.epochs, search.images) == (2, len(splits.train), 10, len(splits.val) // 2)
    assert (selection.epochs, retrain.epochs) == (3, 3) and "10 candidates at most, rungs 1,2,3" in selection.note
    assert all(p.est_seconds > 0 for p in plan.phases)
    assert plan.est_seconds == pytest.approx(sum(plan.by_phase().values()))
    assert plan.device == "cpu" and plan.proxy_img_size == plan.retrain_img_size == 16 and plan.peak_memory_gb > 0
    lines = plan.lines()
    assert lines[0].startswith("[nasloc] plan: cpu, 1 process; proxy 16 px, retrain 16 px; band")
    assert any(" search " in line and "10 trials" in line for line in lines)


def test_the_estimates_follow_the_options(inputs, monkeypatch) -> None:
    """With fixed timings (a step 0.1 s, a forward pass 1 ms per image): a longer selection costs more; more
    processes share the search and the selection; without a selection there is none."""
    space, splits, record = inputs
    monkeypatch.setattr(planning, "_time", lambda *a, **k: dict(train_step_s=0.1, forward_image_s=1e-3, memory_gb=1.0))
    plan = make_plan(record, space, splits)
    steps = -(-len(splits.train) // 64)
    assert plan.by_phase()["supernet"] == pytest.approx(2 * steps * 0.3 * 1.1)  # the sandwich: 3 archs a step
    longer = make_plan(replace(record, options=replace(record.options, select_epochs=8)), space, splits)
    assert longer.by_phase()["selection"] > plan.by_phase()["selection"]
    shared = make_plan(replace(record, options=replace(record.options, workers=2)), space, splits)
    assert shared.processes == 2 and shared.by_phase()["search"] < plan.by_phase()["search"]
    none = make_plan(replace(record, options=replace(record.options, select_top_k=0)), space, splits)
    assert "selection" not in none.by_phase()


def test_a_batch_that_would_not_fit_is_warned_about_with_one_that_does(inputs, monkeypatch) -> None:
    space, splits, record = inputs
    monkeypatch.setattr(planning, "_available_memory_gb", lambda device: 0.01)
    plan = make_plan(record, space, splits)
    assert len(plan.warnings) == 1 and "GB available on cpu: use --batch-size 1 or less" in plan.warnings[0]
    assert plan.lines()[-1].startswith("[nasloc] warning: the steps would take about")


def test_a_dry_run_checks_prints_the_plan_as_json_and_writes_nothing(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["--budget", "1.2M", "--space", "tiny", "--supernet-epochs", "2", "--results-dir", str(tmp_path / "r")]
    assert search_main([*argv, "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {"device", "proxy_img_size", "retrain_img_size", "band_macs", "phases"} <= set(plan)
    assert [set(p) >= {"name", "epochs", "images", "est_seconds"} for p in plan["phases"]] == [True] * 5
    assert list(tmp_path.iterdir()) == []
    assert search_main([*argv, "--dry-run", "--proxy-img-size", "7"]) == 2  # checked as a run checks it
    assert "--proxy-img-size 7" in capsys.readouterr().err


def test_the_retrain_names_the_most_a_tie_can_send_and_a_tiny_validation_set_warns(inputs, monkeypatch) -> None:
    """10 candidates at rungs 1,2,3 leave 3 at the last rung: with --retrain-top-k 1 a tie there retrains up to 3.
    On 40 held-out images scores 22 points apart tie, which the plan warns about; tse has no held-out ties."""
    space, splits, record = inputs
    monkeypatch.setattr(planning, "_time", lambda *a, **k: dict(train_step_s=0.1, forward_image_s=1e-3, memory_gb=1.0))
    options = replace(record.options, retrain_top_k=1)
    plan = make_plan(replace(record, options=options), space, splits)
    retrain = next(p for p in plan.phases if p.name == "retrain")
    assert "1 finalist, up to 3 if the selection's last rung ties: scores within" in retrain.note
    assert f"on {len(splits.val)} held-out images" in retrain.note and not plan.warnings
    tiny = replace(splits, val=Subset(splits.val, range(40)))
    warned = make_plan(replace(record, options=options), space, tiny)
    assert warned.warnings == ["the 40 validation images tie selection scores within 22 points: expect most of the "
                               "last rung's 3 candidates to be retrained, not --retrain-top-k 1 (the retrain estimate "
                               "counts 1); more images narrow the tie"]
    tse = make_plan(replace(record, options=replace(options, select_score="tse")), space, tiny)
    assert not tse.warnings and "no ties" in next(p for p in tse.phases if p.name == "retrain").note


def test_the_retrain_trains_at_the_run_batch_where_the_recipe_batch_exceeds_the_training_images() -> None:
    """A data set of 100 training images: the recipe's batch of 128 would give no step; --batch-size (checked
    against the split before anything is written) is taken instead, in the retrain, its plan and the export."""
    from nasloc.phases.retrain import run_recipe

    options = RunOptions(budget=1.2e6, space="tiny", batch_size=32, retrain_epochs=5)
    assert run_recipe(options, 1000).batch_size == 128 and run_recipe(options, 100).batch_size == 32
    assert run_recipe(options, 100, img_size=16).img_size == 16
