"""The nasloc model family: :class:`LocalityViT`, its published presets (:mod:`.presets`) and timm entry points
(:mod:`.registry`).

One file per locality mechanism: :mod:`.dw_shortcut` (depth-wise conv shortcuts), :mod:`.lightvit`
(global tokens, window attention, BiDim gate), :mod:`.life` (multi-scale qkv), :mod:`.localvit`
(depth-wise conv in the FFN), :mod:`.dilated` (dilated attention). The skeleton around them, one
file per role: :mod:`.stems`, :mod:`.downsample`, :mod:`.pos_embed`, :mod:`.attention` (the token
mixer), :mod:`.mlp`, :mod:`.heads`; :mod:`.layout` says how tokens are laid out and
:mod:`.elastic` is the only place where weights are sliced. :mod:`.locality_vit` assembles them.
"""
from .locality_vit import Capacity, LocalityViT

__all__ = ["Capacity", "LocalityViT"]
