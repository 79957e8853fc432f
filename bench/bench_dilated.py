"""Dilated attention: forward + backward wall-clock of nasloc's two implementations
(``nasloc.models.dilated``: the fused CPU kernel and the eager shift and multiply) vs the first unfold
implementation and vs global attention.

Per shape, four implementations get the same q, k, v (B, heads, H*W, d), laid out as the model makes them
(views of one (B, H*W, heads, d) tensor each) and the same output gradient:

* ``fused``: ``fused_dilated_attention``, the C++ kernel that ``dilated_attention`` takes on the CPU
  (kernel 3, one dilation rate per head);
* ``eager``: ``shift_multiply_attention``, what it takes elsewhere (CUDA, traces, exports);
* ``unfold``: the first implementation, copied below unchanged: neighbourhoods gathered with
  ``F.unfold``, then a batched (1 x d) @ (d x k*k) matmul per position;
* ``SDPA``: global attention over all H*W tokens, ``F.scaled_dot_product_attention`` (more MACs: H*W keys
  per query instead of k*k, but one fused kernel).

A step is forward + backward (into q, k, v). The implementations run interleaved (in a rotated order from
one repeat to the next) so that load from other jobs hits all alike; each time is the median over
``--repeats`` steps after ``--warmup`` steps. Before timing, fused, eager and unfold are checked to agree:
the largest absolute difference of the outputs and of the three input gradients from the fused kernel's is
printed. Ratios are speed-ups of the fused kernel (t_other / t_fused): above 1, it is faster.

    .venv/bin/python bench/bench_dilated.py
    .venv/bin/python bench/bench_dilated.py --repeats 5 --shapes cifar
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

import nasloc
from nasloc.models.dilated import fused_dilated_attention, shift_multiply_attention
from nasloc.models.layout import Geometry

KERNEL = 3


class Shape(NamedTuple):
    batch: int
    heads: int
    side: int
    head_dim: int
    rates: tuple[int, ...]


SHAPES = {
    "cifar": Shape(64, 3, 8, 32, (1, 2, 3)),
    "imagenet stage 1": Shape(8, 2, 56, 36, (1, 2)),
    "imagenet stage 2": Shape(8, 4, 28, 36, (1, 2, 3, 1)),
}


# ------------------------------------------------------- the first implementation (unfold), for reference only
def _old_neighbourhoods(t: Tensor, geo: Geometry, kernel: int, rate: int) -> Tensor:
    """(B, g, H*W, d) -> (B, g, H*W, k*k, d): the dilated kxk neighbourhood of every position."""
    b, g, n, d = t.shape
    feature_map = t.transpose(2, 3).reshape(b, g * d, geo.height, geo.width)
    cols = F.unfold(feature_map, kernel, dilation=rate, padding=rate * (kernel // 2))
    return cols.reshape(b, g, d, kernel * kernel, n).permute(0, 1, 4, 3, 2)


def _old_inside_mask(geo: Geometry, kernel: int, rate: int, device: torch.device) -> Tensor:
    """(H*W, k*k) bool: which neighbourhood positions fall inside the map."""
    ones = torch.ones(1, 1, geo.height, geo.width, device=device)
    cols = F.unfold(ones, kernel, dilation=rate, padding=rate * (kernel // 2))
    return cols[0].transpose(0, 1) > 0


def _old_dilated_group(q: Tensor, k: Tensor, v: Tensor, geo: Geometry, kernel: int, rate: int) -> Tensor:
    scale = q.shape[-1] ** -0.5
    keys = _old_neighbourhoods(k, geo, kernel, rate)  # B, g, N, kk, d
    values = _old_neighbourhoods(v, geo, kernel, rate)
    logits = (q.unsqueeze(-2) * scale) @ keys.transpose(-1, -2)  # B, g, N, 1, kk
    logits = logits.masked_fill(~_old_inside_mask(geo, kernel, rate, q.device)[:, None, :], float("-inf"))
    return (logits.softmax(-1) @ values).squeeze(-2)


def unfold_dilated_attention(q: Tensor, k: Tensor, v: Tensor, geo: Geometry, dilations: tuple[int, ...], kernel: int) -> Tensor:
    """The first ``nasloc.models.dilated.dilated_attention`` (unfold + batched matmul)."""
    outputs, order = [], []
    for rate in sorted(set(dilations)):
        heads = [h for h, r in enumerate(dilations) if r == rate]
        index = slice(heads[0], heads[-1] + 1) if heads == list(range(heads[0], heads[-1] + 1)) else heads
        outputs.append(_old_dilated_group(q[:, index], k[:, index], v[:, index], geo, kernel, rate))
        order += heads
    out = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
    if order != sorted(order):
        out = out[:, torch.tensor(order).argsort()]
    return out


# ------------------------------------------------------------------------------------------- timing
Attention = Callable[[Tensor, Tensor, Tensor], Tensor]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--repeats", type=int, default=10, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation first")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def implementations(shape: Shape) -> dict[str, Attention]:
    geo = Geometry(shape.side, shape.side, 0, 0)
    return {
        "fused": lambda q, k, v: fused_dilated_attention(q, k, v, geo, shape.rates, KERNEL),
        "eager": lambda q, k, v: shift_multiply_attention(q, k, v, geo, shape.rates, KERNEL),
        "unfold": lambda q, k, v: unfold_dilated_attention(q, k, v, geo, shape.rates, KERNEL),
        "SDPA": F.scaled_dot_product_attention,
    }


def inputs(shape: Shape) -> tuple[list[Tensor], Tensor]:
    """Leaf tensors (B, H*W, heads, d) for q, k, v, and the output gradient (B, heads, H*W, d)."""
    n = shape.side * shape.side
    leaves = [torch.randn(shape.batch, n, shape.heads, shape.head_dim, requires_grad=True) for _ in range(3)]
    return leaves, torch.randn(shape.batch, shape.heads, n, shape.head_dim)


def step(attention: Attention, leaves: list[Tensor], grad_out: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Forward + backward; returns the output and the gradients of q, k, v."""
    for leaf in leaves:
        leaf.grad = None
    out = attention(*(leaf.transpose(1, 2) for leaf in leaves))  # the model's split_heads layout
    out.backward(grad_out)
    return out.detach(), [leaf.grad for leaf in leaves]


def max_differences(impls: dict[str, Attention], leaves: list[Tensor], grad_out: Tensor) -> tuple[float, float]:
    """Largest |fused - other| over eager and unfold, of the output and of the q, k, v gradients."""
    fused_out, fused_grads = step(impls["fused"], leaves, grad_out)
    diff_out = diff_grad = 0.0
    for other in ("eager", "unfold"):
        out, grads = step(impls[other], leaves, grad_out)
        diff_out = max(diff_out, (fused_out - out).abs().max().item())
        diff_grad = max(diff_grad, *((a - b).abs().max().item() for a, b in zip(fused_grads, grads)))
    return diff_out, diff_grad


def median_ms(impls: dict[str, Attention], leaves: list[Tensor], grad_out: Tensor, repeats: int, warmup: int) -> dict[str, float]:
    names = list(impls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate who goes first
            start = time.perf_counter()
            step(impls[name], leaves, grad_out)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def macs(shape: Shape, keys_per_query: int) -> float:
    """Multiply-adds of the two products (q.k and attn.v), in millions."""
    return 2 * shape.batch * shape.heads * shape.side**2 * keys_per_query * shape.head_dim / 1e6


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, {platform.machine()}, {args.threads} threads, "
        f"load average {os.getloadavg()[0]:.1f}, kernel {KERNEL}, median of {args.repeats} interleaved steps after "
        f"{args.warmup} warm-up; nasloc from {os.path.dirname(nasloc.__file__)}\n"
    )
    print("| shape | B, heads, map, d, rates | MMACs dilated / global | fused (ms) | eager (ms) | unfold (ms) | SDPA (ms) "
          "| t_eager / t_fused | t_unfold / t_fused | t_SDPA / t_fused | max abs diff out | max abs diff grad |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.shapes:
        shape = SHAPES[name]
        impls = implementations(shape)
        leaves, grad_out = inputs(shape)
        diff_out, diff_grad = max_differences(impls, leaves, grad_out)
        ms = median_ms(impls, leaves, grad_out, args.repeats, args.warmup)
        config = f"{shape.batch}, {shape.heads}, {shape.side}x{shape.side}, {shape.head_dim}, {shape.rates}"
        print(
            f"| {name} | {config} | {macs(shape, KERNEL**2):.0f} / {macs(shape, shape.side**2):.0f} "
            f"| {ms['fused']:.1f} | {ms['eager']:.1f} | {ms['unfold']:.1f} | {ms['SDPA']:.1f} "
            f"| **{ms['eager'] / ms['fused']:.2f}x** | {ms['unfold'] / ms['fused']:.2f}x | {ms['SDPA'] / ms['fused']:.2f}x "
            f"| {diff_out:.1e} | {diff_grad:.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
