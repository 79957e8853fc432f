"""A trial of a run as a standalone model with its weights: what ``nasloc export`` writes and what
``nasloc evaluate RUN:TRIAL`` measures.

Weights, first found wins (an untrained arch is refused):
  1. the retrained standalone model (``retrain/trial_<N>/best.safetensors``) with the arch it was retrained
     as (``arch.json`` beside it) and the last validation top-1 of its checkpoint;
  2. the subnet extracted from the run's supernet (``supernet/last.pth``), at the supernet's resolution.
Every failure is a :class:`nasloc.run.RunError` or a :class:`nasloc.errors.StorageError` (one line).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..arch import Arch
from ..errors import first_line
from ..models import LocalityViT
from ..run import RunDir, RunError, RunRecord
from ..space.search_space import SearchSpace
from ..storage.run_study import load_run_trial
from ..training.checkpoint import load_checkpoint

# The export records count(arch) of the exported arch as macs and params; the search's own keep a prefix.
_RENAMED_ATTRS = {"top1": "proxy_top1", "macs": "search_macs", "params": "search_params"}


@dataclass(frozen=True)
class TrialModel:
    """A trial's model with its weights, the facts an export records about it (its number, values, scalar
    user attributes, where the weights came from), the run's record and the search space's deploy
    resolution."""

    model: LocalityViT
    info: dict[str, Any]
    record: RunRecord
    deploy_img_size: int


def trial_model(run_dir: str | os.PathLike, trial: int, budget: str = "") -> TrialModel:
    """Trial ``trial`` of the run in ``run_dir``, in eval mode, with its best weights (see the module); of a model
    family's search at ``budget`` (as written on its command line)."""
    run = RunDir(Path(run_dir))
    record = member_record(run.read_record(), budget)
    run = run.member_dir(record.member)
    frozen = load_run_trial(run, record, int(trial))
    if "arch" not in frozen.user_attrs:
        raise RunError(f"trial {frozen.number} of study {record.study_name} has no 'arch' user attribute "
                       f"(state {frozen.state.name})")
    info = _trial_info(record, frozen)
    space = _load_space(record)
    weights, checkpoint = run.retrained_weights(frozen.number), run.supernet_checkpoint
    if weights.is_file():
        info["weights"] = f"retrained ({run.relative(weights)})"
        info.update(_retrain_result(run.retrain_checkpoint(frozen.number)))
        model = _retrained_model(run.read_retrained_arch(frozen.number), weights)
    elif checkpoint.is_file():
        info["weights"] = f"supernet ({run.relative(checkpoint)})"
        model = _extract_from_supernet(space, checkpoint, _trial_arch(frozen))
    else:
        raise RunError(f"no weights exist for trial {frozen.number}: neither {weights} nor {checkpoint} "
                       "is there (retrain it, or train the supernet, first)")
    return TrialModel(model.eval(), info, record, space.img_size)


def member_record(record: RunRecord, budget: str, how: str = "--budget") -> RunRecord:
    """The record of the run's search at ``budget``: the run's own for one budget (""). ``how`` is the way
    the user names a budget, for the one-line errors."""
    budgets = [member.member for member in record.members()]
    if budget in budgets:
        return record.members()[budgets.index(budget)]
    if budgets == [""]:
        raise RunError(f"budget {budget}: the run has one budget; leave {how} out")
    if not budget:
        raise RunError(f"the run is a model family: name one of its budgets with {how} ({', '.join(budgets)})")
    raise RunError(f"budget {budget}: not one of the run's budgets ({', '.join(budgets)}, as on its command line)")


def _trial_info(record: RunRecord, trial: Any) -> dict[str, Any]:
    """The facts about a trial: its number, state, values and scalar user attributes."""
    info: dict[str, Any] = {"trial": trial.number, "study": record.study_name, "state": trial.state.name}
    if trial.values is not None:
        info["values"] = list(trial.values)
    info.update({_RENAMED_ATTRS.get(key, key): value for key, value in trial.user_attrs.items()
                 if key != "arch" and (value is None or isinstance(value, (bool, int, float, str)))})
    info.update(budget=record.options.budget, dataset=record.options.dataset, seed=record.options.seed)
    return info


def _trial_arch(trial: Any) -> Arch:
    try:
        return Arch.from_dict(dict(trial.user_attrs["arch"]))
    except (ValueError, TypeError) as e:
        raise RunError(f"trial {trial.number}: invalid arch: {first_line(e)}") from None


def _load_space(record: RunRecord) -> SearchSpace:
    try:
        return SearchSpace.load(record.options.space).for_classes(record.num_classes)
    except Exception as e:  # noqa: BLE001 - the space file is gone or no longer valid
        raise RunError(f"cannot load the run's search space {record.options.space}: {first_line(e)}") from None


def _retrain_result(checkpoint: Path) -> dict[str, float]:
    """``retrained_top1``: the last validation top-1 in the checkpoint of :func:`nasloc.training.retrain.retrain`."""
    history = load_checkpoint(checkpoint, keys=("history",))["history"]  # one line if missing or corrupt
    return {"retrained_top1": history[-1]["val_top1"]} if history else {}


def _retrained_model(arch: Arch, weights: Path) -> LocalityViT:
    from safetensors.torch import load_file

    model = LocalityViT(arch)
    try:
        model.load_state_dict(load_file(str(weights), device="cpu"), strict=True)
    except Exception as e:  # noqa: BLE001 - corrupt file, or weights of another arch
        raise RunError(f"{weights}: the retrained weights do not load ({first_line(e)})") from None
    return model


def _extract_from_supernet(space: SearchSpace, checkpoint: Path, arch: Arch) -> LocalityViT:
    """The standalone subnet of ``arch`` with the weights it has in the run's supernet."""
    from ..supernet.supernet import Supernet

    ckpt = load_checkpoint(checkpoint, keys=("model", "img_size"))  # one line if missing or corrupt
    try:
        supernet = Supernet(space, int(ckpt["img_size"]))  # the resolution it was trained at
        supernet.load_state_dict(ckpt["model"], strict=True)
    except Exception as e:  # noqa: BLE001 - a foreign checkpoint: another space, ...
        raise RunError(f"cannot rebuild the supernet of {checkpoint}: {first_line(e)}") from None
    try:
        return supernet.extract(arch)
    except (ValueError, RuntimeError, IndexError) as e:
        raise RunError(f"the trial's arch is not a subnet of the run's supernet: {first_line(e)}") from None
