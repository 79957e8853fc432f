"""Position encodings.

* ``pos_embed: absolute``: a learned embedding added to the class and image tokens after the stem
  (DeiT); a parameter of the model, added in :meth:`~nasloc.models.LocalityViT.embed`.
* :class:`ConvPosEnc` (``cpe: true``): conditional position encoding, x + DWConv3x3(x) on the
  image tokens before every block (DilateFormer).
"""
from __future__ import annotations

from torch import Tensor, nn

from .elastic import ElasticConv2d
from .layout import Geometry, on_map


class ConvPosEnc(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = ElasticConv2d(dim, dim, 3, bias=True, depthwise=True)

    def forward(self, img: Tensor, geo: Geometry) -> Tensor:
        """img: image tokens (the auxiliary tokens get no position encoding)."""
        return img + on_map(img, geo, self.conv)
