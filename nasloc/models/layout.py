"""Token layout shared by all blocks: ``(B, n_aux + H*W, C)``, auxiliary tokens first.

Auxiliary tokens are the class token (if any) followed by the LightViT global tokens (if any).
Convolutional parts of the locality mechanisms see only the image tokens, as a ``(B, C, H, W)`` map;
attention sees the tokens split into heads, ``(B, heads, N, C / heads)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass(frozen=True)
class Geometry:
    """Where the tokens of a feature sequence come from."""

    height: int
    width: int
    n_cls: int  # 0 or 1
    n_global: int  # LightViT global tokens

    @property
    def n_aux(self) -> int:
        return self.n_cls + self.n_global

    def halved(self) -> "Geometry":
        return Geometry(self.height // 2, self.width // 2, self.n_cls, self.n_global)


def split_aux(x: Tensor, geo: Geometry) -> tuple[Tensor, Tensor]:
    # split, not two slices: backward joins the two gradients once, where each slice would scatter its
    # gradient into a zero-filled full-size tensor and the two would then be summed
    aux, img = x.split([geo.n_aux, x.shape[1] - geo.n_aux], dim=1)
    return aux, img


def join_aux(aux: Tensor, img: Tensor) -> Tensor:
    return torch.cat([aux, img], dim=1) if aux.shape[1] else img


def to_map(tokens: Tensor, geo: Geometry) -> Tensor:
    """Image tokens (B, H*W, C) -> map (B, C, H, W), row-major."""
    b, _, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, geo.height, geo.width)


def to_tokens(feature_map: Tensor) -> Tensor:
    """Map (B, C, H, W) -> tokens (B, H*W, C)."""
    return feature_map.flatten(2).transpose(1, 2)


def map_image_tokens(x: Tensor, geo: Geometry, fn) -> Tensor:
    """Apply ``fn`` (map -> map with the same spatial size) to the image tokens; aux tokens pass as they are."""
    aux, img = split_aux(x, geo)
    return join_aux(aux, to_tokens(fn(to_map(img, geo))))


def split_heads(t: Tensor, heads: int) -> Tensor:
    """(B, N, C) -> (B, heads, N, C / heads)."""
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(t: Tensor) -> Tensor:
    """(B, heads, N, d) -> (B, N, heads * d)."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


# cuDNN's fused attention returned NaN gradients under bf16 autocast for some supernet subnets (the global
# tokens' aggregation: a few queries over all image tokens) on an H200 with torch 2.11, where CUDA fp32 and
# the CPU were right (bench/gpu_checks.py --supernet); the other fused backends are used instead.
_CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attend(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """Softmax attention of (B, heads, N, d) queries over keys and values: fused SDPA, not cuDNN's on CUDA."""
    if q.is_cuda:
        with sdpa_kernel(_CUDA_SDPA_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    if attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled() and not torch.jit.is_tracing():
        # a learned mask (LightViT's relative position bias) sends CPU SDPA to its math path, whose extra
        # checks and split scaling make it 1.15-1.35x slower than these three ops (windows of 16 tokens);
        # fvcore's trace keeps the SDPA, which it counts alike (q.k and attn.v)
        return ((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2) + attn_mask).softmax(-1) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
