"""A run: its options (:class:`RunOptions`), its folder (:class:`RunDir`) and its record (:class:`RunRecord`).

    results/<run>/
    ├── run.json                  the RunRecord: the resolved options and what the data set decided
    ├── study.db                  the Optuna study (the default storage)
    ├── supernet/last.pth         the trained supernet (untrained.pth with --supernet-epochs 0)
    ├── selection/trial_<N>/      last.pth: search trial N's short training in the selection (successive halving)
    ├── retrain/trial_<N>/        last.pth (checkpoint), best.safetensors, arch.json (the arch as retrained)
    ├── check-ranking/            nasloc check-ranking's standalone trainings
    ├── export/best/, export/trial-<N>/
    ├── trials.csv, pareto.csv, pareto.html, selection.csv, summary.md
    └── ray/                      Ray Tune's own files

A model family (``--budget 0.3G,0.5G,0.7G``) shares run.json, study.db and the supernet; each budget, as written
on the command line, has its own folder for what follows the supernet (``<budget>/selection/``,
``<budget>/retrain/``, ``<budget>/summary.md`` and the report files) and its export in ``export/<budget>/``;
``family.csv``, ``family.html`` and ``family.png`` compare the members.

Beside each ``last.pth``, ``previous.pth`` keeps the epoch before until the next one is complete, and an
unreadable ``last.pth`` is moved aside as ``last.pth.unreadable`` (:mod:`nasloc.training.checkpoint`).

Only this module spells these paths. It imports nothing heavy (no torch, no Optuna): the command line builds
its options here before anything else loads; :mod:`nasloc.storage.run_study` opens a run's study.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from .arch import Arch
from .errors import NaslocError
from .fileio import write_atomic
from .space.files import resolve_space_path
from .units import parse_budget, short_macs

STUDY_NAME = "nasloc"
SELECTION_STUDY = "selection"
# The report's file names (nasloc.report writes them into any folder; in a run folder, into its root).
TRIALS_CSV, PARETO_CSV, PARETO_HTML = "trials.csv", "pareto.csv", "pareto.html"
SELECTION_CSV = "selection.csv"
SELECT_INITS = ("scratch", "supernet")  # the first is the default: it ranked better (bench/bench_selection.py)
# What ranks the selection's candidates at each rung (nasloc.selection.scores; "complete": the top-1 of a
# training whose schedule ends with the rung). The first is the default.
SELECT_SCORES = ("val", "tse", "extrapolated", "complete")
# "needed": what a resume needs and the weights each phase hands on; "all": every checkpoint as written.
KEEP_CHECKPOINTS = ("needed", "all")
# The choices of the options. Those whose modules need torch to import (nasloc.training.data, nasloc.search,
# nasloc.search.sampler) are copied here, so the command line answers without torch; a test checks that they agree.
DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")
OBJECTIVES = ("top1", "macs", "params", "latency")
SAMPLERS = ("nsga2", "tpe", "random")
PHASES = ("all", "supernet", "search")
BACKENDS = ("optuna", "ray")
DEVICES = ("auto", "cpu", "cuda")


_ADDED_OPTIONS = ("latency_budget", "select_score", "keep_checkpoints", "family")  # options newer than some run.json files
# Options a rerun must repeat: the supernet, study and selection it resumes were made for them (--batch-size
# sets the supernet's and the selection's steps). --trials and the retrain options may grow, --supernet-epochs
# too (the schedule follows it); device, workers and dashboard are the machine's business.
FIXED_OPTIONS = ("space", "dataset", "seed", "proxy_img_size", "budget", "family", "latency_budget", "objectives",
                 "batch_size", "select_top_k", "select_epochs", "select_init", "select_score")


class RunError(NaslocError):
    """A folder that is not a readable run folder; the message is one line."""


@dataclass(frozen=True)
class RunOptions:
    """Everything a run is asked to do: the options of ``run_search.py`` (see its ``--help``), as values.

    Paths become absolute (Ray workers change directory), ``space`` may be the name of a shipped space,
    and the defaults left as None are derived: ``run_name`` from space, data set and budget, ``storage``
    as the run folder's ``study.db``. ``proxy_img_size``, ``retrain_img_size`` and ``select_epochs`` None:
    chosen by the pipeline from the space, the data set and the retrain's length (the :class:`RunRecord` holds
    what was chosen).
    """

    budget: float  # multiply-adds per image at the space's deploy resolution (a family's: its largest budget)
    latency_budget: float | None = None  # ms per batch-1 forward on the search's device, as the latency table predicts
    space: Path | str = "imagenet"
    objectives: tuple[str, ...] = ("top1", "macs")
    dataset: str = "digits"
    data_dir: Path | None = None
    proxy_img_size: int | None = None
    supernet_epochs: int = 5
    trials: int = 60
    select_top_k: int = 8
    select_epochs: int | None = None  # the last rung; None: from retrain_epochs (the RunRecord holds it)
    select_init: str = "scratch"
    select_score: str = "val"
    batch_size: int = 64  # images per step of the supernet training and of the selection's trainings
    retrain_top_k: int = 2
    retrain_epochs: int = 5
    retrain_img_size: int | None = None
    device: str = "auto"
    seed: int = 0
    run_name: str | None = None
    phase: str = "all"
    results_dir: Path = Path("results")
    sampler: str = "nsga2"
    storage: str | None = None
    backend: str = "optuna"
    ray_address: str | None = None
    workers: int = 1
    dashboard: bool = False
    dashboard_port: int = 8080
    keep_checkpoints: str = "needed"
    # A model family from one supernet: its budgets as written ("0.3G", "500M"), increasing; () for one budget
    family: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self._check_choices()
        self._set("family", tuple(self.family))
        if self.family:
            self._set("budget", max(parse_family(self.family)))
        space = Path(self.space).expanduser()
        self._set("space", space if space.is_absolute() else resolve_space_path(space).resolve())
        self._set("objectives", tuple(self.objectives))
        if self.data_dir is not None:
            self._set("data_dir", Path(self.data_dir).expanduser().resolve())
        self._set("results_dir", Path(self.results_dir).expanduser().resolve())
        if self.run_name is None:
            budgets = "_".join(map(short_macs, parse_family(self.family))) if self.family else short_macs(self.budget)
            self._set("run_name", f"{self.space.stem}-{self.dataset}-{budgets}")
        if self.storage is None:
            self._set("storage", RunDir(self.run_dir).default_storage)
        elif "://" not in self.storage:  # a journal or SQLite file
            self._set("storage", str(Path(self.storage).expanduser().resolve()))

    def _check_choices(self) -> None:
        """Options made in Python are checked as the command line checks them: a misspelled phase must not run
        as "all", nor a bad sampler or a latency budget on Ray fail after hours of supernet training."""
        for name, choices in (("dataset", DATASETS), ("sampler", SAMPLERS), ("select_init", SELECT_INITS),
                              ("select_score", SELECT_SCORES), ("phase", PHASES), ("backend", BACKENDS),
                              ("keep_checkpoints", KEEP_CHECKPOINTS)):  # a device ("cuda:1") is checked by torch
            if getattr(self, name) not in choices:
                raise RunError(f"{name}={getattr(self, name)!r}: choose one of {', '.join(choices)}")
        unknown = [o for o in self.objectives if o not in OBJECTIVES]
        if unknown or not self.objectives:
            raise RunError(f"objectives={self.objectives!r}: choose from {', '.join(OBJECTIVES)}")
        if self.ray_address is not None and self.backend != "ray":
            raise RunError("--ray-address (ray_address) needs --backend ray")
        if self.latency_budget is not None and self.backend == "ray":
            raise RunError("--latency-budget (latency_budget) works with --backend optuna only")

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # frozen: only while it is being made

    @property
    def run_dir(self) -> Path:
        return self.results_dir / self.run_name

    def members(self) -> list[tuple[str, "RunOptions"]]:
        """Each budget of the run with the options of its search, selection and retrain: ``[("", self)]`` for one
        budget; for a family, the budget as written and these options at that budget."""
        if not self.family:
            return [("", self)]
        return [(label, replace(self, budget=macs, family=())) for label, macs in zip(self.family,
                                                                                      parse_family(self.family))]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (paths as strings, tuples as lists)."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


def parse_family(budgets: tuple[str, ...] | list[str]) -> list[float]:
    """The multiply-adds of a family's budgets; :class:`RunError` (one line) unless there are at least two, each a
    budget, in increasing order without repeats."""
    if len(budgets) < 2:
        raise RunError(f"a model family needs at least two budgets, got {', '.join(budgets) or 'none'}")
    try:
        macs = [parse_budget(text) for text in budgets]
    except ValueError as err:
        raise RunError(str(err)) from None
    for (text, value), (next_text, next_value) in zip(zip(budgets, macs), zip(budgets[1:], macs[1:])):
        if next_value == value:
            raise RunError(f"--budget {','.join(budgets)}: {text} and {next_text} are the same budget; give each once")
        if next_value < value:
            raise RunError(f"--budget {','.join(budgets)}: {next_text} comes after the larger {text}; list the "
                           f"budgets in increasing order")
    return macs


def arch_folder(folder: Path, arch: Arch) -> Path:
    """``folder`` for training ``arch``, with the arch in its ``arch.json``: made if missing, resumed if it holds
    this arch. One that holds another arch's training (a run folder shared by two studies, e.g. a rerun with
    another ``--storage``) cannot be resumed: it is moved aside, not overwritten, with a warning."""
    record = folder / "arch.json"
    if record.is_file() and record.read_text().strip() != arch.to_json(indent=2).strip():
        aside = next(folder.with_name(f"{folder.name}.other-arch-{i}") for i in range(1, 10_000)
                     if not folder.with_name(f"{folder.name}.other-arch-{i}").exists())
        folder.rename(aside)
        warnings.warn(f"{folder} held the training of another arch; moved it to {aside.name} and starting afresh",
                      stacklevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    if not record.is_file():
        write_atomic(record, arch.to_json(indent=2))
    return folder


def _comparable(value: Any) -> Any:
    if isinstance(value, Path):  # a space file by name: the repository may have moved
        return value.name
    return float(f"{value:.9g}") if isinstance(value, float) else value  # a budget read back from JSON


_OPTION = {"family": "budget"}  # the command-line option of a RunOptions field, where the names differ


def _shown(value: Any) -> str:
    if value == ():  # a run of one budget, beside a family
        return "(one budget)"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return _comparable(value) if isinstance(value, Path) else f"{value:g}" if isinstance(value, float) else str(value)


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class RunRecord:
    """What ``run.json`` holds, written once when a run starts: what export and later commands need.

    ``options`` are the run's options with the image sizes the pipeline chose filled in; ``num_classes``,
    ``mean`` and ``std`` come from the data set (the classifier head, the export's normalisation).
    """

    options: RunOptions
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    study_name: str = STUDY_NAME  # the search's study (a family member's: the run's name with its budget)
    member: str = ""  # the family budget this record is about ("": the run's one budget); not in run.json

    @property
    def selection_study(self) -> str:
        """The name of the selection's study, beside the search's in the run's storage."""
        return f"{SELECTION_STUDY}-{self.member}" if self.member else SELECTION_STUDY

    def members(self) -> list["RunRecord"]:
        """The record of each budget of the run (:meth:`RunOptions.members`): itself for one budget."""
        return [self if not label else replace(self, options=options, study_name=f"{self.study_name}-{label}",
                                               member=label) for label, options in self.options.members()]

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON object of run.json: every option, then the record's own keys."""
        return {**self.options.to_dict(), "study_name": self.study_name, "num_classes": self.num_classes,
                "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunRecord":
        """The record of :meth:`to_dict`; raises KeyError naming the first missing key (options added since the
        record was written take their defaults)."""
        keys = [f.name for f in fields(RunOptions) if f.name not in _ADDED_OPTIONS]
        own = [f.name for f in fields(cls) if f.name not in ("options", "member")]  # a member's is not stored
        missing = [key for key in keys + own if key not in data]
        if missing:
            raise KeyError(missing[0])
        options = RunOptions(**{f.name: data[f.name] for f in fields(RunOptions) if f.name in data})
        return cls(options, int(data["num_classes"]), tuple(data["mean"]), tuple(data["std"]), data["study_name"])


@dataclass(frozen=True)
class RunDir:
    """The paths of one run folder; nothing is created until something is written."""

    root: Path
    member: str = ""  # a family's budget as written: what follows the supernet lives in root/<member>

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def home(self) -> Path:
        """The folder of this budget's search reports, selection, retrain and summary: the run folder itself for
        one budget, ``<budget>/`` in it for a family's member."""
        return self.root / self.member if self.member else self.root

    def member_dir(self, member: str) -> "RunDir":
        return RunDir(self.root, member)

    # ----------------------------------------------------------------------------------- the record
    @property
    def record_file(self) -> Path:
        return self.root / "run.json"

    def write_record(self, record: RunRecord) -> None:
        write_atomic(self.record_file, json.dumps(record.to_dict(), indent=2))

    def check_resumable(self, record: RunRecord) -> None:
        """Refuse (:class:`RunError`, one line) a rerun of this folder whose :data:`FIXED_OPTIONS` differ from
        the stored record's, before anything is written: otherwise it would resume work made for other options."""
        if not self.record_file.is_file():
            return
        stored = self.read_record().options
        changed = [name for name in FIXED_OPTIONS
                   if _comparable(getattr(stored, name)) != _comparable(getattr(record.options, name))
                   # a smaller batch is the way out of an out-of-memory error (the trainings resume at it)
                   and not (name == "batch_size" and record.options.batch_size < stored.batch_size)]
        if changed:
            was = ", ".join(f"--{_OPTION.get(name, name).replace('_', '-')} {_shown(getattr(stored, name))} (now "
                            f"{_shown(getattr(record.options, name))})" for name in changed)
            raise RunError(f"{self.root} was started with {was}; rerun it with the same options, or pass another "
                           f"--run-name")

    def read_record(self) -> RunRecord:
        """The run's record; :class:`RunError` (one line) when the folder has none or it is unreadable."""
        path = self.record_file
        if not path.is_file():
            raise RunError(f"{self.root} is not a run folder: {path.name} is missing")
        try:
            return RunRecord.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            raise RunError(f"{path}: cannot read it ({str(e).splitlines()[0]})") from None
        except (KeyError, TypeError) as e:  # written by another version of nasloc, or by hand
            raise RunError(f"{path}: not a run record of this nasloc version ({type(e).__name__}: {e})") from None

    @property
    def default_storage(self) -> str:
        return f"sqlite:///{self.root / 'study.db'}"

    # ----------------------------------------------------------------------------------- checkpoints
    @property
    def supernet_dir(self) -> Path:
        """Where :func:`nasloc.supernet.train.train_supernet` keeps its checkpoint."""
        return self.root / "supernet"

    @property
    def supernet_checkpoint(self) -> Path:
        return self.supernet_dir / "last.pth"  # train_supernet's name for it

    @property
    def untrained_checkpoint(self) -> Path:
        """The initial weights with --supernet-epochs 0 (never resumed or exported as trained)."""
        return self.supernet_dir / "untrained.pth"

    def selection_dir(self, trial: int) -> Path:
        """Where :func:`nasloc.training.retrain.retrain` keeps the selection's short training of search trial
        ``trial`` (named by search trial, as its retrain folder: one arch, one name across phases)."""
        return self.home / "selection" / f"trial_{trial}"

    @property
    def check_ranking_dir(self) -> Path:
        return self.home / "check-ranking"

    def retrain_dir(self, trial: int) -> Path:
        """Where :func:`nasloc.training.retrain.retrain` keeps trial ``trial``'s checkpoint."""
        return self.home / "retrain" / f"trial_{trial}"

    def retrain_checkpoint(self, trial: int) -> Path:
        return self.retrain_dir(trial) / "last.pth"  # retrain's name for it

    def retrained_weights(self, trial: int) -> Path:
        return self.retrain_dir(trial) / "best.safetensors"

    def write_retrained_arch(self, trial: int, arch: Arch) -> Path:
        """Keep the arch exactly as retrained (resolution included) beside its weights; returns the folder."""
        return arch_folder(self.retrain_dir(trial), arch)

    def read_retrained_arch(self, trial: int) -> Arch:
        path = self.retrain_dir(trial) / "arch.json"
        try:
            return Arch.from_json(path.read_text())
        except (OSError, ValueError) as e:  # missing, or not an arch
            raise RunError(f"{path}: cannot read the retrained arch ({str(e).splitlines()[0]})") from None

    # ----------------------------------------------------------------------------------- outputs
    @property
    def best_export(self) -> Path:
        """The run's export: ``export/best``, or a family member's ``export/<budget>``."""
        return self.root / "export" / (self.member or "best")

    def trial_export(self, trial: int) -> Path:
        return self.root / "export" / (f"{self.member}-trial-{trial}" if self.member else f"trial-{trial}")

    @property
    def summary(self) -> Path:
        return self.home / "summary.md"

    @property
    def family_csv(self) -> Path:
        return self.root / "family.csv"

    @property
    def ray_dir(self) -> Path:
        return self.root / "ray"

    def relative(self, path: Path) -> str:
        """``path`` as shown in records and messages: relative to the run folder."""
        return str(path.relative_to(self.root))
