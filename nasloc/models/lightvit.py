"""LightViT (Huang et al., arXiv 2207.05557): convolution-free blocks around global tokens.

* :class:`LightViTStem`: conv stem (3x3 s2, three depth-wise 3x3, 3x3 projection), LayerNorm.
* :func:`window_attention`: non-overlapping window attention with a relative position bias; in the
  ``window`` mixer the global tokens first *aggregate* (their queries attend over all image tokens)
  and then *broadcast* (image queries attend over the aggregated global tokens, added to the local
  result). See :class:`nasloc.models.attention.TokenMixer`.
* :class:`BiAttnGate`: the BiDim attention of the FFN (channel gate x spatial gate on its output).
* :class:`MergeDownsample`: space-to-depth + LN + linear, plus a max-pool + linear residual.
* :class:`Neck`: LightViT's head neck (linear to 1280, LN, GELU) applied per token before pooling.
* :class:`AuxProjection`: LN + linear that re-projects auxiliary tokens at every downsampling.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .elastic import ElasticBatchNorm2d, ElasticConv2d, ElasticLayerNorm, ElasticLinear, ElasticParameter
from .layout import Geometry, join_aux, split_aux, to_map, to_tokens


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


class RelPosBias(nn.Module):
    """Swin-style relative position bias of one window, one table entry per offset and head."""

    def __init__(self, window: int, heads: int):
        super().__init__()
        self.window = window
        self.table = ElasticParameter((2 * window - 1) ** 2, heads)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        offsets = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
        self.register_buffer("index", offsets[..., 0] * (2 * window - 1) + offsets[..., 1], persistent=False)

    def forward(self, heads: int) -> Tensor:
        """(heads, w*w, w*w)"""
        return self.table(self.table.value.shape[0], heads)[self.index].permute(2, 0, 1)


def window_attention(q: Tensor, k: Tensor, v: Tensor, geo: Geometry, window: int, bias: Tensor) -> Tensor:
    """q, k, v: (B, heads, H*W, d) image tokens; attention inside non-overlapping windows."""
    b, heads, n, d = q.shape
    rows, cols = geo.height // window, geo.width // window

    def partition(t: Tensor) -> Tensor:
        t = t.reshape(b, heads, rows, window, cols, window, d).permute(0, 2, 4, 1, 3, 5, 6)
        return t.reshape(b * rows * cols, heads, window * window, d)

    out = F.scaled_dot_product_attention(partition(q), partition(k), partition(v), attn_mask=bias.to(q.dtype))
    out = out.reshape(b, rows, cols, heads, window, window, d).permute(0, 3, 1, 4, 2, 5, 6)
    return out.reshape(b, heads, n, d)


class BiAttnGate(nn.Module):
    """y * sigmoid(channel gate from the mean token) * sigmoid(spatial gate per token)."""

    def __init__(self, dim: int):
        super().__init__()
        reduced = dim // 4
        self.norm = ElasticLayerNorm(dim, eps=1e-5)
        self.global_reduce = ElasticLinear(dim, reduced)
        self.local_reduce = ElasticLinear(dim, reduced)
        self.channel_select = ElasticLinear(reduced, dim)
        self.spatial_select = ElasticLinear(reduced, 1, in_groups=2)

    def forward(self, y: Tensor) -> Tensor:
        dim = y.shape[-1]
        z = self.norm(y)
        glb = F.gelu(self.global_reduce(z.mean(1, keepdim=True), dim // 4))
        loc = F.gelu(self.local_reduce(z, dim // 4))
        channel = torch.sigmoid(self.channel_select(glb, dim))
        spatial = torch.sigmoid(self.spatial_select(torch.cat([loc, glb.expand_as(loc)], dim=-1), 1))
        return y * channel * spatial


class AuxProjection(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, eps: float):
        super().__init__()
        self.norm = ElasticLayerNorm(dim_in, eps=eps)
        self.proj = ElasticLinear(dim_in, dim_out, bias=False)

    def forward(self, aux: Tensor, dim_out: int) -> Tensor:
        return self.proj(self.norm(aux), dim_out)


class MergeDownsample(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, eps: float, aux: bool):
        super().__init__()
        self.norm = ElasticLayerNorm(dim_in, eps=eps, groups=4)
        self.reduction = ElasticLinear(dim_in, dim_out, bias=False, in_groups=4)
        self.residual = ElasticLinear(dim_in, dim_out, bias=False)
        self.aux = AuxProjection(dim_in, dim_out, eps) if aux else None

    def forward(self, x: Tensor, geo: Geometry, dim_out: int) -> Tensor:
        aux, img = split_aux(x, geo)
        b, _, c = img.shape
        grid = img.reshape(b, geo.height, geo.width, c)
        quads = [grid[:, 0::2, 0::2], grid[:, 1::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 1::2]]
        main = self.reduction(self.norm(torch.cat(quads, dim=-1)), dim_out).flatten(1, 2)
        pooled = to_tokens(F.max_pool2d(to_map(img, geo), 2))
        img = main + self.residual(pooled, dim_out)
        return join_aux(self.aux(aux, dim_out), img) if self.aux is not None else img


class Neck(nn.Module):
    def __init__(self, dim: int, neck_dim: int):
        super().__init__()
        self.fc = ElasticLinear(dim, neck_dim)
        self.norm = ElasticLayerNorm(neck_dim, eps=1e-5)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.norm(self.fc(x)))
