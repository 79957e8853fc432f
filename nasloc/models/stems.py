"""Stems: image (B, 3, H, W) -> image tokens (B, H/p * W/p, C), ``p`` the arch's ``patch_size``.

* :class:`PatchStem` (``stem: patch``): non-overlapping patch embedding, one pxp stride-p conv (DeiT).
* :class:`ConvStem` (``stem: conv``): a small convolutional tokenizer for small inputs, in the spirit
  of LightViT's conv stem and DilateFormer's overlapping stem: two 3x3 stride-2 convs (widths dim/2,
  then dim; BN + GELU after each) and a 1x1 projection.
* :class:`LightViTStem` (``stem: lightvit``): conv stem (3x3 s2, three depth-wise 3x3, 3x3
  projection), LayerNorm (LightViT).
* :class:`OverlapStem` (``stem: overlap``): four 3x3 convs (3->16->32->64->C, BN + GELU between)
  (DilateFormer).

The conv stems reach their published stride with stride-2 layers; a smaller ``patch_size`` drops
the stride of the last of them (``nasloc.arch.STEM_STRIDES`` lists the strides each supports).
Every stem reads its width (``arch.stages[0].dim``) off the arch it runs, so that it runs as a slice
in the supernet; :class:`StemChoice` holds several stems for a space that searches the stem.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..arch import OVERLAP_STEM_WIDTHS, Arch, conv_stem_width
from .elastic import ElasticBatchNorm2d, ElasticConv2d, ElasticLayerNorm
from .layout import to_tokens


class PatchStem(nn.Module):
    """Non-overlapping patch embedding (DeiT; the DW paper's linear patch embedding is the same map)."""

    def __init__(self, in_chans: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = ElasticConv2d(in_chans, dim, patch_size, stride=patch_size, same_padding=False)

    def forward(self, x: Tensor, arch: Arch) -> Tensor:
        return to_tokens(self.proj(x, arch.stages[0].dim))


class ConvStem(nn.Module):
    """Stride 4 as designed (32 px -> 8x8 tokens); stride 2 drops the stride of the second conv.

    The hidden width is a fixed function of the embedding width (:func:`nasloc.arch.conv_stem_width`), so a
    narrower arch uses the leading channels of every layer of a wider one (the supernet's slice). Its layer
    names differ from :class:`PatchStem`'s so that :class:`StemChoice` can hold both.
    """

    def __init__(self, in_chans: int, dim: int, stride: int = 4):
        super().__init__()
        hidden = conv_stem_width(dim)
        self.conv1 = ElasticConv2d(in_chans, hidden, 3, stride=2, bias=False)
        self.norm1 = ElasticBatchNorm2d(hidden)
        self.conv2 = ElasticConv2d(hidden, dim, 3, stride=2 if stride >= 4 else 1, bias=False)
        self.norm2 = ElasticBatchNorm2d(dim)
        self.pointwise = ElasticConv2d(dim, dim, 1)

    def forward(self, x: Tensor, arch: Arch) -> Tensor:
        dim = arch.stages[0].dim
        x = F.gelu(self.norm1(self.conv1(x, conv_stem_width(dim))))
        x = F.gelu(self.norm2(self.conv2(x, dim)))
        return to_tokens(self.pointwise(x, dim))


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

    def forward(self, x: Tensor, arch: Arch) -> Tensor:
        dim = arch.stages[0].dim
        x = F.gelu(self.norms[0](self.conv1(x, dim // 2)))
        for conv, norm in zip((self.dw1, self.dw2, self.dw3), self.norms[1:]):
            x = F.gelu(norm(conv(x)))
        return self.norm(to_tokens(self.proj(x, dim)))


class OverlapStem(nn.Module):
    """Stride 4 as published; stride 2 drops the stride of the last conv."""

    def __init__(self, in_chans: int, dim: int, stride: int = 4):
        super().__init__()
        c1, c2, c3 = OVERLAP_STEM_WIDTHS
        self.convs = nn.ModuleList(
            [
                ElasticConv2d(in_chans, c1, 3, bias=False),
                ElasticConv2d(c1, c2, 3, stride=2, bias=False),
                ElasticConv2d(c2, c3, 3, bias=False),
                ElasticConv2d(c3, dim, 3, stride=2 if stride >= 4 else 1, bias=False),
            ]
        )
        self.norms = nn.ModuleList([ElasticBatchNorm2d(c) for c in OVERLAP_STEM_WIDTHS])

    def forward(self, x: Tensor, arch: Arch) -> Tensor:
        for conv, norm in zip(self.convs, self.norms):
            x = F.gelu(norm(conv(x)))
        return to_tokens(self.convs[-1](x, arch.stages[0].dim))


class StemChoice(nn.Module):
    """Several stems side by side, running the one the arch names (the supernet of a space whose
    ``stem`` gene has several options).

    The stems' layers are registered directly here, under the names they have in a standalone stem,
    so that a standalone model's stem layers (``stem.proj``, ``stem.conv1``, ...) are found by name in
    the supernet when a subnet is extracted. The stems themselves are kept unregistered, only to run.
    """

    def __init__(self, stems: dict[str, nn.Module]):
        super().__init__()
        for kind, stem in stems.items():
            for name, layer in stem.named_children():
                if name in self._modules:
                    raise ValueError(f"stems {', '.join(stems)}: two have a layer named {name!r}, so they cannot be held side by side")
                self.add_module(name, layer)
        self.stems = dict(stems)  # a plain dict: the layers are registered above, once

    def forward(self, x: Tensor, arch: Arch) -> Tensor:
        return self.stems[arch.stem](x, arch)


STEM_TYPES = {"patch": PatchStem, "conv": ConvStem, "lightvit": LightViTStem, "overlap": OverlapStem}


def make_stem(arch: Arch, dim: int, kinds: tuple[str, ...]) -> nn.Module:
    """The stem ``kinds[0]`` at width ``dim`` and ``arch``'s stride, or a :class:`StemChoice` of several."""
    stems = {kind: STEM_TYPES[kind](arch.in_chans, dim, arch.patch_size) for kind in kinds}
    return stems[kinds[0]] if len(stems) == 1 else StemChoice(stems)
