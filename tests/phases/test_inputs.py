"""nasloc.phases.inputs: what a run decides before it starts (the selection's last rung)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from nasloc.phases.inputs import chosen_select_epochs, default_select_epochs
from nasloc.run import RunDir, RunOptions, RunRecord


def test_the_last_rung_is_a_quarter_of_the_retrain_at_least_four_epochs_and_at_most_the_retrain() -> None:
    assert [default_select_epochs(r) for r in (1, 3, 5, 16, 30, 300)] == [1, 3, 4, 4, 7, 75]


def test_a_rerun_keeps_the_rungs_its_run_started_with(tmp_path: Path) -> None:
    options = RunOptions(budget=1.2e6, space="tiny", results_dir=tmp_path, retrain_epochs=30)
    assert chosen_select_epochs(options) == 7
    RunDir(options.run_dir).write_record(RunRecord(replace(options, select_epochs=7), 10, (0.5,), (0.5,)))
    longer = RunOptions(budget=1.2e6, space="tiny", results_dir=tmp_path, retrain_epochs=300)
    assert chosen_select_epochs(longer) == 7  # the retrain may grow; the selection's rungs stay


def _image_folder(root: Path, classes: int = 2, per_class: int = 10, side: int = 32) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


def test_real_data_is_searched_at_the_size_that_keeps_locality_and_a_smaller_one_is_warned_about(
        tmp_path: Path, capsys) -> None:
    from nasloc.phases.inputs import load_inputs

    data = _image_folder(tmp_path / "data")
    options = RunOptions(budget=7e8, space="imagenet", dataset="imagefolder", data_dir=data, batch_size=8,
                         results_dir=tmp_path / "results")
    _, _, record = load_inputs(options)
    assert record.options.proxy_img_size == 224 and "warning" not in capsys.readouterr().out
    _, _, record = load_inputs(replace(options, proxy_img_size=64))
    out = capsys.readouterr().out
    assert record.options.proxy_img_size == 64
    assert "--proxy-img-size 64 is below the locality rule's 224 px" in out
    assert "stage 3 (2x2 map): window 7, dilation 3, shortcut kernel 7" in out
    _, _, record = load_inputs(RunOptions(budget=7e8, results_dir=tmp_path / "results"))  # the digits' demo
    assert record.options.proxy_img_size == 32 and "warning" not in capsys.readouterr().out
