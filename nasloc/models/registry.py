"""timm entry points of the family: every preset (:data:`nasloc.models.presets.PRESETS`) and the generic
``nasloc_vit``, which builds any arch passed as keyword arguments (exported models reload through it:
their ``config.json`` carries ``architecture: nasloc_vit`` and ``model_args`` = the arch).

``import nasloc`` imports this module as soon as timm is imported (see :mod:`nasloc`)."""
from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ..arch import Arch
from . import LocalityViT
from .locality_vit import checkpoint_filter_fn, default_out_indices, pretrained_cfg
from .presets import GENERIC, PRESETS

# ---------------------------------------------------------------------------- timm entry points
default_cfgs = generate_default_cfgs({name: pretrained_cfg(arch) for name, arch in {**PRESETS, GENERIC: PRESETS["nasloc_deit_tiny"]}.items()})


def create(variant: str, pretrained: bool = False, **kwargs: Any) -> LocalityViT:
    """Build a preset (or the generic entry) with timm's builder; arch fields in kwargs override."""
    base = PRESETS.get(variant, PRESETS["nasloc_deit_tiny"])
    arch_fields = {k: kwargs.pop(k) for k in list(kwargs) if k in Arch.__dataclass_fields__ and k not in ("num_classes", "img_size", "in_chans")}
    arch = Arch.from_dict({**base.to_dict(), **arch_fields}) if arch_fields else base
    out_indices = kwargs.pop("out_indices", default_out_indices(arch))
    model = build_model_with_cfg(
        LocalityViT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,  # weights of any resolution load at the model's own
        arch=arch,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )
    if isinstance(model, LocalityViT):  # built at another img_size: its data config says so (fixed input size)
        size = model.arch.img_size
        model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, "input_size": (model.arch.in_chans, size, size)}
    return model


def _entry_point(variant: str):
    def entry(pretrained: bool = False, **kwargs: Any) -> LocalityViT:
        return create(variant, pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = variant
    entry.__module__ = __name__
    entry.__doc__ = f"{variant}: a nasloc LocalityViT preset (see nasloc.models.presets.PRESETS)."
    return entry


for _variant in (*PRESETS, GENERIC):
    register_model(_entry_point(_variant))
