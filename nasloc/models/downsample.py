"""Downsampling between the stages of a pyramid: halves the token map, changes the width.

* :class:`ConvDownsample` (``downsample: conv``): 3x3 stride-2 conv (bias) + BatchNorm (DilateFormer).
* :class:`MergeDownsample` (``downsample: merge``): space-to-depth + LN + linear, plus a max-pool +
  linear residual (LightViT).
* :class:`AuxProjection`: LN + linear that re-projects the auxiliary tokens (class, global) to the
  new width at every downsampling.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..arch import Arch
from .elastic import ElasticBatchNorm2d, ElasticConv2d, ElasticLayerNorm, ElasticLinear
from .layout import Geometry, Tokens, to_map, to_tokens


class AuxProjection(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, eps: float):
        super().__init__()
        self.norm = ElasticLayerNorm(dim_in, eps=eps)
        self.proj = ElasticLinear(dim_in, dim_out, bias=False)

    def forward(self, aux: Tensor, dim_out: int) -> Tensor:
        return self.proj(self.norm(aux), dim_out)


class ConvDownsample(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, eps: float, aux: bool):
        super().__init__()
        self.conv = ElasticConv2d(dim_in, dim_out, 3, stride=2, bias=True)
        self.norm = ElasticBatchNorm2d(dim_out)
        self.aux = AuxProjection(dim_in, dim_out, eps) if aux else None

    def forward(self, x: Tokens, geo: Geometry, dim_out: int) -> Tokens:
        img = to_tokens(self.norm(self.conv(to_map(x.img, geo), dim_out)))
        return Tokens.of_parts(None if x.aux is None else self.aux(x.aux, dim_out), img)


class MergeDownsample(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, eps: float, aux: bool):
        super().__init__()
        self.norm = ElasticLayerNorm(dim_in, eps=eps, groups=4)
        self.reduction = ElasticLinear(dim_in, dim_out, bias=False, in_groups=4)
        self.residual = ElasticLinear(dim_in, dim_out, bias=False)
        self.aux = AuxProjection(dim_in, dim_out, eps) if aux else None

    def forward(self, x: Tokens, geo: Geometry, dim_out: int) -> Tokens:
        img = x.img
        b, _, c = img.shape
        grid = img.reshape(b, geo.height, geo.width, c)
        quads = [grid[:, 0::2, 0::2], grid[:, 1::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 1::2]]
        main = self.reduction(self.norm(torch.cat(quads, dim=-1)), dim_out).flatten(1, 2)
        pooled = to_tokens(F.max_pool2d(to_map(img, geo), 2))
        img = main + self.residual(pooled, dim_out)
        return Tokens.of_parts(None if x.aux is None else self.aux(x.aux, dim_out), img)


def make_downsample(arch: Arch, dim_in: int, dim_out: int, aux: bool) -> nn.Module:
    kind = MergeDownsample if arch.downsample == "merge" else ConvDownsample
    return kind(dim_in, dim_out, arch.norm_eps, aux)
