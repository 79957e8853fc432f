"""LIFE multi-scale qkv projection (Akkaya et al., Pattern Recognition 2024).

Replaces the qkv projection of an attention block. With C channels:
    s1 = Linear(C, C) x                       (bias)
    s2 = PW2(DW3x3(s1))                        (no bias; cascaded from s1)
    s3 = PW3(DW5x5(s2))                        (no bias; cascaded from s2)
Each s_i is [q_i | k_i | v_i] with C/3 channels each, and Q = [q1 q2 q3], K = [k1 k2 k3],
V = [v1 v2 v3], so each scale owns a contiguous third of the channels: a third of the heads when their
number divides by 3 (DeiT-T's 3, DeiT-S's 6); otherwise (2 heads, as the imagenet space allows) a head spans
two scales, which the paper never tried (the space only needs dim % 3 == 0). Receptive fields are 1, 3 and 7
patches. Auxiliary tokens skip the depth-wise convs (only the pointwise parts act on them).

Weight sharing: s1, PW2 and PW3 are the q, k and v linear layers of the plain projection (all C x C),
so LIFE on/off switches only the two depth-wise convs in the supernet.

Deviation from the official code, on purpose: there the class token's K is assembled as (k1, k1, k1),
a bug; here it is (k1, k2, k3) like Q and V. Parameter and MAC counts are unaffected.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .elastic import ElasticConv2d, ElasticLinear
from .layout import Geometry, Tokens, on_map, tokenwise


class MultiScaleQKV(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dw3 = ElasticConv2d(dim, dim, 3, bias=False, depthwise=True)
        self.dw5 = ElasticConv2d(dim, dim, 5, bias=False, depthwise=True)

    def forward(
        self, x: Tokens, geo: Geometry, s1: ElasticLinear, pw2: ElasticLinear, pw3: ElasticLinear
    ) -> tuple[Tokens, Tokens, Tokens]:
        dim = x.dim

        def cascade(pointwise: ElasticLinear, depthwise: nn.Module, scale: Tokens) -> Tokens:
            """The next scale: the depth-wise conv on the image tokens, then the pointwise linear on all."""
            convolved = scale.with_img(on_map(scale.img, geo, depthwise))
            return tokenwise(lambda t: pointwise(t, dim, use_bias=False), convolved)

        scale1 = tokenwise(lambda t: s1(t, dim), x)
        scale2 = cascade(pw2, self.dw3, scale1)
        scale3 = cascade(pw3, self.dw5, scale2)
        img = _regroup((scale1.img, scale2.img, scale3.img), dim)
        aux = (None,) * 3 if x.aux is None else _regroup((scale1.aux, scale2.aux, scale3.aux), dim)
        return tuple(Tokens.of_parts(a, i) for a, i in zip(aux, img))


def _regroup(scales: tuple[Tensor, Tensor, Tensor], dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """The scales' [q_i | k_i | v_i] thirds regrouped into Q = [q1 q2 q3], K and V."""
    thirds = [s.split(dim // 3, dim=-1) for s in scales]
    q, k, v = (torch.cat([t[i] for t in thirds], dim=-1) for i in range(3))
    return q, k, v
