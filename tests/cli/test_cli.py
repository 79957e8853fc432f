"""The command line: budget parsing, --help, validation, handler wiring, README/CI agreement."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from nasloc.cli import arguments
from nasloc.cli import main as cli
from nasloc.errors import NaslocError
from nasloc.run import RunOptions
from nasloc.units import format_macs, parse_budget, short_macs

REPO = Path(__file__).resolve().parents[2]
RUN_SEARCH = REPO / "run_search.py"
FORMS = ("0.7GFLOPs", "700MFLOPs", "0.7G", "700M", "7e8")
SEARCH_FLAGS = (
    "--budget", "--space", "--dataset", "--data-dir", "--proxy-img-size", "--supernet-epochs", "--trials",
    "--retrain-top-k", "--retrain-epochs", "--retrain-img-size", "--device", "--seed", "--run-name",
    "--results-dir", "--sampler", "--objectives", "--storage", "--backend", "--ray-address", "--workers",
    "--dashboard", "--dashboard-port",
)
ACCEPTED = {
    "0.7GFLOPs": 7e8, "700MFLOPs": 7e8, "0.7G": 7e8, "700M": 7e8, "7e8": 7e8,
    "0.7gflops": 7e8, "0.7GFLOPS": 7e8, "700mflops": 7e8, "0.7g": 7e8, "700m": 7e8, "7E8": 7e8,
    "0.7GMACs": 7e8, "700MMACs": 7e8, "0.7gmacs": 7e8, "0.7GFLOP": 7e8, "0.7 GFLOPs": 7e8,
    "700000000": 7e8, "1.2G": 1.2e9, ".5G": 5e8, "5e-1G": 5e8, " 0.7G ": 7e8,
}
REJECTED = ("0.7GB", "0.7", "0", "0G", "=-0.7G", "abc", "", "inf", "nan", "0.7TFLOPs", "0.7FLOPs", "1,5G",
            "0.7 G FLOPs", "GFLOPs", "0x10G")
# Each run_search.py process costs a Python start-up, so only a few go through a real one.
REJECTED_IN_SUBPROCESS = ("0.7GB", "0.7", "=-0.7G", "")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def _budget_args(text: str) -> list[str]:
    # "--budget=-0.7G" keeps argparse from taking a leading "-" for an option.
    return [f"--budget{text}"] if text.startswith("=") else ["--budget", text]


@pytest.fixture
def space(tmp_path: Path) -> Path:
    path = tmp_path / "myspace.yaml"
    path.write_text("# stands in for a search space; the CLI only checks that it exists\n")
    return path


@pytest.fixture
def handled(monkeypatch: pytest.MonkeyPatch) -> list:
    """Stand-ins for the pipeline and exporter, recording what they receive (the options; the export's arguments)."""
    calls: list = []

    class Plan:  # what dry_run returns, as far as the command line reads it
        def lines(self) -> list[str]:
            return ["[nasloc] plan: a dry run"]

        def to_dict(self) -> dict:
            return {"device": "cpu", "phases": []}

    def dry_run(options: RunOptions) -> Plan:
        calls.append(("dry run", options))
        return Plan()

    for name, functions in (("nasloc.pipeline", dict(run_pipeline=calls.append, dry_run=dry_run)),
                            ("nasloc.deploy.export",
                             dict(export_trial=lambda *args, **options: calls.append(args)))):
        module = types.ModuleType(name)
        for function, record in functions.items():
            setattr(module, function, record)
        monkeypatch.setitem(sys.modules, name, module)
    return calls


# ----------------------------------------------------------------------------------------------- units


@pytest.mark.parametrize("text, macs", ACCEPTED.items())
def test_parse_budget_accepts(text: str, macs: float) -> None:
    assert parse_budget(text) == pytest.approx(macs)


@pytest.mark.parametrize("text", [t.lstrip("=") for t in REJECTED])
def test_parse_budget_rejects_with_one_line_naming_the_forms(text: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_budget(text)
    message = str(err.value)
    assert "\n" not in message
    assert all(form in message for form in FORMS)


def test_format_macs_names_the_unit() -> None:
    assert format_macs(7e8) == "0.70 GFLOPs (multiply-adds)"
    assert format_macs(1.234e9) == "1.23 GFLOPs (multiply-adds)"
    assert format_macs(5e6) == "5.00 MFLOPs (multiply-adds)"


@pytest.mark.parametrize("macs, text", [(7e8, "0.7G"), (1.25e9, "1.25G"), (1.5e6, "1.5M"), (9.9e7, "99M")])
def test_short_macs_reads_back(macs: float, text: str) -> None:
    assert short_macs(macs) == text
    assert parse_budget(text) == pytest.approx(macs)


# ------------------------------------------------------------------------------------- run_search.py


@pytest.mark.parametrize("text", FORMS)
def test_every_documented_form_parses(text: str) -> None:
    (written,) = cli.build_search_parser().parse_args(["--budget", text]).budget  # as written, for the family's names
    assert written == text and parse_budget(written) == pytest.approx(7e8)


def test_a_comma_list_of_budgets_is_a_family(space: Path, tmp_path: Path, handled: list) -> None:
    assert cli.search_main(["--budget", "0.3G, 0.5G,0.7GFLOPs", "--space", str(space),
                            "--results-dir", str(tmp_path / "out")]) == 0
    (options,) = handled
    assert options.family == ("0.3G", "0.5G", "0.7GFLOPs") and options.budget == pytest.approx(7e8)
    assert options.run_name == "myspace-digits-0.3G_0.5G_0.7G"
    assert [(label, member.budget, member.family) for label, member in options.members()] == [
        ("0.3G", pytest.approx(3e8), ()), ("0.5G", pytest.approx(5e8), ()), ("0.7GFLOPs", pytest.approx(7e8), ())]


def _assert_one_budget_line(stderr: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("run_search.py: error: argument --budget: invalid budget")
    assert all(form in lines[0] for form in FORMS)


@pytest.mark.parametrize("text", REJECTED_IN_SUBPROCESS)
def test_run_search_rejects_a_bad_budget_in_one_line(text: str) -> None:
    result = _run(str(RUN_SEARCH), *_budget_args(text))
    assert result.returncode == 2
    _assert_one_budget_line(result.stderr)
    assert result.stdout == ""


@pytest.mark.parametrize("text", REJECTED)
def test_search_main_rejects_a_bad_budget_in_one_line(text: str, handled: list,
                                                      capsys: pytest.CaptureFixture) -> None:
    assert cli.search_main(_budget_args(text)) == 2
    out, err = capsys.readouterr()
    _assert_one_budget_line(err)
    assert out == "" and handled == []


def test_help_documents_every_option() -> None:
    result = _run(str(RUN_SEARCH), "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: run_search.py")
    for flag in SEARCH_FLAGS:
        assert re.search(rf"^\s+{flag}\b", result.stdout, re.MULTILINE), f"{flag} not described in --help"
    assert "multiply-add" in result.stdout


def test_nasloc_search_has_the_same_options(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["search", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: nasloc search")
    assert all(flag in out for flag in SEARCH_FLAGS)


def _modules_loaded_by(code: str) -> set[str]:
    """Modules that ``code`` imports in a fresh interpreter, beyond what ``import nasloc`` loads."""
    script = (
        "import sys, nasloc\n"
        "before = set(sys.modules)\n"
        f"{code}\n"
        "print(' '.join(sorted(set(sys.modules) - before)))\n"
    )
    result = _run("-c", script)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.splitlines()[-1].split())


# What the command line may load before the input is known good: nothing that imports torch.
LIGHT_MODULES = {"nasloc.cli", "nasloc.cli.main", "nasloc.cli.arguments", "nasloc.cli.types", "nasloc.units", "nasloc.run", "nasloc.space",
                 "nasloc.space.files", "nasloc.errors", "nasloc.arch", "nasloc.fileio"}


def test_cli_imports_nothing_heavy_for_help_or_bad_input() -> None:
    loaded = _modules_loaded_by(
        "from nasloc.cli.main import search_main\n"
        "assert search_main(['--help']) == 0\n"
        "assert search_main(['--budget', 'nope']) == 2\n"
        "assert search_main(['--budget', '0.7G', '--space', 'no-such.yaml']) == 2"
    )
    packages = {name.split(".")[0] for name in loaded}
    assert not packages & {"torch", "timm", "optuna", "ray", "fvcore", "sklearn"}, packages
    assert {name for name in loaded if name.startswith("nasloc")} <= LIGHT_MODULES


def test_the_core_and_the_space_layer_load_no_torch() -> None:
    """Everything below the models (arch, spaces, FLOPs, seed designs) and the run's options is plain Python."""
    loaded = _modules_loaded_by("import nasloc.space.search_space, nasloc.space.flops, nasloc.space.band, "
                                "nasloc.space.seed_designs, nasloc.run, nasloc.console")
    assert not {name.split(".")[0] for name in loaded} & {"torch", "timm", "optuna", "numpy"}


def test_run_search_help_is_quick_and_loads_no_torch() -> None:
    code = ("import runpy, sys\n"
            f"sys.argv = [{str(RUN_SEARCH)!r}, '--help']\n"
            "try:\n"
            "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit as done:\n"
            "    assert done.code == 0\n"
            "heavy = {name.split('.')[0] for name in sys.modules} & {'torch', 'timm', 'optuna', 'numpy'}\n"
            "assert not heavy, heavy\n")
    started = time.perf_counter()
    result = _run("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: run_search.py")
    assert time.perf_counter() - started < 10  # 0.1 s on an idle machine; torch alone took 7-13 s


def test_import_nasloc_registers_the_family_when_timm_loads() -> None:
    """``import nasloc`` loads no torch, yet ``timm`` knows the family as soon as it is imported, in
    whichever order (a nasloc module that imports timm first included)."""
    for imports in ("import nasloc", "import nasloc, timm", "import timm, nasloc", "from nasloc.models import LocalityViT"):
        code = (f"import sys; {imports}\n"
                "if 'timm' not in sys.modules:\n"
                "    assert 'torch' not in sys.modules\n"
                "import timm\n"
                "print(len(timm.list_models('nasloc_*')), type(timm.create_model('nasloc_deit_tiny')).__name__)")
        result = _run("-c", code)
        assert result.returncode == 0, result.stderr
        count, name = result.stdout.split()
        assert int(count) >= 5 and name == "LocalityViT", imports


def test_option_choices_match_the_modules_behind_them() -> None:
    """cli keeps its own copy of choices whose modules import torch; they must agree."""
    from nasloc.search.objective import OBJECTIVES
    from nasloc.search.sampler import SAMPLERS
    from nasloc.selection.scores import SCORES
    from nasloc.training.data import DATASETS

    assert arguments.DATASETS == DATASETS and arguments.OBJECTIVES == tuple(OBJECTIVES) and arguments.SAMPLERS == SAMPLERS
    assert arguments.SELECT_SCORES == (*SCORES, "complete")


@pytest.mark.parametrize("options, message", [
    ({"phase": "serach"}, "phase='serach': choose one of"), ({"sampler": "grid"}, "sampler='grid': choose"),
    ({"select_init": "warm"}, "select_init='warm': choose"), ({"backend": "dask"}, "backend='dask': choose"),
    ({"dataset": "mnist"}, "dataset='mnist': choose"), ({"objectives": ("top1", "flops")}, "objectives=("),
    ({"backend": "ray", "latency_budget": 5.0}, "works with --backend optuna only"),
    ({"ray_address": "auto"}, "needs --backend ray"),
])
def test_run_options_made_in_python_refuse_bad_choices_in_one_line(options: dict, message: str) -> None:
    with pytest.raises(NaslocError, match=re.escape(message)) as err:
        RunOptions(budget=7e8, **options)
    assert "\n" not in str(err.value)


# The plain URL names SQLAlchemy's default PostgreSQL driver (psycopg 3, not installed): nasloc gives it the
# installed psycopg2, as the explicit second form, which finds no server on port 1.
@pytest.mark.parametrize("storage", ["postgresql://nouser@127.0.0.1:1/x", "postgresql+psycopg2://nouser@127.0.0.1:1/x"])
def test_an_unreachable_storage_fails_at_once_and_writes_nothing(storage: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked before any training (which takes minutes, on real data hours): nothing is written. (Not told to
    wait for the server; the wait is in tests/storage/test_startup_wait.py.)"""
    monkeypatch.setenv("NASLOC_DB_RETRY_SECONDS", "0")
    results = tmp_path / "results"
    started = time.perf_counter()
    result = _run(str(RUN_SEARCH), "--budget", "0.7GFLOPs", "--storage", storage, "--results-dir", str(results))
    seconds = time.perf_counter() - started
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("run_search.py: error: --storage postgresql+psycopg2://nouser"), \
        result.stderr
    assert ": cannot connect (" in lines[0]
    assert "[nasloc]" not in result.stdout
    assert not results.exists()
    assert seconds < 60, f"{seconds:.0f} s: the storage must be checked before the supernet trains"


def test_missing_budget_is_one_line() -> None:
    result = _run(str(RUN_SEARCH))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "run_search.py: error: the following arguments are required: --budget (see run_search.py --help)"
    ]


# -------------------------------------------------------------------------------- resolved options


def test_defaults_reach_the_pipeline(space: Path, tmp_path: Path, handled: list) -> None:
    assert cli.search_main(["--budget", "0.7GFLOPs", "--space", str(space),
                            "--results-dir", str(tmp_path / "out")]) == 0
    (options,) = handled
    run_dir = tmp_path / "out" / "myspace-digits-0.7G"
    assert isinstance(options, RunOptions)
    assert options.budget == pytest.approx(7e8)
    assert options.space == space
    assert options.run_name == "myspace-digits-0.7G"
    assert options.run_dir == run_dir
    assert options.storage == f"sqlite:///{run_dir}/study.db"
    assert options.objectives == ("top1", "macs")
    assert (options.dataset, options.data_dir, options.proxy_img_size) == ("digits", None, None)
    assert (options.supernet_epochs, options.trials, options.retrain_top_k, options.retrain_epochs) == (5, 60, 2, 5)
    assert (options.retrain_img_size, options.device, options.seed) == (None, "auto", 0)
    assert (options.sampler, options.backend, options.ray_address, options.workers) == ("nsga2", "optuna", None, 1)
    assert (options.dashboard, options.dashboard_port) == (False, 8080)
    assert (options.select_epochs, options.select_score, options.keep_checkpoints) == (None, "val", "needed")


def test_a_dry_run_reaches_the_planner_and_shows_its_plan(space: Path, tmp_path: Path, handled: list,
                                                         capsys: pytest.CaptureFixture) -> None:
    argv = ["--budget", "0.7G", "--space", str(space), "--results-dir", str(tmp_path), "--dry-run"]
    assert cli.search_main(argv) == 0
    assert capsys.readouterr().out == "[nasloc] plan: a dry run\n"
    assert cli.search_main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"device": "cpu", "phases": []}
    assert [call[0] for call in handled] == ["dry run", "dry run"]


def test_nasloc_search_resolves_the_same(space: Path, tmp_path: Path, handled: list) -> None:
    argv = ["--budget", "700M", "--space", str(space), "--results-dir", str(tmp_path)]
    assert cli.main(["search", *argv]) == 0
    assert cli.search_main(argv) == 0
    assert vars(handled[0]) == vars(handled[1])


def test_every_option_is_taken(space: Path, tmp_path: Path, handled: list) -> None:
    data = tmp_path / "cifar"
    data.mkdir()
    assert cli.search_main([
        "--budget", "1.5G", "--space", str(space), "--dataset", "cifar100", "--data-dir", str(data),
        "--proxy-img-size", "64", "--supernet-epochs", "0", "--trials", "7", "--retrain-top-k", "0",
        "--retrain-epochs", "3", "--retrain-img-size", "96", "--device", "cpu", "--seed", "3",
        "--run-name", "my.run_1", "--results-dir", str(tmp_path), "--sampler", "tpe",
        "--objectives", "top1,params,latency", "--storage", "postgresql+psycopg2://nas@localhost/nas",
        "--backend", "ray", "--ray-address", "ray://head:10001", "--workers", "4", "--dashboard",
        "--dashboard-port", "9000", "--select-epochs", "6", "--select-score", "tse", "--select-init", "supernet",
        "--select-top-k", "3", "--batch-size", "32", "--keep-checkpoints", "all",
    ]) == 0
    (options,) = handled
    assert options.data_dir == data
    assert options.run_dir == tmp_path / "my.run_1"
    assert options.objectives == ("top1", "params", "latency")
    assert options.storage == "postgresql+psycopg2://nas@localhost/nas"
    assert (options.proxy_img_size, options.supernet_epochs, options.trials, options.retrain_top_k) == (64, 0, 7, 0)
    assert (options.retrain_epochs, options.retrain_img_size, options.device, options.seed) == (3, 96, "cpu", 3)
    assert (options.sampler, options.backend, options.ray_address) == ("tpe", "ray", "ray://head:10001")
    assert (options.workers, options.dashboard, options.dashboard_port) == (4, True, 9000)
    assert (options.select_epochs, options.select_score, options.select_init, options.select_top_k) == (6, "tse", "supernet", 3)
    assert (options.batch_size, options.keep_checkpoints) == (32, "all")


def test_journal_storage_path_becomes_absolute(space: Path, tmp_path: Path, handled: list,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.search_main(["--budget", "7e8", "--space", str(space), "--storage", "journal.log"]) == 0
    assert handled[0].storage == str(tmp_path / "journal.log")
    assert handled[0].results_dir == tmp_path / "results"


@pytest.mark.parametrize("space_arg, name", [([], "imagenet"), (["--space", "tiny"], "tiny"),
                                             (["--space", "search_spaces/cifar.yaml"], "cifar")])
def test_shipped_spaces_are_found_from_anywhere(space_arg: list, name: str, tmp_path: Path, handled: list,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no search_spaces/ here
    assert cli.search_main(["--budget", "0.7G", *space_arg]) == 0
    assert handled[0].space == REPO / "search_spaces" / f"{name}.yaml"
    assert handled[0].run_name == f"{name}-digits-0.7G"


@pytest.mark.parametrize("args, message", [
    (["--dataset", "cifar10"], "--dataset cifar10 needs --data-dir"),
    (["--dataset", "imagefolder", "--data-dir", "/no/such/dir"], "is not a folder"),
    (["--data-dir", "."], "--data-dir is not used with --dataset digits"),
    (["--ray-address", "auto"], "--ray-address (ray_address) needs --backend ray"),
    (["--backend", "ray", "--latency-budget", "5ms"], "--latency-budget (latency_budget) works with --backend optuna"),
    (["--space", "no/such/space.yaml"], "shipped spaces: "),
    (["--objectives", "macs"], "must include top1"),
    (["--objectives", "top1,speed"], "unknown objective"),
    (["--objectives", "top1,macs,top1"], "listed twice"),
    (["--run-name", "../elsewhere"], "--run-name"),
    (["--workers", "0"], "--workers"),
    (["--trials", "many"], "--trials"),
    (["--dashboard-port", "70000"], "--dashboard-port"),
    (["--dataset", "mnist"], "invalid choice"),
    (["--sampler", "grid"], "invalid choice"),
])
def test_bad_options_exit_2_with_one_line(args: list, message: str, space: Path, handled: list,
                                          capsys: pytest.CaptureFixture) -> None:
    if "--space" not in args:
        args = ["--space", str(space), *args]
    assert cli.search_main(["--budget", "0.7G", *args]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("run_search.py: error: ") and message in err
    assert handled == []


def test_input_errors_from_the_pipeline_are_one_line(space: Path, handled: list, capsys: pytest.CaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(options: object) -> None:
        raise NaslocError("budget 0.70 GFLOPs (multiply-adds) is outside the space")

    monkeypatch.setattr(sys.modules["nasloc.pipeline"], "run_pipeline", refuse)
    assert cli.search_main(["--budget", "0.7G", "--space", str(space)]) == 2
    err = capsys.readouterr().err
    assert err == "run_search.py: error: budget 0.70 GFLOPs (multiply-adds) is outside the space\n"


def test_ctrl_c_is_one_line_and_exit_130(space: Path, handled: list, capsys: pytest.CaptureFixture,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(options: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(sys.modules["nasloc.pipeline"], "run_pipeline", interrupted)
    assert cli.search_main(["--budget", "0.7G", "--space", str(space)]) == 130
    err = capsys.readouterr().err
    assert err == "run_search.py: error: interrupted; the same command goes on from the last finished unit\n"


def test_a_tilde_after_an_equals_sign_is_the_home_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shell leaves "--out=~/x" alone; the path must not become a folder named "~"."""
    from nasloc.cli import train

    requests: list = []
    monkeypatch.setattr(train, "train_command", lambda **request: requests.append(request))
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "data").mkdir()
    assert cli.main(["train", "--model", "m", "--epochs", "1", "--out=~/runs/x", "--dataset", "imagefolder",
                     "--data-dir=~/data"]) == 0
    assert requests[0]["out"] == tmp_path / "runs" / "x" and requests[0]["data_dir"] == tmp_path / "data"


def test_bugs_in_the_pipeline_keep_their_traceback(space: Path, handled: list,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(options: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(sys.modules["nasloc.pipeline"], "run_pipeline", crash)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.search_main(["--budget", "0.7G", "--space", str(space)])


# ------------------------------------------------------------------------------------------- export


def test_nasloc_export_help() -> None:
    script = Path(sys.executable).with_name("nasloc")  # the console script of the installed package
    result = subprocess.run([str(script), "export", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: nasloc export")
    assert all(flag in result.stdout for flag in ("--run", "--trial", "--out"))


def test_export_finds_a_run_by_name(tmp_path: Path, handled: list, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "results" / "r1").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["export", "--run", "r1", "--trial", "3"]) == 0
    (arguments,) = handled  # export_trial(run, trial, out)
    assert arguments == (tmp_path / "results" / "r1", 3, None)


@pytest.mark.parametrize("args", [
    ["--run", "missing", "--trial", "1"], ["--run", "."], ["--run", ".", "--trial", "-1"],
])
def test_bad_export_exits_2_with_one_line(args: list, tmp_path: Path, handled: list,
                                          monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["export", *args]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("nasloc export: error: "), err
    assert handled == []


# ------------------------------------------------------------------------------------- README and CI


def _quick_start() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in section.splitlines() if line.startswith("    ")]


def test_readme_quick_start_is_two_complete_commands() -> None:
    search, tests = _quick_start()
    assert search.startswith("python3 -m venv .venv && .venv/bin/pip install -e ")
    assert search.endswith(" && .venv/bin/python run_search.py --budget 0.7GFLOPs")
    assert tests == "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest"


def test_ci_runs_the_readme_test_command() -> None:
    ci = REPO / ".ci" / "run"
    assert os.access(ci, os.X_OK)
    text = ci.read_text()
    assert "set -euo pipefail" in text
    assert f'TEST_COMMAND="{_quick_start()[1]}"' in text


def test_readme_opens_with_the_quick_start_and_stays_short() -> None:
    """The README's first code block is the quick start (after the paragraph and the headline); the rest lives in
    docs/."""
    lines = (REPO / "README.md").read_text().splitlines()
    first_code = [line.strip() for line in lines if line.startswith("    ")][:2]
    assert first_code == _quick_start()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail to docs/"


def _search_flags() -> set[str]:
    """Every --flag of run_search.py, from its parser (not a list kept by hand)."""
    return {flag for action in cli.build_search_parser()._actions for flag in action.option_strings
            if flag.startswith("--")} - {"--help"}


def test_readme_lists_every_option() -> None:
    """Every option of run_search.py is documented in docs/options.md, which the README links."""
    assert "(docs/options.md)" in (REPO / "README.md").read_text()
    options = (REPO / "docs" / "options.md").read_text()
    assert set(SEARCH_FLAGS) <= _search_flags()
    assert not [flag for flag in sorted(_search_flags()) if f"`{flag}`" not in options]


# Markdown that documents the product: every relative link and image must point at a file that exists, and an
# anchor at a heading of that file (GitHub's slugs).
DOCUMENTS = ("README.md", "CHANGELOG.md", "docs/*.md", "results/*.md", "results/*/README.md")
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    return {_slug(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line)}


def test_readme_and_docs_links_resolve() -> None:
    documents = sorted({path for pattern in DOCUMENTS for path in REPO.glob(pattern)})
    assert REPO / "docs" / "README.md" in documents
    broken = []
    for document in documents:
        for target in _LINK.findall(document.read_text()):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            name, _, anchor = target.partition("#")
            path = (document.parent / name).resolve() if name else document
            if not path.exists():
                broken.append(f"{document.relative_to(REPO)}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{document.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_readme_map_of_the_docs_names_every_guide() -> None:
    """docs/README.md (the map) and the README link every guide in docs/."""
    readme, docs_map = (REPO / "README.md").read_text(), (REPO / "docs" / "README.md").read_text()
    guides = sorted(p.name for p in (REPO / "docs").glob("*.md") if p.name != "README.md")
    assert guides
    assert not [g for g in guides if f"({g})" not in docs_map], "guides missing from docs/README.md"
    assert not [g for g in guides if f"(docs/{g})" not in readme], "guides missing from the README's documentation map"
