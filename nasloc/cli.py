"""Command line: ``nasloc search`` (also ``python run_search.py``) and ``nasloc export``.

Everything is parsed and validated here before torch, Optuna, the data sets or training load, so ``--help``
and bad input answer at once (``import nasloc`` imports none of them). The handlers receive the validated
:class:`argparse.Namespace` (paths absolute, budget in multiply-adds) and import what they need themselves.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Callable, NoReturn, Sequence

from nasloc.errors import NaslocError
from nasloc.space_files import SpaceError, resolve_space_path
from nasloc.units import ACCEPTED_FORMS, parse_budget, short_macs

# The choices of options whose modules need torch to import (nasloc.data, nasloc.search, nasloc.sampler);
# a test checks that they agree.
DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")
OBJECTIVES = ("top1", "macs", "params", "latency")
SAMPLERS = ("nsga2", "tpe", "random")
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

_EPILOG = """\
FLOPs convention: one multiply-add = one FLOP, as fvcore and the seed papers count, so GFLOPs = GMACs.
--budget 0.7GFLOPs means 0.7e9 multiply-adds per image at the search space's deploy resolution.

examples:
  %(prog)s --budget 0.7GFLOPs
  %(prog)s --budget 700M --dataset cifar10 --data-dir ~/data/cifar-10-batches-py --device cuda
  %(prog)s --budget 0.7G --storage journal.log --workers 4 --dashboard
"""


class UsageError(NaslocError):
    """Bad command-line input found after parsing; the message is one line."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit status 2), not usage plus a line."""

    def error(self, message: str) -> NoReturn:
        _print_error(self.prog, f"{message} (see {self.prog} --help)")
        sys.exit(2)


def _print_error(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- types


def _budget(text: str) -> float:
    try:
        return parse_budget(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    bounds = f">= {low}" if high is None else f"in {low}..{high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected an integer {bounds}, got {text!r}")
        return value

    return parse


def _objectives(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(","))
    unknown = [name for name in names if name not in OBJECTIVES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown objective(s) {unknown}; choose from {','.join(OBJECTIVES)}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"objective listed twice in {text!r}")
    if "top1" not in names:
        # Without accuracy the search would just return the smallest network.
        raise argparse.ArgumentTypeError(f"objectives must include top1, got {text!r}")
    return names


def _run_name(text: str) -> str:
    # The name becomes one folder under --results-dir, so no separators and no leading dot.
    if not _RUN_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected letters, digits, '.', '_' or '-', got {text!r}")
    return text


# ------------------------------------------------------------------------------------------ parsers


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of the main command (``nasloc search`` / ``run_search.py``) to ``parser``."""
    parser.description = (
        "Train a weight-sharing supernet over the locality search space, search it with Optuna\n"
        "(or Ray Tune) under a FLOPs budget, retrain the best subnets and export them as timm\n"
        "models. Everything lands in RESULTS_DIR/RUN_NAME/."
    )
    parser.epilog = _EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter

    what = parser.add_argument_group("what to search")
    what.add_argument("--budget", required=True, type=_budget, metavar="BUDGET",
                      help=f"FLOPs budget per image (multiply-adds), e.g. {ACCEPTED_FORMS}; required")
    what.add_argument("--space", metavar="YAML", default="search_spaces/imagenet.yaml",
                      help="search space: a YAML file, or the name of a shipped space in search_spaces/ "
                           "(imagenet, cifar, tiny, ...) (default: %(default)s)")
    what.add_argument("--objectives", metavar="LIST", default=("top1", "macs"), type=_objectives,
                      help=f"comma list from {','.join(OBJECTIVES)}; top1 is maximised, the rest minimised "
                           "(default: top1,macs)")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="digits", choices=DATASETS,
                      help="digits ships with scikit-learn (no download); cifar10/cifar100 read the official "
                           "python format; imagefolder reads an ImageFolder tree of class folders "
                           "(default: %(default)s)")
    data.add_argument("--data-dir", metavar="DIR", type=Path,
                      help="data set folder; required for every data set but digits")
    data.add_argument("--proxy-img-size", metavar="PX", type=_int_in(1),
                      help="image size for supernet training and search (default: chosen from the data set)")

    effort = parser.add_argument_group("effort")
    effort.add_argument("--supernet-epochs", metavar="N", type=_int_in(0), default=5,
                        help="supernet training epochs; 0 searches untrained weights (default: %(default)s)")
    effort.add_argument("--trials", metavar="N", type=_int_in(1), default=60,
                        help="search trials, counting those already in a resumed study (default: %(default)s)")
    effort.add_argument("--retrain-top-k", metavar="K", type=_int_in(0), default=2,
                        help="Pareto-optimal subnets within budget to retrain from scratch; 0 skips "
                             "retraining (default: %(default)s)")
    effort.add_argument("--retrain-epochs", metavar="N", type=_int_in(1), default=5,
                        help="epochs per retrained subnet (default: %(default)s)")
    effort.add_argument("--retrain-img-size", metavar="PX", type=_int_in(1),
                        help="image size for retraining (default: the space's deploy resolution)")

    run = parser.add_argument_group("run")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="auto takes cuda when available (default: %(default)s)")
    run.add_argument("--seed", metavar="N", type=_int_in(0), default=0,
                     help="seed for data split, sampler and training (default: %(default)s)")
    run.add_argument("--run-name", metavar="NAME", type=_run_name,
                     help="run folder name; rerunning with the same name resumes the run "
                          "(default: <space>-<dataset>-<budget>, e.g. imagenet-digits-0.7G or tiny-digits-1.5M)")
    run.add_argument("--phase", choices=("all", "supernet", "search"), default="all",
                     help="all: every phase; supernet: only train the supernet; search: only add trials to the "
                          "study with an already trained supernet (for extra workers on other machines sharing "
                          "--storage and the run folder) (default: %(default)s)")
    run.add_argument("--results-dir", metavar="DIR", type=Path, default=Path("results"),
                     help="parent folder of the run folders (default: %(default)s)")

    search = parser.add_argument_group("search engine")
    search.add_argument("--sampler", choices=SAMPLERS, default="nsga2",
                        help="Optuna sampler (default: %(default)s)")
    search.add_argument("--storage", metavar="URL|FILE",
                        help="Optuna storage: any Optuna URL (sqlite:///..., postgresql+psycopg2://...) or a "
                             "journal file path for several processes (default: "
                             "sqlite:///RESULTS_DIR/RUN_NAME/study.db)")
    search.add_argument("--backend", choices=("optuna", "ray"), default="optuna",
                        help="run trials with plain Optuna or with Ray Tune + OptunaSearch "
                             "(default: %(default)s)")
    search.add_argument("--ray-address", metavar="ADDRESS",
                        help="address of a running Ray cluster (with --backend ray; default: start a local one)")
    search.add_argument("--workers", metavar="N", type=_int_in(1), default=1,
                        help="trials evaluated concurrently (default: %(default)s)")
    search.add_argument("--dashboard", action="store_true",
                        help="serve optuna-dashboard on localhost while searching")
    search.add_argument("--dashboard-port", metavar="PORT", type=_int_in(1, 65535), default=8080,
                        help="port for --dashboard (default: %(default)s)")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``nasloc export`` to ``parser``."""
    parser.description = "Export one trial of a run as a timm model folder (config.json, model.safetensors)."
    parser.add_argument("--run", metavar="RUN", required=True,
                        help="run folder, or a run name under ./results")
    parser.add_argument("--trial", metavar="N", required=True, type=_int_in(0),
                        help="Optuna trial number to export")
    parser.add_argument("--out", metavar="DIR", type=Path,
                        help="output folder (default: RUN/export/trial-N)")


def build_parser() -> argparse.ArgumentParser:
    """The ``nasloc`` command with its subcommands."""
    parser = _Parser(prog="nasloc", description="Neural architecture search over the locality mechanisms "
                                                "of vision transformers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_search_arguments(commands.add_parser("search", help="run the whole search (same as run_search.py)"))
    add_export_arguments(commands.add_parser("export", help="export a trial as a timm model"))
    return parser


def build_search_parser(prog: str = "run_search.py") -> argparse.ArgumentParser:
    """The main command on its own, as ``run_search.py`` offers it."""
    parser = _Parser(prog=prog)
    add_search_arguments(parser)
    parser.set_defaults(command="search")
    return parser


# ------------------------------------------------------------------------------- validation + handlers


def _resolve_search(options: argparse.Namespace) -> None:
    """Check what argparse can't check alone and make every path absolute (Ray workers change directory)."""
    options.space = _find_space(options.space)
    options.data_dir = _find_data(options.dataset, options.data_dir)
    if options.ray_address is not None and options.backend != "ray":
        raise UsageError("--ray-address needs --backend ray")
    if options.run_name is None:
        options.run_name = f"{options.space.stem}-{options.dataset}-{short_macs(options.budget)}"
    options.results_dir = options.results_dir.expanduser().resolve()
    options.run_dir = options.results_dir / options.run_name
    if options.storage is None:
        options.storage = f"sqlite:///{options.run_dir / 'study.db'}"
    elif "://" not in options.storage:
        options.storage = str(Path(options.storage).expanduser().resolve())


def _find_space(text: str) -> Path:
    try:
        return resolve_space_path(Path(text).expanduser()).resolve()
    except SpaceError as err:
        raise UsageError(f"--space {err}") from None


def _find_data(dataset: str, data_dir: Path | None) -> Path | None:
    if dataset == "digits":
        if data_dir is not None:
            raise UsageError("--data-dir is not used with --dataset digits (the digits ship with scikit-learn)")
        return None
    if data_dir is None:
        raise UsageError(f"--dataset {dataset} needs --data-dir")
    if not data_dir.expanduser().is_dir():
        raise UsageError(f"--data-dir {str(data_dir)!r} is not a folder")
    return data_dir.expanduser().resolve()


def _resolve_export(options: argparse.Namespace) -> None:
    run = Path(options.run).expanduser()
    if not run.is_dir():
        run = Path("results") / options.run
    if not run.is_dir():
        raise UsageError(f"--run {options.run!r}: no such run folder (nor results/{options.run})")
    options.run = run.resolve()


def _search(options: argparse.Namespace) -> None:
    from nasloc.pipeline import run_pipeline  # Optuna, data and training load only once the input is known good

    run_pipeline(options)


def _export(options: argparse.Namespace) -> None:
    from nasloc.export import export_trial

    export_trial(options)


_COMMANDS = {"search": (_resolve_search, _search), "export": (_resolve_export, _export)}


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None, prog: Callable[[str], str]) -> int:
    try:
        options = parser.parse_args(argv)
    except SystemExit as done:  # --help, or a usage error already printed
        return int(done.code or 0)
    resolve, handle = _COMMANDS[options.command]
    name = prog(options.command)
    try:
        resolve(options)
    except UsageError as err:
        _print_error(name, f"{err} (see {name} --help)")
        return 2
    try:
        handle(options)
    except NaslocError as err:  # bad input that only the pipeline can see; anything else is a bug
        _print_error(name, str(err))
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nasloc`` console script; returns the exit status."""
    parser = build_parser()
    return _run(parser, argv, lambda command: f"{parser.prog} {command}")


def search_main(argv: Sequence[str] | None = None, prog: str = "run_search.py") -> int:
    """Entry point of ``run_search.py``: ``nasloc search`` with its own name in help and errors."""
    return _run(build_search_parser(prog), argv, lambda command: prog)
