"""nasloc.phases.inputs: what a run decides before it starts (the selection's last rung)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from nasloc.phases.inputs import chosen_select_epochs, default_select_epochs
from nasloc.run import RunDir, RunOptions, RunRecord


def test_the_last_rung_is_a_quarter_of_the_retrain_and_at_least_four_epochs() -> None:
    assert [default_select_epochs(r) for r in (1, 5, 16, 30, 300)] == [4, 4, 4, 7, 75]


def test_a_rerun_keeps_the_rungs_its_run_started_with(tmp_path: Path) -> None:
    options = RunOptions(budget=1.2e6, space="tiny", results_dir=tmp_path, retrain_epochs=30)
    assert chosen_select_epochs(options) == 7
    RunDir(options.run_dir).write_record(RunRecord(replace(options, select_epochs=7), 10, (0.5,), (0.5,)))
    longer = RunOptions(budget=1.2e6, space="tiny", results_dir=tmp_path, retrain_epochs=300)
    assert chosen_select_epochs(longer) == 7  # the retrain may grow; the selection's rungs stay
