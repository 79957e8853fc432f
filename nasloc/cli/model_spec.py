"""What ``--model M`` of ``nasloc train`` and ``nasloc evaluate`` names, and the model built from it.

M is, in this order of lookup:

* a preset (``nasloc_lightvit_tiny``, see ``nasloc presets``): the paper's arch, untrained;
* an arch file (``.yaml``/``.yml``/``.json``, e.g. an export's ``arch.yaml``): untrained;
* an export folder (``config.json`` of ``nasloc_vit``), or the folder of a finished ``nasloc train --out``
  (its ``export/``): its arch, and its weights as trained;
* ``RUN:TRIAL``, a trial of a run folder (a path, or a run name under ``./results``): its arch, and its
  weights (retrained, else its subnet of the supernet, see :mod:`nasloc.deploy.trials`); of a model family's
  run ``RUN:BUDGET:TRIAL``, the budget as written on its command line (``results/family:0.5G:12``);
* for ``nasloc evaluate`` only, any other timm model name (``resnet18``, ``deit_tiny_patch16_224``),
  built untrained (``pretrained=False``: nothing is downloaded).

``nasloc train`` always trains the arch from scratch. Anything else is a :class:`ModelError` (one line).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import yaml
from torch import nn

from ..arch import Arch
from ..deploy.export import CONFIG_NAME
from ..deploy.trials import member_record, trial_model
from ..errors import NaslocError, StorageError
from ..models import LocalityViT
from ..models.locality_vit import checkpoint_filter_fn
from ..models.presets import GENERIC, PRESETS
from ..run import RunDir
from ..storage.run_study import load_run_trial

ARCH_SUFFIXES = (".yaml", ".yml", ".json")
DEFAULT_RESULTS = Path("results")  # where a run name of RUN:TRIAL is looked up, as for --run
# The shortest run name first, so that a family's budget (a number and a unit, e.g. 0.5G) is split off.
_RUN_TRIAL = re.compile(r"(?P<run>.+?)(?::(?P<budget>\d[\w.]*))?:(?P<trial>\d+)")
FORMS = "a preset (nasloc presets), an arch file (.yaml/.json), an export folder or RUN:TRIAL (RUN:BUDGET:TRIAL)"


class ModelError(NaslocError):
    """A --model that names nothing usable; the message is one line."""


@dataclass(frozen=True)
class ModelSpec:
    """The model M names.

    ``arch`` is the nasloc arch at its own resolution (an export's or a trial's deploy resolution), None
    for a timm model. ``trained`` is the model with its weights, at the resolution they were trained at
    (an export or trial resolved ``with_weights``), else None. ``facts`` are what an export or a run
    records (data set, seed, batch size, accuracies).
    """

    text: str
    kind: str  # "preset", "arch file", "export", "trial" or "timm"
    name: str  # short, for folder names and tables
    arch: Arch | None
    trained: LocalityViT | None = None
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def default_img_size(self) -> int:
        """Where its weights were trained, else its arch's (or timm model's) resolution."""
        if self.trained is not None:
            return self.trained.arch.img_size
        if self.arch is not None:
            return self.arch.img_size
        cfg = timm.get_pretrained_cfg(self.text)
        return int(cfg.input_size[-1]) if cfg is not None else 224


def resolve_model(text: str, *, with_weights: bool, allow_timm: bool = False) -> ModelSpec:
    """The :class:`ModelSpec` of ``text``, with the weights of an export or trial when ``with_weights``;
    :class:`ModelError` when it names nothing usable (see the module)."""
    path = Path(text).expanduser()
    if text in PRESETS:
        return ModelSpec(text, "preset", text, PRESETS[text])
    if path.suffix.lower() in ARCH_SUFFIXES and path.is_file():
        return ModelSpec(text, "arch file", path.stem, _read_arch_file(text, path))
    if path.is_dir():
        return _export(text, path.resolve(), with_weights)
    match = _RUN_TRIAL.fullmatch(text)
    if match:
        return _trial(text, match["run"], match["budget"] or "", int(match["trial"]), with_weights)
    if allow_timm and timm.is_model(text) and text != GENERIC:
        return ModelSpec(text, "timm", text, None)
    timm_too = " or a timm model name" if allow_timm else ""
    raise ModelError(f"--model {text!r}: no such model; expected {FORMS}{timm_too}")


def build_model(spec: ModelSpec, num_classes: int, img_size: int, drop_path_rate: float = 0.0) -> nn.Module:
    """The model at ``img_size`` with ``num_classes`` outputs: its weights resampled to ``img_size`` when it
    has some (:func:`~nasloc.models.locality_vit.checkpoint_filter_fn`), else initialised."""
    if spec.kind == "timm":
        return _timm_model(spec.text, num_classes, img_size)
    arch = _sized(spec, img_size)
    if spec.trained is None:
        return LocalityViT(arch.replace(num_classes=num_classes), drop_path_rate=drop_path_rate)
    if arch.num_classes != num_classes:
        raise ModelError(f"--model {spec.text!r} has {arch.num_classes} classes, the data set {num_classes}")
    model = LocalityViT(spec.trained.arch.replace(img_size=img_size))
    model.load_state_dict(checkpoint_filter_fn(spec.trained.state_dict(), model))
    return model


def _sized(spec: ModelSpec, img_size: int) -> Arch:
    try:
        return spec.arch.replace(img_size=img_size)
    except ValueError as e:
        raise ModelError(f"--img-size {img_size}: {spec.name} cannot take it ({str(e).splitlines()[0]})") from None


def _read_arch_file(text: str, path: Path) -> Arch:
    try:
        content = path.read_text()
        return Arch.from_json(content) if path.suffix.lower() == ".json" else Arch.from_yaml(content)
    except (OSError, ValueError, yaml.YAMLError) as e:  # unreadable, not YAML/JSON, or not an arch
        raise ModelError(f"--model {text!r}: not an arch file ({str(e).splitlines()[0]})") from None


def _export(text: str, folder: Path, with_weights: bool) -> ModelSpec:
    if not (folder / CONFIG_NAME).is_file() and (folder / "train.json").is_file() and (folder / "export").is_dir():
        folder = folder / "export"  # a `nasloc train --out DIR` folder: its export
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
        arch = Arch.from_dict(config["model_args"]) if config.get("architecture") == GENERIC else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        arch = None
    if arch is None:
        raise ModelError(f"--model {text!r}: a folder but not a nasloc export (no {CONFIG_NAME} of {GENERIC}) nor "
                         "a finished `nasloc train --out` folder; for a trial of a run pass RUN:TRIAL")
    facts = config.get("nasloc") or {}
    trained = None
    if with_weights:  # at the resolution it was trained at: loads exactly, no resampling
        size = facts.get("train_img_size", arch.img_size)
        trained = timm.create_model(f"local-dir:{folder}", pretrained=True, img_size=size).eval()
    return ModelSpec(text, "export", folder.name, arch, trained, facts)


def _trial(text: str, run_text: str, budget: str, number: int, with_weights: bool) -> ModelSpec:
    run = Path(run_text).expanduser()
    if not run.is_dir():
        run = DEFAULT_RESULTS / run_text
    if not run.is_dir():
        raise ModelError(f"--model {text!r}: no such run folder {run_text!r} (nor {run})")
    run = run.resolve()
    try:
        record = member_record(RunDir(run).read_record(), budget, how="RUN:BUDGET:TRIAL")
        trial = load_run_trial(RunDir(run, record.member), record, number)
        arch = Arch.from_dict(dict(trial.user_attrs["arch"]))  # as searched: at the space's deploy resolution
        trained = trial_model(run, number, budget).model if with_weights else None
    except KeyError:
        raise ModelError(f"--model {text!r}: trial {number} has no arch (state {trial.state.name})") from None
    except (NaslocError, StorageError) as e:  # no record, study or trial; an invalid arch; no weights
        raise ModelError(f"--model {text!r}: {e}") from None
    facts = {"dataset": record.options.dataset, "seed": record.options.seed}
    name = f"{run.name}-{budget}-trial{number}" if budget else f"{run.name}-trial{number}"
    return ModelSpec(text, "trial", name, arch, trained, facts)


def _timm_model(name: str, num_classes: int, img_size: int) -> nn.Module:
    # Models with a fixed input size (ViTs) take it as an argument; convnets take any size as they are.
    cfg = timm.get_pretrained_cfg(name)
    fixed = cfg is not None and cfg.fixed_input_size
    size = {"img_size": img_size} if fixed else {}
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **size)
