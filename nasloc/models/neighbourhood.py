"""Attention of each image query over its own few keys, by one fused CPU kernel
(``csrc/neighbourhood_attention.cpp``, built by :mod:`.native`).

Two mechanisms use it: DilateFormer's dilated k x k neighbourhoods (:mod:`.dilated`), and LightViT's
broadcast, where every image query attends over the few aggregated global tokens (:mod:`.lightvit`;
CPU SDPA is slow with 4-8 keys: the kernel is 1.1-2x faster in training). Key sets are index tables,
made once per geometry:

* ``keys`` (tables, N, K) int64: the index, among the M keys, of key slot ``o`` of query ``n``, -1 for
  none (a key outside the map, left out of the softmax);
* ``head_table`` (heads,): the table each head uses (dilated attention: one table per rate).

The kernel runs where :func:`available` says so (CPU floats in eager mode); the eager form stays for
CUDA, fvcore's trace and ONNX export, with the same outputs (``tests/test_native.py``). LightViT's
windows are the same computation with 16-49 keys and a bias, but there the kernel measured 1.07-1.14x
(4x4 windows, training) and 0.41-0.47x (7x7) of partition + SDPA, so they keep SDPA.
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
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, keys: Tensor, head_table: Tensor) -> Tensor:
        out, attn = _kernel().forward(q, k, v, keys, head_table)
        ctx.save_for_backward(q, k, v, attn, keys, head_table)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        grad_q, grad_k, grad_v = _kernel().backward(_unit_stride(grad), *ctx.saved_tensors)
        return grad_q, grad_k, grad_v, None, None


def neighbourhood_attention(q: Tensor, k: Tensor, v: Tensor, keys: Tensor, head_table: Tensor) -> Tensor:
    """q: (B, heads, N, d); k, v: (B, heads, M, d). Returns (B, heads, N, d) with q's strides (a view of
    (B, N, heads, d) when q is one, as :func:`.layout.split_heads` makes it)."""
    q, k, v = (_unit_stride(t) for t in (q, k, v))
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _NeighbourhoodAttention.apply(q, k, v, keys, head_table)
    return _kernel().forward(q, k, v, keys, head_table)[0]


def _tables(make):
    """Cached per geometry; made outside inference mode, so that training may save them for its backward
    after an evaluation built them."""

    @functools.cache
    @functools.wraps(make)
    def cached(*args):
        with torch.inference_mode(False):
            return make(*args)

    return cached


@_tables
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


@_tables
def every_key_tables(queries: int, keys: int, heads: int) -> tuple[Tensor, Tensor]:
    """Every query over all ``keys`` keys (LightViT's broadcast over the global tokens)."""
    return torch.arange(keys).expand(1, queries, keys).contiguous(), torch.zeros(heads, dtype=torch.long)
