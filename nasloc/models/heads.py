"""Heads: how the normalised tokens become one feature vector per image (then a linear classifier).

* ``head: token``: the class token (DeiT).
* ``head: avg``: the mean of the image tokens (DilateFormer).
* ``head: neck``: :class:`Neck` (linear to ``neck_dim``, LN, GELU) on every token, global tokens
  included, then the mean of all of them (LightViT).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..arch import Arch
from .elastic import ElasticLayerNorm, ElasticLinear


class Neck(nn.Module):
    def __init__(self, dim: int, neck_dim: int):
        super().__init__()
        self.fc = ElasticLinear(dim, neck_dim)
        self.norm = ElasticLayerNorm(neck_dim, eps=1e-5)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.norm(self.fc(x)))


def pool(tokens: Tensor, arch: Arch, neck: Neck | None) -> Tensor:
    """(B, N, C) tokens -> (B, features) as the arch's head pools them."""
    if arch.head == "token":
        return tokens[:, 0]
    if arch.head == "avg":
        return tokens[:, arch.num_aux_tokens :].mean(1)
    return neck(tokens).mean(1)
