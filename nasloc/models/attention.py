"""The token mixer: one set of q, k, v and output projections shared by the three mixers.

* ``global``: full softmax attention over all tokens (fused SDPA).
* ``dilated``: image tokens attend to their dilated neighbourhood (:mod:`.dilated`).
* ``window``: image tokens attend inside their window (:mod:`.lightvit`) and, when there are global
  tokens, also to the aggregated global tokens (:func:`.lightvit.broadcast`).
In both local mixers the auxiliary tokens (class, global) aggregate: their queries attend over all
image tokens. With ``life`` the projections become LIFE's multi-scale qkv (:mod:`.life`).
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from ..arch import Block
from .dilated import dilated_attention
from .elastic import ElasticLinear
from .layout import Geometry, Tokens, attend, merge_heads, split_heads, tokenwise
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

    def forward(self, x: Tokens, geo: Geometry, heads: int, block: Block, qkv_bias: bool, window: int,
                dilate_kernel: int) -> Tokens:
        dim = x.dim

        def project(lin: ElasticLinear) -> Callable[[Tensor], Tensor]:
            return lambda t: lin(t, dim, use_bias=qkv_bias)

        if block.life:
            q, k, v = self.life(x, geo, self.q, self.k, self.v)
        elif block.mixer == "global":
            x = x.in_form(joined=True)  # one join before the projections, not one per q, k and v
            q, k, v = (tokenwise(project(lin), x) for lin in (self.q, self.k, self.v))
        else:  # no query of a local mixer reads the auxiliary tokens' keys and values, so they are not made
            q = tokenwise(project(self.q), x)
            k, v = (Tokens.of_parts(None, project(lin)(x.img)) for lin in (self.k, self.v))
        if block.mixer == "global":
            out = merge_heads(attend(*(split_heads(t.whole(), heads) for t in (q, k, v))))
            return Tokens.of_joined(self.proj(out, dim), geo.n_aux)
        return tokenwise(lambda t: self.proj(t, dim), self._local(q, k, v, geo, heads, block, window, dilate_kernel))

    def _local(self, q: Tokens, k: Tokens, v: Tokens, geo: Geometry, heads: int, block: Block, window: int,
               dilate_kernel: int) -> Tokens:
        """Image queries attend to their neighbourhood, auxiliary queries to every image token; heads merged."""
        if block.mixer == "dilated":
            heads_img = [split_heads(t.img, heads) for t in (q, k, v)]
            out_img = merge_heads(dilated_attention(*heads_img, geo, block.dilations, dilate_kernel))
        else:
            out_img = window_attention(q.img, k.img, v.img, geo, window, self.rel_pos(heads), heads)
        if q.aux is None:
            return Tokens.of_parts(None, out_img)
        k_heads, v_heads = split_heads(k.img, heads), split_heads(v.img, heads)
        out_aux = attend(split_heads(q.aux, heads), k_heads, v_heads)  # aggregate
        if block.mixer == "window" and geo.n_global:
            glb = broadcast(split_heads(q.img, heads), out_aux[:, :, geo.n_cls :], self.global_kv, heads)
            out_img = (out_img.view_as(glb.transpose(1, 2)) + glb.transpose(1, 2)).flatten(2)  # no merge copy
        return Tokens.of_parts(merge_heads(out_aux), out_img)
