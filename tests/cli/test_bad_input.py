"""Every option of ``run_search.py`` with a bad value: exit status 2, one line on stderr that names the option and
the mend, and nothing written, so that the corrected command starts cleanly."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from nasloc.cli.main import search_main

TINY = ["--budget", "1.2M", "--space", "tiny"]  # a shipped space whose archs train in seconds
QUICK = ["--supernet-epochs", "0", "--trials", "2", "--select-top-k", "0", "--retrain-top-k", "0"]


def _taken_port() -> tuple[socket.socket, int]:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return holder, holder.getsockname()[1]


# option, its bad value(s) (other options as needed), what the line must say besides the option
BAD = [
    ("--budget", ["0.7GB"], "like 0.7GFLOPs"),
    ("--budget", ["99G"], "give a budget in that range"),
    ("--budget", ["1M,1M"], "are the same budget; give each once"),
    ("--budget", ["1.2M,1M"], "list the budgets in increasing order"),
    ("--budget", ["1M,1000k"], "like 0.7GFLOPs"),
    ("--budget", ["1M,99G"], "--budget 99G (99.00 GFLOPs (multiply-adds)): outside the space"),
    ("--space", ["no-such-space.yaml"], "shipped spaces"),
    ("--objectives", ["top1,flops"], "choose from"),
    ("--latency-budget", ["5parsecs"], "like 5ms"),
    ("--latency-budget", ["5ms", "--backend", "ray"], "--backend optuna only"),
    ("--dataset", ["mnist"], "choose from"),
    ("--data-dir", ["{tmp}/missing", "--dataset", "imagefolder"], "not a folder"),
    ("--data-dir", ["{tmp}", "--dataset", "digits"], "not used with --dataset digits"),
    ("--proxy-img-size", ["0"], "integer >= 1"),
    ("--proxy-img-size", ["7"], "use 4 or 8"),
    ("--supernet-epochs", ["-1"], "integer >= 0"),
    ("--trials", ["0"], "integer >= 1"),
    ("--select-top-k", ["-2"], "integer >= 0"),
    ("--select-epochs", ["0"], "integer >= 1"),
    ("--select-init", ["warm"], "choose from"),
    ("--batch-size", ["0"], "integer >= 1"),
    ("--batch-size", ["100000"], "lower the batch size"),
    ("--retrain-top-k", ["-1"], "integer >= 0"),
    ("--retrain-epochs", ["0"], "integer >= 1"),
    ("--retrain-img-size", ["30"], "use 28 or 32"),
    ("--device", ["tpu"], "choose from"),
    ("--seed", ["-1"], "integer >= 0"),
    ("--run-name", ["a/b"], "letters, digits"),
    ("--phase", ["serach"], "choose from"),
    ("--phase", ["search", "--supernet-epochs", "1"], "train it first with --phase supernet"),
    ("--results-dir", ["{tmp}/a-file"], "give a folder"),
    ("--sampler", ["grid"], "choose from"),
    ("--storage", ["postgres://user@host/db"], "use an SQLAlchemy URL"),
    ("--storage", ["{tmp}"], "give a file in it"),
    ("--backend", ["dask"], "choose from"),
    ("--ray-address", ["auto"], "needs --backend ray"),
    ("--workers", ["0"], "integer >= 1"),
    ("--dashboard-port", ["0"], "1..65535"),
    ("--dashboard-port", ["{taken}", "--dashboard"], "pick a free port"),
]
if not torch.cuda.is_available():  # a machine with CUDA has nothing to refuse here
    BAD.append(("--device", ["cuda"], "use --device cpu"))


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.mark.parametrize("option, values, mend", BAD, ids=[f"{o}={v[0]}" for o, v, _ in BAD])
def test_a_bad_value_is_one_line_exit_2_and_writes_nothing(option: str, values: list[str], mend: str,
                                                            tmp_path: Path, capsys: pytest.CaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    holder, port = _taken_port()
    with holder:
        argv = [*TINY, "--results-dir", str(tmp_path / "results"), *QUICK, option,
                *(v.format(tmp=tmp_path, taken=port) for v in values)]
        before = _files(tmp_path)
        assert search_main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("run_search.py: error: "), err
    assert option in lines[0] and mend in lines[0], lines[0]
    assert "[nasloc]" not in out  # refused before the run began
    assert _files(tmp_path) == before


def test_a_refused_run_leaves_the_run_name_free(tmp_path: Path, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A typo must not lock the run name: the corrected command starts the run."""
    monkeypatch.chdir(tmp_path)
    argv = [*TINY, "--results-dir", str(tmp_path / "results"), *QUICK]
    for bad in (["--proxy-img-size", "7"], ["--retrain-img-size", "30"], ["--batch-size", "100000"]):
        assert search_main([*argv, *bad]) == 2
    assert not (tmp_path / "results").exists()
    capsys.readouterr()
    assert search_main(argv) == 0
    assert "[nasloc] 2/6 search" in capsys.readouterr().out
    assert (tmp_path / "results" / "tiny-digits-1.2M" / "run.json").is_file()
