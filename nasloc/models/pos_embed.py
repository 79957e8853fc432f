"""Position encodings.

* ``pos_embed: absolute``: a learned embedding added to the class and image tokens after the stem
  (DeiT); a parameter of the model, added in :meth:`~nasloc.models.LocalityViT.embed`.
* :class:`ConvPosEnc` (``cpe: true``): conditional position encoding, x + DWConv3x3(x) on the
  image tokens before every block (DilateFormer).
"""
from __future__ import annotations

from torch import Tensor, nn

from .elastic import ElasticConv2d
from .layout import Geometry, join_aux, split_aux, to_map, to_tokens


class ConvPosEnc(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = ElasticConv2d(dim, dim, 3, bias=True, depthwise=True)

    def forward(self, x: Tensor, geo: Geometry) -> Tensor:
        aux, img = split_aux(x, geo)
        return join_aux(aux, img + to_tokens(self.conv(to_map(img, geo))))
