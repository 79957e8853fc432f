"""Attention of each image query over its own few keys, by one fused CPU kernel
(``csrc/neighbourhood_attention.cpp``, built by :mod:`.native`).

Both local mixers are this computation with a different key set per query: DilateFormer's dilated
k x k neighbourhood (:mod:`.dilated`) and LightViT's window, with its relative position bias
(:mod:`.lightvit`). A mixer describes its key sets as index tables, made once per geometry:

* ``keys`` (tables, N, K) int64: the token index of key slot ``o`` of query ``n``, -1 for none (a key
  outside the map, left out of the softmax);
* ``head_table`` (heads,): the table each head uses (dilated attention: one table per rate).

The kernel runs where :func:`available` says so (CPU floats in eager mode); the mixers keep their eager
forms for CUDA, fvcore's trace and ONNX export, with the same outputs (``tests/test_native.py``).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import native


def _kernel():
    return native.load("neighbourhood_attention")


def available(*tensors: Tensor) -> bool:
    return native.usable(*tensors) and _kernel() is not None


def _unit_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _NeighbourhoodAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, keys: Tensor, head_table: Tensor, bias: Tensor | None) -> Tensor:
        out, attn = _kernel().forward(q, k, v, keys, head_table, bias)
        ctx.save_for_backward(q, k, v, attn, keys, head_table)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        bias_grad = ctx.needs_input_grad[5]
        grad_q, grad_k, grad_v, grad_bias = _kernel().backward(_unit_stride(grad), *ctx.saved_tensors, bias_grad)
        return grad_q, grad_k, grad_v, None, None, grad_bias if bias_grad else None


def neighbourhood_attention(
    q: Tensor, k: Tensor, v: Tensor, keys: Tensor, head_table: Tensor, bias: Tensor | None = None
) -> Tensor:
    """q, k, v: (B, heads, N, d); ``bias`` (heads, N, K) is added to the scaled logits. Returns (B, heads, N, d)
    with q's strides (a view of (B, N, heads, d) when q is one, as :func:`.layout.split_heads` makes it)."""
    q, k, v = (_unit_stride(t) for t in (q, k, v))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias)):
        return _NeighbourhoodAttention.apply(q, k, v, keys, head_table, bias)
    return _kernel().forward(q, k, v, keys, head_table, bias)[0]


@functools.cache
def dilated_tables(height: int, width: int, kernel: int, dilations: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """One table per distinct rate: the k x k keys of each query at that rate, row-major (unfold's order)."""
    rates = sorted(set(dilations))
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    offsets = torch.arange(kernel) - kernel // 2
    tables = []
    for rate in rates:
        ky = ys.reshape(-1, 1, 1) + rate * offsets.reshape(1, -1, 1)  # (N, k, 1)
        kx = xs.reshape(-1, 1, 1) + rate * offsets.reshape(1, 1, -1)  # (N, 1, k)
        inside = (ky >= 0) & (ky < height) & (kx >= 0) & (kx < width)
        tables.append(torch.where(inside, ky * width + kx, -1).reshape(height * width, kernel * kernel))
    return torch.stack(tables), torch.tensor([rates.index(r) for r in dilations])


@functools.cache
def window_tables(height: int, width: int, window: int) -> tuple[Tensor, Tensor]:
    """The keys of each query (its window's tokens, row-major) and its position inside the window, which
    picks its row of the relative position bias. The map is tiled exactly (window divides its sides)."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    inner = torch.arange(window)
    top, left = (ys // window * window).reshape(-1, 1, 1), (xs // window * window).reshape(-1, 1, 1)
    keys = (top + inner.reshape(1, -1, 1)) * width + left + inner.reshape(1, 1, -1)
    position = (ys % window * window + xs % window).reshape(-1)
    return keys.reshape(1, height * width, window * window), position
