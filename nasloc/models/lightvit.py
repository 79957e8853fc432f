"""LightViT (Huang et al., arXiv 2207.05557): global tokens and window attention.

* Global tokens: ``global_tokens`` learned tokens join the class token as auxiliary tokens
  (:meth:`~nasloc.models.LocalityViT.embed`). In the ``window`` mixer they first *aggregate* (their
  queries attend over all image tokens, in :class:`~nasloc.models.attention.TokenMixer`) and then
  :func:`broadcast` (image queries attend over the aggregated global tokens, added to the local
  result; on the CPU by the fused kernel of :mod:`.neighbourhood`).
* :func:`window_attention`: non-overlapping window attention with a relative position bias
  (:class:`RelPosBias`).
* :class:`BiAttnGate`: the BiDim attention of the FFN (``ffn: bidim``; channel gate x spatial gate
  on the MLP's output).

LightViT's skeleton parts live with their kind: the conv stem in :mod:`.stems`, the merging
downsampling in :mod:`.downsample`, the neck head in :mod:`.heads`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import neighbourhood
from .elastic import ElasticLayerNorm, ElasticLinear, ElasticParameter
from .layout import Geometry, Tokens, attend, merge_heads, split_heads, token_mean, tokenwise


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


def window_attention(q: Tensor, k: Tensor, v: Tensor, geo: Geometry, window: int, bias: Tensor, heads: int) -> Tensor:
    """q, k, v: (B, H*W, C) image tokens; attention inside non-overlapping windows, heads merged back
    into (B, H*W, C). Windows are cut from and put back into the token layout directly: one copy each."""
    b, n, c = q.shape
    rows, cols, d = geo.height // window, geo.width // window, c // heads

    def partition(t: Tensor) -> Tensor:
        t = t.reshape(b, rows, window, cols, window, heads, d).permute(0, 1, 3, 5, 2, 4, 6)
        return t.reshape(b * rows * cols, heads, window * window, d)

    # a 4-D mask: SDPA's fused CPU kernel takes it (a 3-D one sends inference to the 2x slower math path)
    mask = bias.to(q.dtype).unsqueeze(0)
    out = attend(partition(q), partition(k), partition(v), attn_mask=mask)
    out = out.reshape(b, rows, cols, heads, window, window, d).permute(0, 1, 4, 2, 5, 3, 6)
    return out.reshape(b, n, c)


def broadcast(q_img: Tensor, aggregated: Tensor, global_kv: ElasticLinear, heads: int) -> Tensor:
    """Image queries (B, heads, H*W, d) attend over the aggregated global tokens (B, heads, G, d);
    ``global_kv`` projects those to their keys and values."""
    glb = merge_heads(aggregated)
    k_g, v_g = (split_heads(t, heads) for t in global_kv(glb, glb.shape[-1]).chunk(2, dim=-1))
    if neighbourhood.available(q_img, k_g, v_g):  # CPU SDPA is slow with so few keys
        return neighbourhood.neighbourhood_attention(
            q_img, k_g, v_g, *neighbourhood.every_key_tables(q_img.shape[2], k_g.shape[2], heads))
    return attend(q_img, k_g, v_g)


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

    def forward(self, y: Tokens) -> Tokens:
        """Gates every token; the channel gate pools all of them, auxiliary ones included (as LightViT does)."""
        dim = y.dim
        z = tokenwise(self.norm, y)
        glb = F.gelu(self.global_reduce(token_mean(z), dim // 4))
        channel = torch.sigmoid(self.channel_select(glb, dim))

        def gate(t: Tensor, loc: Tensor) -> Tensor:
            spatial = torch.sigmoid(self.spatial_select(torch.cat([loc, glb.expand_as(loc)], dim=-1), 1))
            return t * channel * spatial

        return tokenwise(gate, y, tokenwise(lambda t: F.gelu(self.local_reduce(t, dim // 4)), z))
