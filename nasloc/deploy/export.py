"""Export a model as a timm model folder, in the Hugging Face hub layout timm reads.

    results/<run>/export/<name>/
    ├── config.json         architecture "nasloc_vit", num_classes, model_args (= the arch), pretrained_cfg,
    │                       and a "nasloc" block (MACs, params, trial, accuracies, budget, ...)
    ├── model.safetensors   the weights (never a pickle)
    ├── model.onnx          on request (``onnx=True``, ``nasloc export --onnx``): the model at ``img_size``
    └── arch.yaml           the arch, for humans (``Arch.from_yaml`` reads it back)

Reload anywhere (``import nasloc`` registers the family with timm)::

    import nasloc, timm
    model = timm.create_model("local-dir:results/<run>/export/<name>", pretrained=True)

Everything is checked before anything is written, and the folder is written next to its target under a
temporary name and renamed into place, so a failed export leaves nothing behind and never a half-written
folder. Every failure is an :class:`ExportError` with a one-line message.

An export is the arch at its deploy resolution (``img_size``, like timm's argument), whatever resolution it
was trained at: ``model_args`` hold the arch at ``img_size`` and the weights stay as trained, at the
resolution the ``nasloc`` block's ``train_img_size`` names. Loading resamples the position tables
(:func:`nasloc.models.locality_vit.checkpoint_filter_fn`), so the export runs at ``img_size`` and, with
``timm.create_model(..., img_size=<train_img_size>)``, exactly as trained.

MACs count one multiply-add as one FLOP (the fvcore and seed-paper convention), per image at the
exported arch's ``img_size``.

The ONNX file (:mod:`nasloc.deploy.onnx`, torch's exporter) takes one image at ``img_size``; it is checked
against the torch model on a random image (max abs difference at most 1e-4, else no export) and timed with
ONNX Runtime on the CPU; both numbers go into the ``nasloc`` block's ``onnx`` entry.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..arch import Arch
from ..arch_view import arch_svg
from ..errors import NaslocError, StorageError, first_line
from ..fileio import sync_folder
from ..models import LocalityViT
from ..models.locality_vit import checkpoint_filter_fn
from ..models.locality_vit import pretrained_cfg as _pretrained_cfg
from ..models.presets import GENERIC
from ..run import RunDir, RunError
from ..training.distributed import unwrap
from .model_card import model_card
from .onnx import OnnxError, export_checked
from .trials import trial_model

__all__ = ["ExportError", "export_model", "export_arch", "export_trial", "CONFIG_NAME", "WEIGHTS_NAME", "ONNX_NAME",
           "ARCH_NAME"]
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ONNX_NAME = "model.onnx"
ARCH_NAME = "arch.yaml"
PICTURE_NAME = "arch.svg"
CARD_NAME = "README.md"  # the model card, where the Hugging Face layout keeps it
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")
MACS_UNIT = "multiply-adds per image at img_size x img_size (one multiply-add = one FLOP, as in fvcore)"


class ExportError(NaslocError):
    """An export that cannot be done; the message is one line. Nothing was written.

    A :class:`~nasloc.errors.NaslocError`, hence a ``ValueError``."""


# ================================================================================== public API
def export_model(
    model: LocalityViT,
    out_dir: str | os.PathLike,
    *,
    img_size: int | None = None,
    info: Mapping[str, Any] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    label_names: Sequence[str] | None = None,
    overwrite: bool = False,
    onnx: bool = False,
) -> Path:
    """Write ``model`` (a standalone :class:`LocalityViT`) as a timm model folder; returns the folder.

    Args:
        model: the model to export; a DDP/EMA wrapper holding one in ``.module`` is unwrapped. Its
            ``arch`` becomes ``model_args``, so its state dict must be exactly that of
            ``LocalityViT(model.arch)`` (a supernet must be ``extract``-ed first).
        out_dir: the folder to create; its parents are created as needed.
        img_size: the resolution of the exported arch (``model_args``, MACs, input size), e.g. the search
            space's deploy resolution; default: the model's own. The weights are written as trained and
            the model's own resolution is recorded as ``train_img_size``.
        info: extra facts for the ``nasloc`` block of config.json (trial number, proxy and retrained
            accuracy, budget, ...). Must be JSON-serialisable; ``macs`` and ``params`` are always
            replaced by :func:`nasloc.space.flops.count` of the arch.
        mean, std: per-channel normalisation of the training data (default: ImageNet's).
        crop_pct: centre-crop fraction for evaluation (default 0.9).
        interpolation: resize interpolation (default ``bicubic``).
        label_names: one name per class; stored where timm keeps them.
        overwrite: replace ``out_dir`` if it is an earlier export (never any other folder).
        onnx: also write ``model.onnx`` (the model at ``img_size``), checked against torch and timed with
            ONNX Runtime (needs ``pip install 'nasloc[onnx]'``).

    Raises:
        ExportError: the weights do not fit the arch, an argument is invalid, ``out_dir`` exists
            (without ``overwrite``), the ONNX model differs from torch's, or writing failed. No folder is
            left behind.
    """
    model = _standalone(model)
    state = _cpu_state_dict(model.state_dict())
    _check_weights(model.arch, state, LocalityViT(model.arch).state_dict())
    info = {**(info or {}), "train_img_size": model.arch.img_size}
    arch = _at_resolution(model.arch, img_size)
    return _write_export(arch, state, out_dir, info=info, mean=mean, std=std, crop_pct=crop_pct,
                         interpolation=interpolation, label_names=label_names, overwrite=overwrite,
                         onnx_model=_deployed(arch, state) if onnx else None)


def export_arch(
    arch: Arch | Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor] | str | os.PathLike | None,
    out_dir: str | os.PathLike,
    **options: Any,
) -> Path:
    """Build ``LocalityViT(arch)``, load ``state_dict`` strictly and export it; returns the folder.

    Args:
        arch: an :class:`Arch` or its dict.
        state_dict: the weights, or a file holding them (``.safetensors``, or a torch checkpoint read
            with ``weights_only=True``: a bare state dict or one under ``"model"``/``"state_dict"``).
            ``None`` exports the freshly initialised model (random weights).
        out_dir: the folder to create.
        **options: the keyword options of :func:`export_model` (``img_size``, ``info``, ``mean``, ``std``,
            ``crop_pct``, ``interpolation``, ``label_names``, ``overwrite``).

    Raises:
        ExportError: the arch is invalid, the weights are unreadable or do not match the arch (the
            message names the first mismatching key or shape), or as :func:`export_model`.
    """
    arch = _as_arch(arch)
    model = LocalityViT(arch)
    if state_dict is None:
        info = dict(options.pop("info", None) or {})
        info.setdefault("weights", "initialised (untrained)")
        options["info"] = info
    else:
        state = _read_weights(state_dict)
        _check_weights(arch, state, model.state_dict())
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:  # e.g. a dtype that can't be copied; shapes and keys were checked
            raise ExportError(f"weights do not load into the arch: {first_line(e)}") from None
    return export_model(model, out_dir, **options)


def export_trial(run_dir: str | os.PathLike, trial: int, out_dir: str | os.PathLike | None = None, *,
                 overwrite: bool = False, onnx: bool = False, budget: str = "") -> Path:
    """Export trial ``trial`` of the Optuna study of a run folder; returns the folder.

    The model and its weights are :func:`nasloc.deploy.trials.trial_model`'s (retrained, else extracted from the
    supernet), exported at the search space's deploy resolution with the run's normalisation; the trial's
    number, values and scalar user attributes go into the ``nasloc`` block. ``out_dir`` defaults to
    ``run_dir/export/trial-<N>`` (a family's: ``export/<budget>-trial-<N>``). ``onnx``: add ``model.onnx`` (see
    :func:`export_model`). ``budget``: which search of a model family (its budget as written).

    Raises:
        ExportError: no run record or study, no such trial, no arch or no weights for it, or as
            :func:`export_model`.
    """
    try:
        found = trial_model(run_dir, trial, budget)
    except (RunError, StorageError) as e:  # no run record, storage file, study, trial, arch or weights
        raise ExportError(str(e)) from None
    run = RunDir(Path(run_dir), found.record.member)
    out_dir = Path(out_dir) if out_dir is not None else run.trial_export(found.info["trial"])
    return export_model(found.model, out_dir, img_size=found.deploy_img_size, info=found.info,
                        mean=found.record.mean, std=found.record.std, overwrite=overwrite, onnx=onnx)


# ================================================================================== checks
def _standalone(model: nn.Module) -> LocalityViT:
    """The LocalityViT to export: ``model`` or the one inside its DDP/EMA wrapper, never a supernet."""
    from ..supernet.supernet import Supernet

    model = unwrap(model)
    if isinstance(model, Supernet):
        raise ExportError("a Supernet cannot be exported as such; export supernet.extract(arch) instead")
    if not isinstance(model, LocalityViT):
        raise ExportError(f"export_model needs a nasloc LocalityViT, got {type(model).__name__}")
    return model


def _deployed(arch: Arch, state: dict[str, torch.Tensor]) -> LocalityViT:
    """The exported model as ``timm.create_model`` rebuilds it: ``arch`` at its resolution, the weights resampled."""
    model = LocalityViT(arch).eval()
    model.load_state_dict(checkpoint_filter_fn(state, model))
    return model


def _at_resolution(arch: Arch, img_size: int | None) -> Arch:
    try:
        return arch if img_size in (None, arch.img_size) else arch.replace(img_size=img_size)
    except (ValueError, TypeError) as e:
        raise ExportError(f"img_size {img_size!r}: {first_line(e)}") from None


def _as_arch(arch: Arch | Mapping[str, Any]) -> Arch:
    try:
        return arch if isinstance(arch, Arch) else Arch.from_dict(dict(arch))
    except (ValueError, TypeError) as e:
        raise ExportError(f"invalid arch: {first_line(e)}") from None


def _cpu_state_dict(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors that share no memory (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ExportError(f"weights: {key!r} is a {type(value).__name__}, not a tensor")
        tensor = value.detach().to("cpu").contiguous()
        ptr = (tensor.untyped_storage().data_ptr(), tensor.storage_offset()) if tensor.numel() else None
        if ptr is not None and ptr in seen:
            tensor = tensor.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[key] = tensor
    return out


def _check_weights(arch: Arch, state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> None:
    """ExportError naming the first missing key, unexpected key or wrong shape."""
    problems = [f"missing key {k!r}" for k in reference if k not in state]
    problems += [f"unexpected key {k!r}" for k in state if k not in reference]
    problems += [
        f"{k!r} has shape {tuple(state[k].shape)} but the arch needs {tuple(v.shape)}"
        for k, v in reference.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if problems:
        more = f" (and {len(problems) - 1} more mismatches)" if len(problems) > 1 else ""
        raise ExportError(f"weights do not match the arch: {problems[0]}{more}")


def _read_weights(source: Mapping[str, torch.Tensor] | str | os.PathLike) -> dict[str, torch.Tensor]:
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ExportError(f"weights file {path} does not exist")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path), device="cpu")
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - corrupt file, a pickle with objects, ...
            raise ExportError(f"weights file {path}: cannot read it ({first_line(e)})") from None
    for key in ("model", "state_dict"):  # a training checkpoint
        if isinstance(state.get(key), Mapping):
            state = dict(state[key])
            break
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return _cpu_state_dict(state)


def _json_safe(value: Any, where: str) -> Any:
    """A plain-JSON copy of ``value`` (numpy/torch scalars unwrapped, tuples as lists, NaN as null)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ExportError(f"{where}: key {k!r} is not a string")
            out[k] = _json_safe(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_json_safe(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if callable(getattr(value, "item", None)) and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        return _json_safe(value.item(), where)
    raise ExportError(f"{where}: a {type(value).__name__} is not JSON-serialisable")


def _channels(values: Sequence[float] | None, default: Sequence[float], name: str, arch: Arch) -> list[float]:
    if values is None:
        values = default if arch.in_chans == len(default) else [sum(default) / len(default)] * arch.in_chans
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ExportError(f"{name}: expected {arch.in_chans} numbers, got {values!r}") from None
    if len(values) != arch.in_chans:
        raise ExportError(f"{name}: expected one value per input channel ({arch.in_chans}), got {len(values)}")
    if not all(math.isfinite(v) for v in values) or (name == "std" and min(values) <= 0):
        raise ExportError(f"{name}: values must be finite{' and > 0' if name == 'std' else ''}, got {values}")
    return values


def _config(arch: Arch, info: Mapping[str, Any] | None, mean, std, crop_pct, interpolation, label_names) -> dict:
    """The config.json of an export, in the layout of timm's save_config_for_hf."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from .. import __version__
    from ..space.flops import count

    cfg = _pretrained_cfg(arch)
    cfg.pop("url", None)
    cfg["mean"] = _channels(mean, IMAGENET_DEFAULT_MEAN, "mean", arch)
    cfg["std"] = _channels(std, IMAGENET_DEFAULT_STD, "std", arch)
    if crop_pct is not None:
        if not isinstance(crop_pct, (int, float)) or not 0 < crop_pct <= 1:
            raise ExportError(f"crop_pct: must be in (0, 1], got {crop_pct!r}")
        cfg["crop_pct"] = float(crop_pct)
    if interpolation is not None:
        if interpolation not in INTERPOLATIONS:
            raise ExportError(f"interpolation: {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
        cfg["interpolation"] = interpolation
    cfg["crop_mode"] = "center"
    cfg["custom_load"] = False
    cost = count(arch)
    block = _json_safe(dict(info or {}), "info")
    block.update(macs=int(cost.macs), params=int(cost.params), macs_unit=MACS_UNIT, img_size=arch.img_size,
                 nasloc_version=__version__)
    config = {
        "architecture": GENERIC,
        "num_classes": arch.num_classes,
        "num_features": arch.neck_dim if arch.head == "neck" else arch.stages[-1].dim,
        "model_args": arch.to_dict(),
        "pretrained_cfg": _json_safe(cfg, "pretrained_cfg"),
        "nasloc": block,
    }
    if label_names is not None:
        names = [str(n) for n in label_names]
        if len(names) != arch.num_classes:
            raise ExportError(f"label_names: {len(names)} names for {arch.num_classes} classes")
        config["label_names"] = names
    try:
        json.dumps(config, allow_nan=False)
    except (TypeError, ValueError) as e:  # cannot happen after _json_safe; kept as the last guard
        raise ExportError(f"config.json: {first_line(e)}") from None
    return config


# ================================================================================== writing
def _write_export(arch: Arch, state: dict[str, torch.Tensor], out_dir: str | os.PathLike, *, info, mean, std,
                  crop_pct, interpolation, label_names, overwrite: bool, onnx_model: LocalityViT | None) -> Path:
    from safetensors.torch import save_file

    out_dir = Path(out_dir).expanduser().absolute()
    config = _config(arch, info, mean, std, crop_pct, interpolation, label_names)
    if out_dir.exists() or out_dir.is_symlink():
        if not overwrite:
            raise ExportError(f"{out_dir} already exists (pass overwrite=True to replace an earlier export)")
        if not _is_export(out_dir):
            raise ExportError(f"{out_dir} exists and is not a nasloc export; refusing to replace it")

    created = _make_parents(out_dir.parent)
    tmp, done = None, False
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if onnx_model is not None:
            try:
                config["nasloc"]["onnx"] = export_checked(onnx_model, tmp / ONNX_NAME, arch.img_size, arch.in_chans)
            except OnnxError as e:
                raise ExportError(str(e)) from None
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, allow_nan=False) + "\n")
        (tmp / ARCH_NAME).write_text(
            "# nasloc arch of this export (Arch.from_yaml reads it; config.json's model_args is the same)\n"
            + arch.to_yaml()
        )
        (tmp / PICTURE_NAME).write_text(arch_svg(arch, out_dir.name))
        (tmp / CARD_NAME).write_text(model_card(config, arch, out_dir.name))
        sync_folder(tmp)
        _move_into_place(tmp, out_dir, overwrite)
        done = True
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - disk full, permissions, safetensors refusal, ...
        raise ExportError(f"writing {out_dir} failed: {first_line(e)}") from None
    finally:
        if not done:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            for folder in reversed(created):  # the parents this call made, if they stayed empty
                try:
                    folder.rmdir()
                except OSError:
                    break
    return out_dir


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    if not (out_dir.exists() or out_dir.is_symlink()):
        try:
            os.rename(tmp, out_dir)
        except OSError as e:  # someone created it meanwhile (rename onto a non-empty folder fails)
            raise ExportError(f"{out_dir} could not be created: {e.strerror or e}") from None
        return
    if not overwrite:
        raise ExportError(f"{out_dir} already exists (pass overwrite=True to replace an earlier export)")
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
    os.rmdir(old)
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        os.rename(old, out_dir)  # put the earlier export back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _is_export(folder: Path) -> bool:
    """An earlier export (config.json of nasloc_vit), or an empty folder."""
    if not folder.is_dir() or folder.is_symlink():
        return False
    if not any(folder.iterdir()):
        return True
    try:
        return json.loads((folder / CONFIG_NAME).read_text()).get("architecture") == GENERIC
    except (OSError, ValueError, AttributeError):
        return False


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns those created, outermost first."""
    missing = [path for path in (folder, *folder.parents) if not path.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create {folder}: {e.strerror or e}") from None
    return list(reversed(missing))
