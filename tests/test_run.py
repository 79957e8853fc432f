"""nasloc.run: what a rerun of a run folder may change, and a model family's budgets."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from nasloc.run import RunDir, RunError, RunOptions, RunRecord, parse_family


def _record(tmp_path: Path, **options: object) -> RunRecord:
    return RunRecord(RunOptions(budget=1e6, space="tiny", results_dir=tmp_path, **options), 10, (0.5,), (0.5,))


def test_a_rerun_may_lower_the_batch_size_but_not_raise_it(tmp_path: Path) -> None:
    record = _record(tmp_path, batch_size=64)
    run = RunDir(record.options.run_dir)
    run.write_record(record)
    run.check_resumable(replace(record, options=replace(record.options, batch_size=32)))  # out of memory: allowed
    with pytest.raises(RunError, match=r"--batch-size 64 \(now 128\)"):
        run.check_resumable(replace(record, options=replace(record.options, batch_size=128)))


def test_a_rerun_must_repeat_the_family(tmp_path: Path) -> None:
    record = _record(tmp_path, family=("1M", "2M"), run_name="fam")
    run = RunDir(record.options.run_dir)
    run.write_record(record)
    assert run.read_record().options.family == ("1M", "2M")
    other = _record(tmp_path, family=("1M", "1.5M", "2M"), run_name="fam")
    with pytest.raises(RunError, match=r"--budget 1M,2M \(now 1M,1.5M,2M\)"):
        run.check_resumable(other)


@pytest.mark.parametrize("budgets, message", [
    (("1M",), "at least two budgets"), (("1M", "1M"), "are the same budget"),
    (("2M", "1M"), "in increasing order"), (("1M", "lots"), "invalid budget 'lots'")])
def test_a_bad_family_is_one_line(budgets: tuple[str, ...], message: str) -> None:
    with pytest.raises(RunError, match=message):
        parse_family(budgets)


def test_a_family_member_lives_in_its_own_folder_beside_the_shared_supernet(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "r")
    member = run.member_dir("0.3G")
    assert member.supernet_dir == run.supernet_dir and member.home == run.root / "0.3G"
    assert member.selection_dir(4) == run.root / "0.3G" / "selection" / "trial_4"
    assert member.best_export == run.root / "export" / "0.3G" and run.best_export == run.root / "export" / "best"
    assert member.summary == run.root / "0.3G" / "summary.md"
