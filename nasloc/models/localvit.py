"""Depth-wise convolution in the feed-forward network (LocalViT, Li et al., IROS 2023).

The locality gene ``ffn_kernel`` (0 = off) puts a depth-wise kxk conv on the hidden image tokens of
the FFN. With ``ffn: localvit`` the FFN is LocalViT's own, :class:`LocalityFFN`: it replaces
LN2 + MLP and carries its own residual; the class token (all auxiliary tokens) bypasses it.
1x1 (no bias) -> BN -> h-swish -> depth-wise kxk (no bias) -> BN -> h-swish -> SE -> 1x1 -> BN.
The SE bottleneck has hidden/dim channels (LocalViT's reduction = dim: 4 channels at ratio 4).
With ``ffn: mlp`` or ``bidim`` the same gene acts inside the ViT MLP (:class:`~nasloc.models.mlp.Mlp`).

Pointwise convs are linear layers on tokens: the same weights and the same MACs.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..arch import se_channels
from .elastic import ElasticBatchNorm2d, ElasticConv2d, ElasticLinear
from .layout import Geometry, Tokens, to_map, to_tokens


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

    def forward(self, x: Tokens, geo: Geometry, hidden: int, kernel: int) -> Tokens:
        """Returns x with the residual already added (aux tokens unchanged)."""
        img = x.img
        dim = img.shape[-1]
        h = F.hardswish(self.norm1(to_map(self.fc1(img, hidden), geo)))
        if kernel:
            h = F.hardswish(self.norm2(self.conv(h, kernel=kernel)))
        h = self.se(h, se_channels(dim, hidden))
        y = self.norm3(to_map(self.fc2(to_tokens(h), dim), geo))
        return x.with_img(img + to_tokens(y))
