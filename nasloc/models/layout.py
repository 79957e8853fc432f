"""Token layout shared by all blocks: :class:`Tokens`, auxiliary and image tokens, joined or apart.

Auxiliary tokens are the class token (if any) followed by the LightViT global tokens (if any), ``(B, n_aux,
C)``; the image tokens are ``(B, H*W, C)``, row-major. Convolutional parts of the locality mechanisms see the
image tokens as a ``(B, C, H, W)`` map: a contiguous ``(B, H*W, C)`` tensor is that map in channels-last
layout, a free view, but in one joined tensor the image tokens of each sample are offset by the auxiliary
ones, so each conv copied them out and each result was joined back (a copy forward and another backward:
9 % of the every-mechanism arch's training step). Blocks with such parts therefore keep the two apart, and
global attention, which needs them joined, keeps them joined (:class:`Tokens`).
Attention sees the tokens split into heads, ``(B, heads, N, C / heads)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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


class Tokens:
    """A feature sequence: ``aux`` (B, n_aux, C; None when the arch has none) and ``img`` (B, H*W, C), held
    joined in one tensor or apart, in the form that the op which made it produced.

    Ops take whichever form they are given (:func:`tokenwise`) or ask for the one they need (:meth:`whole`,
    :attr:`aux`, :attr:`img`); a form is made once, on first use, and kept. A conversion costs a copy (a join
    forward, or a split whose backward joins the gradients), so each block starts in the form its parts need
    (:meth:`~nasloc.models.locality_vit.LocalityBlock.runs_joined`): global attention without convs runs
    joined, everything else apart, where the image tokens are a dense (B, C, H, W) channels-last map for free.
    """

    __slots__ = ("n_aux", "made_joined", "_joined", "_parts")

    def __init__(self, n_aux: int, joined: Tensor | None = None, parts: tuple[Tensor | None, Tensor] | None = None):
        self.n_aux, self._joined, self._parts = n_aux, joined, parts
        self.made_joined = joined is not None

    @classmethod
    def of_joined(cls, x: Tensor, n_aux: int) -> "Tokens":
        """From (B, n_aux + H*W, C), auxiliary tokens first."""
        return cls(n_aux, joined=x)

    @classmethod
    def of_parts(cls, aux: Tensor | None, img: Tensor) -> "Tokens":
        return cls(0 if aux is None else aux.shape[1], parts=(aux, img))

    def whole(self) -> Tensor:
        """(B, n_aux + H*W, C), auxiliary tokens first."""
        if self._joined is None:
            aux, img = self._parts
            self._joined = img if aux is None else torch.cat([aux, img], dim=1)
        return self._joined

    def parts(self) -> tuple[Tensor | None, Tensor]:
        # split, not two slices: backward joins the two gradients once, where each slice would scatter its
        # gradient into a zero-filled full-size tensor and the two would then be summed
        if self._parts is None:
            x = self._joined
            self._parts = (None, x) if not self.n_aux else tuple(x.split([self.n_aux, x.shape[1] - self.n_aux], dim=1))
        return self._parts

    @property
    def dim(self) -> int:
        return self.either().shape[-1]

    def either(self) -> Tensor:
        """The joined tensor or the image tokens, whichever is made: for what both share (batch size, width,
        dtype, device) without making a form."""
        return self._joined if self._joined is not None else self._parts[1]

    @property
    def aux(self) -> Tensor | None:
        return self.parts()[0]

    @property
    def img(self) -> Tensor:
        return self.parts()[1]

    def with_img(self, img: Tensor) -> "Tokens":
        """The same auxiliary tokens with new image tokens (what a conv on the image map returns), apart."""
        return Tokens.of_parts(self.aux, img)

    def in_form(self, joined: bool) -> "Tokens":
        """The same tokens, made joined or apart."""
        if joined:
            return self if self.made_joined else Tokens.of_joined(self.whole(), self.n_aux)
        return Tokens.of_parts(*self.parts()) if self.made_joined else self


def tokenwise(fn: Callable[..., Tensor], *xs: Tokens) -> Tokens:
    """``fn`` acting on each token alone (a linear layer, a norm, an activation, an elementwise op of several
    sequences) applied to every token, in the form of the first sequence."""
    if xs[0].made_joined:
        return Tokens.of_joined(fn(*(x.whole() for x in xs)), xs[0].n_aux)
    parts = [x.parts() for x in xs]
    aux = None if parts[0][0] is None else fn(*(p[0] for p in parts))
    return Tokens.of_parts(aux, fn(*(p[1] for p in parts)))


def add(x: Tokens, y: Tokens) -> Tokens:
    return tokenwise(torch.add, x, y)


def token_mean(x: Tokens) -> Tensor:
    """(B, 1, C): the mean over all tokens, auxiliary ones included."""
    if x.made_joined or x.aux is None:
        return x.whole().mean(1, keepdim=True)
    return (x.aux.sum(1, keepdim=True) + x.img.sum(1, keepdim=True)) / (x.aux.shape[1] + x.img.shape[1])


def to_map(tokens: Tensor, geo: Geometry) -> Tensor:
    """Image tokens (B, H*W, C) -> map (B, C, H, W), row-major."""
    b, _, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, geo.height, geo.width)


def to_tokens(feature_map: Tensor) -> Tensor:
    """Map (B, C, H, W) -> tokens (B, H*W, C)."""
    return feature_map.flatten(2).transpose(1, 2)


def on_map(img: Tensor, geo: Geometry, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``fn`` (map -> map of the same size) applied to image tokens (B, H*W, C), seen as a (B, C, H, W) map."""
    return to_tokens(fn(to_map(img, geo)))


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
