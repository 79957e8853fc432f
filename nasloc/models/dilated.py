"""DilateFormer (Jiao et al., IEEE TMM 2023): multi-scale dilated attention and its skeleton.

* :func:`dilated_attention`: sliding-window dilated attention (SWDA). Every image query attends to
  its kxk neighbourhood sampled with the dilation rate of its head; heads with equal rates are
  computed together. The neighbourhood is gathered with ``unfold`` (real neighbourhoods, so MACs are
  H*W*k*k*C per matmul, not (H*W)^2*C).
  Border handling differs from the official code on purpose: there, zero-padded keys outside the
  map enter the softmax with logit 0 and value 0 (a corner query at rate 2 gets 4/9 of its mass
  from padding); here padded keys are masked out of the softmax.
* :class:`ConvPosEnc`: conditional position encoding, x + DWConv3x3(x), before every block.
* :class:`OverlapStem`: four 3x3 convs (3->16->32->64->C, BN + GELU between), stride 4.
* :class:`ConvDownsample`: 3x3 stride-2 conv (bias) + BatchNorm between stages.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .elastic import ElasticBatchNorm2d, ElasticConv2d
from .layout import Geometry, join_aux, split_aux, to_map, to_tokens
from .lightvit import AuxProjection


def _neighbourhoods(t: Tensor, geo: Geometry, kernel: int, rate: int) -> Tensor:
    """(B, g, H*W, d) -> (B, g, H*W, k*k, d): the dilated kxk neighbourhood of every position."""
    b, g, n, d = t.shape
    feature_map = t.transpose(2, 3).reshape(b, g * d, geo.height, geo.width)
    cols = F.unfold(feature_map, kernel, dilation=rate, padding=rate * (kernel // 2))
    return cols.reshape(b, g, d, kernel * kernel, n).permute(0, 1, 4, 3, 2)


def _inside_mask(geo: Geometry, kernel: int, rate: int, device: torch.device) -> Tensor:
    """(H*W, k*k) bool: which neighbourhood positions fall inside the map."""
    ones = torch.ones(1, 1, geo.height, geo.width, device=device)
    cols = F.unfold(ones, kernel, dilation=rate, padding=rate * (kernel // 2))
    return cols[0].transpose(0, 1) > 0


def _dilated_group(q: Tensor, k: Tensor, v: Tensor, geo: Geometry, kernel: int, rate: int) -> Tensor:
    scale = q.shape[-1] ** -0.5
    keys = _neighbourhoods(k, geo, kernel, rate)  # B, g, N, kk, d
    values = _neighbourhoods(v, geo, kernel, rate)
    logits = (q.unsqueeze(-2) * scale) @ keys.transpose(-1, -2)  # B, g, N, 1, kk
    logits = logits.masked_fill(~_inside_mask(geo, kernel, rate, q.device)[:, None, :], float("-inf"))
    return (logits.softmax(-1) @ values).squeeze(-2)


def dilated_attention(q: Tensor, k: Tensor, v: Tensor, geo: Geometry, dilations: tuple[int, ...], kernel: int) -> Tensor:
    """q, k, v: (B, heads, H*W, d) image tokens; ``dilations`` has one rate per head."""
    outputs, order = [], []
    for rate in sorted(set(dilations)):
        heads = [h for h, r in enumerate(dilations) if r == rate]
        index = slice(heads[0], heads[-1] + 1) if heads == list(range(heads[0], heads[-1] + 1)) else heads
        outputs.append(_dilated_group(q[:, index], k[:, index], v[:, index], geo, kernel, rate))
        order += heads
    out = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
    if order != sorted(order):
        out = out[:, torch.tensor(order).argsort()]
    return out


class ConvPosEnc(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = ElasticConv2d(dim, dim, 3, bias=True, depthwise=True)

    def forward(self, x: Tensor, geo: Geometry) -> Tensor:
        aux, img = split_aux(x, geo)
        return join_aux(aux, img + to_tokens(self.conv(to_map(img, geo))))


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


class ConvDownsample(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, eps: float, aux: bool):
        super().__init__()
        self.conv = ElasticConv2d(dim_in, dim_out, 3, stride=2, bias=True)
        self.norm = ElasticBatchNorm2d(dim_out)
        self.aux = AuxProjection(dim_in, dim_out, eps) if aux else None

    def forward(self, x: Tensor, geo: Geometry, dim_out: int) -> Tensor:
        aux, img = split_aux(x, geo)
        img = to_tokens(self.norm(self.conv(to_map(img, geo), dim_out)))
        return join_aux(self.aux(aux, dim_out), img) if self.aux is not None else img
