"""DilateFormer (Jiao et al., IEEE TMM 2023): multi-scale dilated attention.

:func:`dilated_attention` is sliding-window dilated attention (SWDA). Every image query attends to
its kxk neighbourhood sampled with the dilation rate of its head. Two implementations, same outputs:

* on the CPU, the fused kernel of :mod:`.neighbourhood` (C++, compiled on first use): each query
  visits its neighbourhood once, 1.2-2.5x faster than the eager form on an idle CPU and 2.7-5.3x beside
  other jobs (forward + backward, ``bench/bench_dilated.py``);
* on CUDA with small maps (at most ``DENSE_MAX_TOKENS`` image tokens, e.g. CIFAR's 8x8), one fused SDPA
  over all image keys with a mask that keeps each head's dilated neighbourhood: N/(k*k) times the MACs
  of the real neighbourhoods (7x on an 8x8 map), but one kernel instead of the shift-and-multiply loop's
  ~10 small ones per offset, which leave a GPU waiting on launches. The MACs counted stay those of the
  neighbourhoods: the mask is how a GPU runs the operator, not a different operator;
* elsewhere (CUDA on larger maps, fvcore's trace, ONNX export, or where the kernel cannot be built),
  shift and multiply in eager ops, below.

Shift and multiply: heads with equal rates are computed together; the key and value maps are
zero-padded once, and for each of the k*k offsets the shifted view gives one logit per query
(``linalg.vecdot``) and one term of the output (``addcmul_``). Real neighbourhoods, so MACs are
H*W*k*k*C per product, not (H*W)^2*C; ``nasloc.deploy.macs.fvcore_macs`` counts these two ops.
Element-wise products beat the gathered (1 x d) @ (d x k*k) matmuls by far
(``results/benchmarks.md``). Training goes through a hand-written backward (no double backward) that
accumulates into in-map slices, instead of autograd's full-size zero gradient for every shifted
view.

Border handling differs from the official code on purpose: there, zero-padded keys outside the
map enter the softmax with logit 0 and value 0 (a corner query at rate 2 gets 4/9 of its mass
from padding); here padded keys are masked out of the softmax.

DilateFormer's skeleton parts live with their kind: the overlapping stem in :mod:`.stems`, the conv
downsampling in :mod:`.downsample`, the conditional position encoding in :mod:`.pos_embed`.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import neighbourhood
from .layout import Geometry, attend

# Masked dense attention computes N/(k*k) times the real neighbourhoods' products: 7x at 8x8 with k = 3, 28x
# at 16x16, where one kernel still beats the shift-and-multiply loop on a GPU; DilateFormer's 224 px maps
# (28x28 and up) keep the loop.
DENSE_MAX_TOKENS = 256

Heads = slice | list[int]  # the heads of one rate: a slice (a view) when they are adjacent


def _head_groups(dilations: tuple[int, ...]) -> list[tuple[int, Heads]]:
    """(rate, heads) for every distinct rate: heads of equal rate share every op."""
    groups = []
    for rate in sorted(set(dilations)):
        heads = [h for h, r in enumerate(dilations) if r == rate]
        adjacent = heads == list(range(heads[0], heads[-1] + 1))
        groups.append((rate, slice(heads[0], heads[-1] + 1) if adjacent else heads))
    return groups


def _shifts(kernel: int, rate: int) -> list[tuple[int, int]]:
    """(dy, dx) of the k*k keys of a query, row-major (unfold's order)."""
    reach = kernel // 2
    return [((i - reach) * rate, (j - reach) * rate) for i in range(kernel) for j in range(kernel)]


def _clip(shift: int, size: int) -> tuple[slice, slice]:
    """Along one axis: the queries whose key at ``shift`` lies in the map, and those keys (maybe empty)."""
    lo, hi = max(0, -shift), min(size, size - shift)
    hi = max(lo, hi)  # a shift beyond the map leaves no query, not a negative slice
    return slice(lo, hi), slice(lo + shift, hi + shift)


Region = tuple[slice, slice, slice, slice]  # (all batch, all heads, rows, cols) of a (B, g, H, W, ...) tensor


def _regions(geo: Geometry, kernel: int, rate: int) -> list[tuple[Region, Region]]:
    """Per offset: (the queries whose key is in the map, those keys); the rest is padding."""
    regions = []
    for dy, dx in _shifts(kernel, rate):
        (q_rows, k_rows), (q_cols, k_cols) = _clip(dy, geo.height), _clip(dx, geo.width)
        every = slice(None)
        regions.append(((every, every, q_rows, q_cols), (every, every, k_rows, k_cols)))
    return regions


def _inside_mask(geo: Geometry, kernel: int, rate: int, device: torch.device) -> Tensor:
    """(k*k, 1, 1, H, W) bool: which keys of each query fall inside the map."""
    inside = torch.zeros(kernel * kernel, geo.height, geo.width, dtype=torch.bool, device=device)
    for o, (at_q, _) in enumerate(_regions(geo, kernel, rate)):
        inside[o][at_q[2:]] = True
    return inside[:, None, None]


def _group_forward(
    q: Tensor, k: Tensor, v: Tensor, geo: Geometry, kernel: int, rate: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """q (contiguous), k, v: (B, g, H, W, d) of heads with one rate.

    Returns the output (B, g, H, W, d), the attention (k*k, B, g, H, W) and the zero-padded k and v.
    Every product runs over the whole map, padding included: H*W*k*k*d MACs each, as counted.
    """
    pad = rate * (kernel // 2)
    k, v = (F.pad(t, (0, 0, pad, pad, pad, pad)) for t in (k, v))
    views = [(slice(pad + dy, pad + dy + geo.height), slice(pad + dx, pad + dx + geo.width))
             for dy, dx in _shifts(kernel, rate)]
    logits = torch.stack([torch.linalg.vecdot(q, k[:, :, rows, cols]) for rows, cols in views])
    logits = logits * q.shape[-1] ** -0.5  # scaling the k*k logits is cheaper than scaling the d channels of q
    inside = _inside_mask(geo, kernel, rate, q.device)
    # under autocast softmax may return float32; the products stay in the dtype of q, as matmuls would
    attn = logits.masked_fill_(~inside, float("-inf")).softmax(0).to(q.dtype)
    out = torch.zeros_like(q)
    for a, (rows, cols) in zip(attn.unbind(0), views):
        out.addcmul_(a.unsqueeze(-1), v[:, :, rows, cols])
    return out, attn, k, v


def _group_backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, attn: Tensor, geo: Geometry, kernel: int, rate: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of q, k, v of one rate group; ``k``, ``v`` padded as :func:`_group_forward` returns them.

    Only in-map keys are visited: padded keys have attention 0, so they pass no gradient on.
    """
    pad = rate * (kernel // 2)
    k, v = (t[:, :, pad : pad + geo.height, pad : pad + geo.width] for t in (k, v))
    centre = kernel * kernel // 2  # the query's own position: its key is always in the map
    regions = _regions(geo, kernel, rate)
    others = [(o, region) for o, region in enumerate(regions) if o != centre]
    grad_attn = torch.zeros_like(attn)  # zeros, not empty: 0 * garbage could be NaN
    grad_attn[centre] = torch.linalg.vecdot(grad, v)
    grad_v = attn[centre].unsqueeze(-1) * grad  # the centre term starts each sum: no zero-filled start
    for o, (at_q, at_k) in others:
        grad_attn[o][at_q] = torch.linalg.vecdot(grad[at_q], v[at_k])
        grad_v[at_k].addcmul_(attn[o][at_q].unsqueeze(-1), grad[at_q])
    # softmax backward over the offsets, then the logit scale
    grad_logits = attn * (grad_attn - (attn * grad_attn).sum(0)) * q.shape[-1] ** -0.5
    g = grad_logits[centre].unsqueeze(-1)
    grad_q, grad_k = g * k, g * q
    for o, (at_q, at_k) in others:
        g = grad_logits[o][at_q].unsqueeze(-1)
        grad_q[at_q].addcmul_(g, k[at_k])
        grad_k[at_k].addcmul_(g, q[at_q])
    return grad_q, grad_k, grad_v


def _as_maps(t: Tensor, geo: Geometry) -> Tensor:
    """(B, heads, H*W, d) -> (B, heads, H, W, d), a view if the layout allows (as split_heads makes it)."""
    b, h, _, d = t.shape
    return t.reshape(b, h, geo.height, geo.width, d)


def _forward(
    q: Tensor, k: Tensor, v: Tensor, geo: Geometry, dilations: tuple[int, ...], kernel: int
) -> tuple[Tensor, list[Tensor]]:
    """The output (B, heads, H*W, d) and, per rate group, (q, padded k, padded v, attention) for the backward."""
    q, k, v = (_as_maps(t, geo) for t in (q, k, v))
    out = torch.empty_like(q)  # keeps the head-interleaved layout of q: merging the heads is then a view
    saved = []
    for rate, heads in _head_groups(dilations):
        # contiguous q: vecdot over rows of d channels strided by the heads is twice as slow
        group_q = q[:, heads].contiguous()
        group_out, attn, padded_k, padded_v = _group_forward(group_q, k[:, heads], v[:, heads], geo, kernel, rate)
        out[:, heads] = group_out
        saved += [group_q, padded_k, padded_v, attn]
    return out.flatten(2, 3), saved


class _DilatedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, geo: Geometry, dilations: tuple[int, ...], kernel: int) -> Tensor:
        out, saved = _forward(q, k, v, geo, dilations, kernel)
        ctx.save_for_backward(*saved)
        ctx.geo, ctx.dilations, ctx.kernel = geo, dilations, kernel
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        grad_out = _as_maps(grad_out, ctx.geo)
        grads = [torch.empty_like(grad_out) for _ in range(3)]  # every head is written below
        saved = ctx.saved_tensors
        for i, (rate, heads) in enumerate(_head_groups(ctx.dilations)):
            group_saved = saved[4 * i : 4 * i + 4]
            group_grads = _group_backward(grad_out[:, heads].contiguous(), *group_saved, ctx.geo, ctx.kernel, rate)
            for full, part in zip(grads, group_grads):
                full[:, heads] = part
        return *(g.flatten(2, 3) for g in grads), None, None, None


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def fused_dilated_attention(q: Tensor, k: Tensor, v: Tensor, geo: Geometry, dilations: tuple[int, ...], kernel: int) -> Tensor:
    """:func:`dilated_attention` by the fused CPU kernel (which must be available: :func:`neighbourhood.available`)."""
    keys, head_table = neighbourhood.dilated_tables(geo.height, geo.width, kernel, tuple(dilations))
    return neighbourhood.neighbourhood_attention(q, k, v, keys, head_table)


def shift_multiply_attention(q: Tensor, k: Tensor, v: Tensor, geo: Geometry, dilations: tuple[int, ...], kernel: int) -> Tensor:
    """:func:`dilated_attention` in eager PyTorch ops (any device and dtype)."""
    if _needs_grad(q, k, v):
        return _DilatedAttention.apply(q, k, v, geo, dilations, kernel)
    # No gradient (inference, and fvcore's trace, which would see the Function as one opaque op):
    # the same forward, plain, keeping nothing for a backward.
    return _forward(q, k, v, geo, dilations, kernel)[0]


def masked_dense_attention(q: Tensor, k: Tensor, v: Tensor, geo: Geometry, dilations: tuple[int, ...], kernel: int) -> Tensor:
    """:func:`dilated_attention` as SDPA over every image key, masked to the dilated neighbourhoods (any device)."""
    return attend(q, k, v, attn_mask=_neighbourhood_mask(geo.height, geo.width, kernel, tuple(dilations), q.device))


@functools.cache
def _neighbourhood_mask(height: int, width: int, kernel: int, dilations: tuple[int, ...],
                        device: torch.device) -> Tensor:
    """(heads, N, N) bool: True where key m is in query n's neighbourhood at its head's rate."""
    keys, head_table = neighbourhood.dilated_tables(height, width, kernel, dilations)
    n = height * width
    with torch.inference_mode(False):  # cached: training may use a mask first made in an evaluation
        per_rate = torch.zeros(len(keys), n, n + 1, dtype=torch.bool)  # column n takes the "no key" slots (-1)
        per_rate.scatter_(2, keys.where(keys >= 0, n), True)
        return per_rate[head_table, :, :n].to(device)


def dilated_attention(q: Tensor, k: Tensor, v: Tensor, geo: Geometry, dilations: tuple[int, ...], kernel: int) -> Tensor:
    """q, k, v: (B, heads, H*W, d) image tokens; ``dilations`` has one rate per head.

    The fused CPU kernel where it runs (CPU floats, eager mode, built); masked dense SDPA on CUDA for small maps;
    shift and multiply elsewhere (CUDA on larger maps, fvcore's trace, ONNX export). Same outputs.
    """
    if neighbourhood.available(q, k, v):
        return fused_dilated_attention(q, k, v, geo, dilations, kernel)
    if q.is_cuda and geo.height * geo.width <= DENSE_MAX_TOKENS and not torch.jit.is_tracing():
        return masked_dense_attention(q, k, v, geo, dilations, kernel)
    return shift_multiply_attention(q, k, v, geo, dilations, kernel)
