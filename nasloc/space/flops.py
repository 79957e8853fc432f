"""MACs and parameters of an arch, counted analytically from the arch alone (no model is built; microseconds).

It equals fvcore run on the built model (:func:`nasloc.deploy.macs.fvcore_macs`, checked by the tests).
Convention of the seed papers and of fvcore: one multiply-add is one FLOP. ``--budget 0.7GFLOPs``
means 0.7e9 multiply-adds per image at the arch's resolution. Counted: linear and conv layers,
attention matmuls (fused SDPA included) and dilated attention's two products (element-wise ops:
``linalg_vecdot``, ``addcmul_``), LayerNorm (5 per element) and BatchNorm in eval (2 per element)
as fvcore counts them. Not counted, as in fvcore: element-wise ops (activations, adds,
softmax, gates), pooling, reshapes.
"""
from __future__ import annotations

from collections import Counter
from typing import NamedTuple

from ..arch import OVERLAP_STEM_WIDTHS, Arch, Block, Shortcut, Stage, conv_stem_width, se_channels


class Cost(NamedTuple):
    """MACs per image and parameter count (a tuple: cheap to make, the search makes many)."""

    macs: int
    params: int

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.macs + other.macs, self.params + other.params)

    def times(self, repeats: int) -> "Cost":
        return Cost(self.macs * repeats, self.params * repeats)


ZERO = Cost(0, 0)


def linear(tokens: int, c_in: int, c_out: int, bias: bool = True) -> Cost:
    return Cost(tokens * c_in * c_out, c_in * c_out + (c_out if bias else 0))


def conv(pixels_out: int, c_in: int, c_out: int, kernel: int, bias: bool = True) -> Cost:
    return Cost(pixels_out * c_in * c_out * kernel * kernel, c_in * c_out * kernel * kernel + (c_out if bias else 0))


def dwconv(pixels: int, channels: int, kernel: int, bias: bool = True) -> Cost:
    return Cost(pixels * channels * kernel * kernel, channels * kernel * kernel + (channels if bias else 0))


def layer_norm(tokens: int, channels: int) -> Cost:
    return Cost(5 * tokens * channels, 2 * channels)


def batch_norm(pixels: int, channels: int) -> Cost:
    return Cost(2 * pixels * channels, 2 * channels)


def count(arch: Arch, img_size: int | None = None) -> Cost:
    """MACs per image and parameters of the standalone model of ``arch``, without building it.

    Agrees with :func:`fvcore_macs` on the built model and with its parameter count.
    """
    if img_size is not None and img_size != arch.img_size:
        arch = arch.replace(img_size=img_size)
    total = _stem(arch) + _tokens(arch)
    for s, stage in enumerate(arch.stages):
        if s:
            total += _downsample(arch, s)
        for block, repeats in Counter(stage.blocks).items():  # equal blocks cost the same: count once
            total += _block(arch, s, block).times(repeats)
    total += sum((_shortcut(arch, sc) for sc in arch.shortcuts), ZERO)
    return total + _head(arch)


def _stem(arch: Arch) -> Cost:
    c0, size, stride, chans = arch.stages[0].dim, arch.img_size, arch.patch_size, arch.in_chans
    if arch.stem == "patch":
        return conv((size // stride) ** 2, chans, c0, stride)
    if arch.stem == "conv":
        return _conv_stem(arch)
    if arch.stem == "lightvit":
        mid, half = c0 // 2, size // 2
        after_dw = half // 2 if stride >= 4 else half
        out = after_dw // 2 if stride >= 8 else after_dw
        cost = conv(half * half, chans, mid, 3, bias=False) + batch_norm(half * half, mid)
        cost += (dwconv(half * half, mid, 3, bias=False) + batch_norm(half * half, mid)) + (dwconv(half * half, mid, 3, bias=False) + batch_norm(half * half, mid))
        cost += dwconv(after_dw**2, mid, 3, bias=False) + batch_norm(after_dw**2, mid)
        return cost + conv(out * out, mid, c0, 3) + layer_norm(out * out, c0)
    c1, c2, c3 = OVERLAP_STEM_WIDTHS
    half = size // 2
    out = half // 2 if stride >= 4 else half
    cost = conv(size * size, chans, c1, 3, bias=False) + batch_norm(size * size, c1)
    cost += conv(half * half, c1, c2, 3, bias=False) + batch_norm(half * half, c2)
    cost += conv(half * half, c2, c3, 3, bias=False) + batch_norm(half * half, c3)
    return cost + conv(out * out, c3, c0, 3, bias=False)


def _conv_stem(arch: Arch) -> Cost:
    c0, chans, half = arch.stages[0].dim, arch.in_chans, arch.img_size // 2
    mid = conv_stem_width(c0)
    out = half // 2 if arch.patch_size >= 4 else half
    cost = conv(half * half, chans, mid, 3, bias=False) + batch_norm(half * half, mid)
    cost += conv(out * out, mid, c0, 3, bias=False) + batch_norm(out * out, c0)
    return cost + conv(out * out, c0, c0, 1)


def _tokens(arch: Arch) -> Cost:
    c0, grid = arch.stages[0].dim, arch.grid(0)
    params = c0 * (int(arch.cls_token) + arch.global_tokens)
    if arch.pos_embed == "absolute":
        params += (int(arch.cls_token) + grid * grid) * c0
    return Cost(0, params)


def _downsample(arch: Arch, s: int) -> Cost:
    c_in, c_out, pixels = arch.stages[s - 1].dim, arch.stages[s].dim, arch.grid(s) ** 2
    if arch.downsample == "merge":
        cost = layer_norm(pixels, 4 * c_in) + linear(pixels, 4 * c_in, c_out, bias=False) + linear(pixels, c_in, c_out, bias=False)
    else:
        cost = conv(pixels, c_in, c_out, 3) + batch_norm(pixels, c_out)
    if arch.num_aux_tokens:
        cost += layer_norm(arch.num_aux_tokens, c_in) + linear(arch.num_aux_tokens, c_in, c_out, bias=False)
    return cost


def _block(arch: Arch, s: int, block: Block) -> Cost:
    stage = arch.stages[s]
    c, img = stage.dim, arch.grid(s) ** 2
    n = arch.num_aux_tokens + img
    cost = dwconv(img, c, 3) if arch.cpe else ZERO
    cost += layer_norm(n, c) + _qkv(arch, c, n, img, block) + _mixer(arch, s, block) + linear(n, c, c)
    return cost + _ffn(arch, stage, n, img, block.ffn_kernel)


def _qkv(arch: Arch, c: int, n: int, img: int, block: Block) -> Cost:
    if block.life:  # s1 (bias), DW3, PW2, DW5, PW3
        pointwise = linear(n, c, c, bias=False)
        return linear(n, c, c) + pointwise + pointwise + dwconv(img, c, 3, bias=False) + dwconv(img, c, 5, bias=False)
    if block.mixer == "global":
        return linear(n, c, 3 * c, bias=arch.qkv_bias)
    # local mixers: no query reads the keys and values of the auxiliary tokens, so they are not made
    return linear(n, c, c, bias=arch.qkv_bias) + linear(img, c, 2 * c, bias=arch.qkv_bias)


def _mixer(arch: Arch, s: int, block: Block) -> Cost:
    stage = arch.stages[s]
    c, img, n_aux = stage.dim, arch.grid(s) ** 2, arch.num_aux_tokens
    if block.mixer == "global":
        return Cost(2 * (n_aux + img) ** 2 * c, 0)
    aggregate = Cost(2 * n_aux * img * c, 0)
    if block.mixer == "dilated":
        return aggregate + Cost(2 * img * arch.dilate_kernel**2 * c, 0)
    window = arch.window_size(s)
    cost = aggregate + Cost(2 * img * window * window * c, (2 * window - 1) ** 2 * stage.heads)
    if arch.global_tokens:  # broadcast: project the aggregated tokens, image queries attend to them
        cost += linear(arch.global_tokens, c, 2 * c) + Cost(2 * img * arch.global_tokens * c, 0)
    return cost


def _ffn(arch: Arch, stage: Stage, n: int, img: int, kernel: int) -> Cost:
    c, hidden = stage.dim, stage.hidden
    if arch.ffn == "localvit":
        se = se_channels(c, hidden)
        cost = linear(img, c, hidden, bias=False) + batch_norm(img, hidden)
        if kernel:
            cost += dwconv(img, hidden, kernel, bias=False) + batch_norm(img, hidden)
        cost += linear(1, hidden, se) + linear(1, se, hidden)
        return cost + linear(img, hidden, c, bias=False) + batch_norm(img, c)
    cost = layer_norm(n, c) + linear(n, c, hidden) + linear(n, hidden, c)
    if kernel:
        cost += dwconv(img, hidden, kernel)
    if arch.ffn == "bidim":
        r = c // 4
        cost += layer_norm(n, c) + linear(1, c, r) + linear(n, c, r) + linear(1, r, c) + linear(n, 2 * r, 1)
    return cost


def _shortcut(arch: Arch, shortcut: Shortcut) -> Cost:
    s = next(s for index, s, _, _ in arch.iter_blocks() if index == shortcut.start)
    c, img = arch.stages[s].dim, arch.grid(s) ** 2
    return sum((batch_norm(img, c) + dwconv(img, c, k) for k in shortcut.kernels), ZERO)


def _head(arch: Arch) -> Cost:
    last = len(arch.stages) - 1
    c, n = arch.stages[last].dim, arch.num_aux_tokens + arch.grid(last) ** 2
    cost = layer_norm(n, c)
    features = c
    if arch.head == "neck":
        cost += linear(n, c, arch.neck_dim) + layer_norm(n, arch.neck_dim)
        features = arch.neck_dim
    if arch.num_classes:
        cost += linear(1, features, arch.num_classes)
    return cost
