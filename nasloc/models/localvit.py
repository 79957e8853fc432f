"""Depth-wise convolution in the feed-forward network (LocalViT, Li et al., IROS 2023).

Two FFN flavours carry the locality gene ``ffn_kernel`` (0 = off):

* :class:`LocalityFFN` is LocalViT's own FFN, used by ``ffn: localvit``: it replaces LN2 + MLP and
  carries its own residual; the class token (all auxiliary tokens) bypasses it.
  1x1 (no bias) -> BN -> h-swish -> depth-wise kxk (no bias) -> BN -> h-swish -> SE -> 1x1 -> BN.
  The SE bottleneck has hidden/dim channels (LocalViT's reduction = dim: 4 channels at ratio 4).
* :class:`Mlp` is the ViT MLP used by ``ffn: mlp`` and ``ffn: bidim``; with a kernel, a depth-wise
  conv (bias) and GELU act on the hidden image tokens between fc1 and fc2. It has no BatchNorm, so
  a subnet needs no statistics recalibration. ``bidim`` adds LightViT's BiDim attention gate.

Pointwise convs are linear layers on tokens: the same weights and the same MACs.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .elastic import ElasticBatchNorm2d, ElasticConv2d, ElasticLinear
from .layout import Geometry, join_aux, map_image_tokens, split_aux, to_map, to_tokens
from .lightvit import BiAttnGate


def se_channels(dim: int, hidden: int) -> int:
    return max(1, hidden // dim)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, kernel: int = 0, gate: bool = False):
        super().__init__()
        self.fc1 = ElasticLinear(dim, hidden)
        self.conv = ElasticConv2d(hidden, hidden, kernel, bias=True, depthwise=True) if kernel else None
        self.fc2 = ElasticLinear(hidden, dim)
        self.gate = BiAttnGate(dim) if gate else None

    def forward(self, x: Tensor, geo: Geometry, hidden: int, kernel: int, gate: bool = False) -> Tensor:
        h = F.gelu(self.fc1(x, hidden))
        if kernel:
            h = map_image_tokens(h, geo, lambda m: F.gelu(self.conv(m, kernel=kernel)))
        y = self.fc2(h, x.shape[-1])
        return self.gate(y) if gate else y


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeezed: int):
        super().__init__()
        self.reduce = ElasticLinear(channels, squeezed)
        self.expand = ElasticLinear(squeezed, channels)

    def forward(self, feature_map: Tensor, squeezed: int) -> Tensor:
        pooled = feature_map.mean((2, 3))
        scale = F.hardsigmoid(self.expand(F.relu(self.reduce(pooled, squeezed)), feature_map.shape[1]))
        return feature_map * scale[:, :, None, None]


class LocalityFFN(nn.Module):
    def __init__(self, dim: int, hidden: int, kernel: int, eps: float = 1e-5):
        super().__init__()
        self.fc1 = ElasticLinear(dim, hidden, bias=False)
        self.norm1 = ElasticBatchNorm2d(hidden, eps=eps)
        self.conv = ElasticConv2d(hidden, hidden, kernel, bias=False, depthwise=True) if kernel else None
        self.norm2 = ElasticBatchNorm2d(hidden, eps=eps) if kernel else None
        self.se = SqueezeExcite(hidden, se_channels(dim, hidden))
        self.fc2 = ElasticLinear(hidden, dim, bias=False)
        self.norm3 = ElasticBatchNorm2d(dim, eps=eps)

    def forward(self, x: Tensor, geo: Geometry, hidden: int, kernel: int) -> Tensor:
        """Returns x with the residual already added (aux tokens unchanged)."""
        aux, img = split_aux(x, geo)
        dim = img.shape[-1]
        h = F.hardswish(self.norm1(to_map(self.fc1(img, hidden), geo)))
        if kernel:
            h = F.hardswish(self.norm2(self.conv(h, kernel=kernel)))
        h = self.se(h, se_channels(dim, hidden))
        y = self.norm3(to_map(self.fc2(to_tokens(h), dim), geo))
        return join_aux(aux, img + to_tokens(y))
