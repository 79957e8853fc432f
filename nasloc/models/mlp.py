"""The ViT MLP, used by ``ffn: mlp`` and ``ffn: bidim`` (LocalViT's own FFN is :mod:`.localvit`).

fc1 -> GELU -> fc2. Two locality options act on it:

* ``ffn_kernel`` > 0: LocalViT's locality in the FFN, a depth-wise kxk conv (bias) and GELU on the
  hidden image tokens between fc1 and fc2. No BatchNorm, so a subnet needs no statistics
  recalibration (unlike :class:`~nasloc.models.localvit.LocalityFFN`).
* ``ffn: bidim``: LightViT's BiDim attention gate on the output (:class:`~nasloc.models.lightvit.BiAttnGate`).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .elastic import ElasticConv2d, ElasticLinear
from .layout import Geometry, Tokens, on_map, tokenwise
from .lightvit import BiAttnGate


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, kernel: int = 0, gate: bool = False):
        super().__init__()
        self.fc1 = ElasticLinear(dim, hidden)
        self.conv = ElasticConv2d(hidden, hidden, kernel, bias=True, depthwise=True) if kernel else None
        self.fc2 = ElasticLinear(hidden, dim)
        self.gate = BiAttnGate(dim) if gate else None

    def forward(self, x: Tokens, geo: Geometry, hidden: int, kernel: int, gate: bool = False) -> Tokens:
        dim = x.dim
        h = tokenwise(lambda t: F.gelu(self.fc1(t, hidden)), x)
        if kernel:
            h = h.with_img(on_map(h.img, geo, lambda m: F.gelu(self.conv(m, kernel=kernel))))
        y = tokenwise(lambda t: self.fc2(t, dim), h)
        return self.gate(y) if gate else y
