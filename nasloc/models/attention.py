"""The token mixer: one set of q, k, v and output projections shared by the three mixers.

* ``global``: full softmax attention over all tokens (fused SDPA).
* ``dilated``: image tokens attend to their dilated neighbourhood (:mod:`.dilated`).
* ``window``: image tokens attend inside their window (:mod:`.lightvit`) and, when there are global
  tokens, also to the aggregated global tokens (:func:`.lightvit.broadcast`).
In both local mixers the auxiliary tokens (class, global) aggregate: their queries attend over all
image tokens. With ``life`` the projections become LIFE's multi-scale qkv (:mod:`.life`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..arch import Block
from .dilated import dilated_attention
from .elastic import ElasticLinear
from .layout import Geometry, attend, merge_heads, split_heads
from .life import MultiScaleQKV
from .lightvit import RelPosBias, broadcast, window_attention


class TokenMixer(nn.Module):
    """Built for every mixer a block can take: ``plain``/``life`` say which qkv forms it needs,
    ``window`` (the window side, 0 = never) adds the relative position table and ``broadcast`` the
    projection of the global tokens for the broadcast step."""

    def __init__(
        self, dim: int, heads: int, *, qkv_bias: bool, plain: bool, life: bool, window: int, broadcast: bool
    ):
        super().__init__()
        bias = qkv_bias and plain
        self.q = ElasticLinear(dim, dim, bias=bias or life)  # LIFE's first scale always has a bias
        self.k = ElasticLinear(dim, dim, bias=bias)
        self.v = ElasticLinear(dim, dim, bias=bias)
        self.life = MultiScaleQKV(dim) if life else None
        self.rel_pos = RelPosBias(window, heads) if window else None
        self.global_kv = ElasticLinear(dim, dim, out_groups=2) if broadcast else None
        self.proj = ElasticLinear(dim, dim)

    def forward(self, x: Tensor, geo: Geometry, heads: int, block: Block, qkv_bias: bool, window: int, dilate_kernel: int) -> Tensor:
        dim = x.shape[-1]
        if block.life:
            q, k, v = self.life(x, geo, self.q, self.k, self.v)
        else:
            q, k, v = (lin(x, dim, use_bias=qkv_bias) for lin in (self.q, self.k, self.v))
        if block.mixer == "global":
            out = merge_heads(attend(*(split_heads(t, heads) for t in (q, k, v))))
        else:
            out = self._local(q, k, v, geo, heads, block, window, dilate_kernel)
        return self.proj(out, dim)

    def _local(self, q: Tensor, k: Tensor, v: Tensor, geo: Geometry, heads: int, block: Block, window: int, dilate_kernel: int) -> Tensor:
        """q, k, v: (B, N, C) tokens; returns the mixed tokens (B, N, C), heads merged."""
        n = geo.n_aux
        # split, not slicing: backward then joins the parts once, where each slice would scatter its
        # gradient into a zero-filled full-size tensor and the slices' gradients would be summed
        (q_aux, q_img), (_, k_img), (_, v_img) = (t.split([n, t.shape[1] - n], dim=1) for t in (q, k, v))
        if block.mixer == "dilated":
            heads_img = [split_heads(t, heads) for t in (q_img, k_img, v_img)]
            out_img = merge_heads(dilated_attention(*heads_img, geo, block.dilations, dilate_kernel))
        else:
            out_img = window_attention(q_img, k_img, v_img, geo, window, self.rel_pos(heads), heads)
        if not n:
            return out_img
        k_heads, v_heads = split_heads(k_img, heads), split_heads(v_img, heads)
        out_aux = attend(split_heads(q_aux, heads), k_heads, v_heads)  # aggregate
        if block.mixer == "window" and geo.n_global:
            glb = broadcast(split_heads(q_img, heads), out_aux[:, :, geo.n_cls :], self.global_kv, heads)
            out_img = (out_img.view_as(glb.transpose(1, 2)) + glb.transpose(1, 2)).flatten(2)  # no merge copy
        return torch.cat([merge_heads(out_aux), out_img], dim=1)
