"""Stems: image (B, 3, H, W) -> image tokens (B, H/p * W/p, C), ``p`` the arch's ``patch_size``.

* :class:`PatchStem` (``stem: patch``): non-overlapping patch embedding, one pxp stride-p conv (DeiT).
* :class:`LightViTStem` (``stem: lightvit``): conv stem (3x3 s2, three depth-wise 3x3, 3x3
  projection), LayerNorm (LightViT).
* :class:`OverlapStem` (``stem: overlap``): four 3x3 convs (3->16->32->64->C, BN + GELU between)
  (DilateFormer).

The conv stems reach their published stride with stride-2 layers; a smaller ``patch_size`` drops
the stride of the last of them (``nasloc.arch.STEM_STRIDES`` lists the strides each supports).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..arch import Arch
from .elastic import ElasticBatchNorm2d, ElasticConv2d, ElasticLayerNorm
from .layout import to_tokens


class PatchStem(nn.Module):
    """Non-overlapping patch embedding (DeiT; the DW paper's linear patch embedding is the same map)."""

    def __init__(self, in_chans: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = ElasticConv2d(in_chans, dim, patch_size, stride=patch_size, same_padding=False)

    def forward(self, x: Tensor, dim: int) -> Tensor:
        return to_tokens(self.proj(x, dim))


class LightViTStem(nn.Module):
    """Stride 8 as published; stride 4 or 2 drops the stride of the last (two) stride-2 layers."""

    def __init__(self, in_chans: int, dim: int, stride: int = 8):
        super().__init__()
        mid = dim // 2
        self.conv1 = ElasticConv2d(in_chans, mid, 3, stride=2, bias=False)
        self.dw1 = ElasticConv2d(mid, mid, 3, bias=False, depthwise=True)
        self.dw2 = ElasticConv2d(mid, mid, 3, bias=False, depthwise=True)
        self.dw3 = ElasticConv2d(mid, mid, 3, stride=2 if stride >= 4 else 1, bias=False, depthwise=True)
        self.norms = nn.ModuleList([ElasticBatchNorm2d(mid) for _ in range(4)])
        self.proj = ElasticConv2d(mid, dim, 3, stride=2 if stride >= 8 else 1, bias=True)
        self.norm = ElasticLayerNorm(dim, eps=1e-5)

    def forward(self, x: Tensor, dim: int) -> Tensor:
        x = F.gelu(self.norms[0](self.conv1(x, dim // 2)))
        for conv, norm in zip((self.dw1, self.dw2, self.dw3), self.norms[1:]):
            x = F.gelu(norm(conv(x)))
        return self.norm(to_tokens(self.proj(x, dim)))


class OverlapStem(nn.Module):
    """Stride 4 as published; stride 2 drops the stride of the last conv."""

    widths = (16, 32, 64)

    def __init__(self, in_chans: int, dim: int, stride: int = 4):
        super().__init__()
        c1, c2, c3 = self.widths
        self.convs = nn.ModuleList(
            [
                ElasticConv2d(in_chans, c1, 3, bias=False),
                ElasticConv2d(c1, c2, 3, stride=2, bias=False),
                ElasticConv2d(c2, c3, 3, bias=False),
                ElasticConv2d(c3, dim, 3, stride=2 if stride >= 4 else 1, bias=False),
            ]
        )
        self.norms = nn.ModuleList([ElasticBatchNorm2d(c) for c in self.widths])

    def forward(self, x: Tensor, dim: int) -> Tensor:
        for conv, norm in zip(self.convs, self.norms):
            x = F.gelu(norm(conv(x)))
        return to_tokens(self.convs[-1](x, dim))


def make_stem(arch: Arch, dim: int) -> nn.Module:
    if arch.stem == "lightvit":
        return LightViTStem(arch.in_chans, dim, arch.patch_size)
    if arch.stem == "overlap":
        return OverlapStem(arch.in_chans, dim, arch.patch_size)
    return PatchStem(arch.in_chans, dim, arch.patch_size)
