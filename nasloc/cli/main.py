"""Command line: ``nasloc search`` (also ``python run_search.py``), ``nasloc export``, ``nasloc check-ranking``,
``nasloc train``, ``nasloc evaluate``, ``nasloc latency`` and ``nasloc presets``.

The parsers live in :mod:`nasloc.cli.arguments`; here what argparse can't check is validated, before torch,
Optuna, the data sets or training load, so ``--help`` and bad input answer at once (``import nasloc`` imports
none of them). ``nasloc search`` hands the pipeline a :class:`nasloc.run.RunOptions` (paths absolute, budget
in multiply-adds); the handlers import what they need themselves.
"""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import NaslocError
from ..run import RunError, RunOptions
from ..space.files import SpaceError, resolve_space_path, shipped_spaces
from ..units import parse_budget
from .arguments import DEFAULTS, RECIPE, UsageError, build_parser, build_search_parser, print_error


def _search_request(args: argparse.Namespace) -> tuple[RunOptions, str | None]:
    """The run's options, once what argparse can't check alone is checked, and how to show a dry run's plan
    (None: run it; "text" or "json": --dry-run)."""
    if args.json and not args.dry_run:
        raise UsageError("--json shows the plan of a --dry-run; add --dry-run")
    values = {name: getattr(args, name) for name in DEFAULTS if name not in ("budget", "family")}
    budgets = args.budget  # one budget, or a family's list
    values.update(budget=parse_budget(budgets[0]), family=budgets if len(budgets) > 1 else ())
    try:
        options = RunOptions(**{**values, "space": _space(args.space), "data_dir": _find_data(args.dataset, args.data_dir)})
    except RunError as err:  # options that do not go together
        raise UsageError(str(err)) from None
    return options, ("json" if args.json else "text") if args.dry_run else None


def _space(text: str) -> Path:
    try:
        return resolve_space_path(Path(text).expanduser())
    except SpaceError:
        raise UsageError(f"--space {text!r}: no such file (shipped spaces: {shipped_spaces()})") from None


def _find_data(dataset: str, data_dir: Path | None) -> Path | None:
    if dataset == "digits":
        if data_dir is not None:
            raise UsageError("--data-dir is not used with --dataset digits (the digits ship with scikit-learn)")
        return None
    if data_dir is None:
        raise UsageError(f"--dataset {dataset} needs --data-dir")
    if not data_dir.is_dir():
        raise UsageError(f"--data-dir {str(data_dir)!r} is not a folder")
    return data_dir


def _run_folder(text: str) -> Path:
    """A run folder: a path, or a run name under the default results folder."""
    run = Path(text).expanduser()
    if not run.is_dir():
        run = DEFAULTS["results_dir"] / text
    if not run.is_dir():
        raise UsageError(f"--run {text!r}: no such run folder (nor {run})")
    return run.resolve()


def _export_request(args: argparse.Namespace) -> tuple[Path, int, Path | None, bool, str]:
    """The run folder, trial, output folder, whether to add the ONNX file, and a family's budget."""
    return _run_folder(args.run), args.trial, args.out, args.onnx, args.budget


def _latency_request(args: argparse.Namespace) -> dict[str, Any]:
    space = _space(args.space)
    if args.backend == "onnxruntime" and args.device != "cpu":
        raise UsageError("--backend onnxruntime runs on the CPU: use --device cpu")
    names = ("device", "backend", "batch_size", "archs", "seed", "refresh")
    return dict(space=space, **{name: getattr(args, name) for name in names})


def _check_ranking_request(args: argparse.Namespace) -> dict[str, Any]:
    return dict(run_dir=_run_folder(args.run), archs=args.archs, epochs=args.epochs, seed=args.seed, band=args.band,
                budget=args.budget)


def _train_request(args: argparse.Namespace) -> dict[str, Any]:
    recipe = {name: getattr(args, name) for name in RECIPE}
    return dict(model=args.model, dataset=args.dataset, data_dir=_find_data(args.dataset, args.data_dir),
                epochs=args.epochs, img_size=args.img_size, out=args.out, seed=args.seed, device=args.device,
                drop_path=args.drop_path, recipe={**recipe, "num_workers": args.workers})


def _evaluate_request(args: argparse.Namespace) -> dict[str, Any]:
    names = ("model", "dataset", "split", "img_size", "batch_size", "seed", "device", "throughput_batch", "as_json")
    return dict(data_dir=_find_data(args.dataset, args.data_dir), **{name: getattr(args, name) for name in names})


def _search(request: tuple[RunOptions, str | None]) -> None:
    from ..pipeline import dry_run, run_pipeline

    options, show = request
    if show is None:
        run_pipeline(options)
    elif show == "json":
        print(json.dumps(dry_run(options).to_dict()))
    else:
        print("\n".join(dry_run(options).lines()))


def _export(request: tuple[Path, int, Path | None, bool, str]) -> None:
    from ..deploy.export import export_trial

    run, trial, out, onnx, budget = request
    folder = export_trial(run, trial, out, onnx=onnx, budget=budget)
    if onnx:
        from ..deploy.export import CONFIG_NAME

        record = json.loads((folder / CONFIG_NAME).read_text())["nasloc"]["onnx"]
        print(f"[nasloc] {folder / record['file']}: max abs difference to torch {record['max_abs_diff']:.2e}; "
              f"ONNX Runtime latency {record['onnxruntime_latency_ms']:.3f} ms (batch 1, "
              f"{record['latency_threads']} thread(s))")


def _check_ranking(request: dict[str, Any]) -> None:
    from .check_ranking import check_run_ranking

    def trained(arch: Any) -> None:
        print(f"[nasloc] arch {arch.index + 1}/{request['archs']} trained: standalone {arch.standalone:.2f} %, "
              f"proxy {arch.proxy:.2f} %", flush=True)

    print(check_run_ranking(**request, on_arch=trained).report())


def _command(module: str, function: str) -> Callable[[dict[str, Any]], None]:
    """A handler calling ``nasloc.cli.<module>.<function>``, imported only then (torch and timm load with it)."""

    def handle(request: dict[str, Any]) -> None:
        getattr(importlib.import_module(f".{module}", __package__), function)(**request)

    return handle


_COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], Any], Callable[[Any], None]]] = {
    "search": (_search_request, _search), "export": (_export_request, _export),
    "check-ranking": (_check_ranking_request, _check_ranking),
    "train": (_train_request, _command("train", "train_command")),
    "evaluate": (_evaluate_request, _command("evaluate", "evaluate_command")),
    "latency": (_latency_request, _command("latency", "latency_command")),
    "presets": (lambda args: {}, _command("presets", "presets_command"))}


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None, prog: Callable[[str], str]) -> int:
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, or a usage error already printed
        return int(done.code or 0)
    resolve, handle = _COMMANDS[args.command]
    name = prog(args.command)
    try:
        request = resolve(args)
    except UsageError as err:
        print_error(name, f"{err} (see {name} --help)")
        return 2
    try:
        handle(request)
    except NaslocError as err:  # bad input that only the pipeline can see; anything else is a bug
        print_error(name, str(err))
        return 2
    except KeyboardInterrupt:  # Ctrl-C is how a long run is paused: say so, without a traceback
        print_error(name, "interrupted; the same command goes on from the last finished unit")
        return 130
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nasloc`` console script; returns the exit status."""
    parser = build_parser()
    return _run(parser, argv, lambda command: f"{parser.prog} {command}")


def search_main(argv: Sequence[str] | None = None, prog: str = "run_search.py") -> int:
    """Entry point of ``run_search.py``: ``nasloc search`` with its own name in help and errors."""
    return _run(build_search_parser(prog), argv, lambda command: prog)
