"""Training throughput of standalone nasloc subnets vs timm's VisionTransformer of similar MACs (issue 5).

Two pairs from ``search_spaces/cifar.yaml`` at its deploy resolution (32 px, 4x4 patches, class token):

1. ``plain ViT``: ``reference_archs(space, budget)["plain ViT"]`` (global attention only, no locality
   branch) built as ``nasloc.LocalityViT`` vs a timm ``VisionTransformer`` with the same width, depth, heads
   and MLP ratio: the same network, so the ratio is the cost of nasloc's implementation (elastic layers).
2. ``searched``: a seeded random arch with MACs in [band_lo, budget] (mixed global/dilated/window mixers,
   LIFE, FFN convs, shortcuts, global tokens: what a search returns) vs the timm ViT with the same depth,
   heads and MLP ratio whose width gives the closest MACs.

Both models of a pair run the same loop: AdamW, cross-entropy, one fixed random batch of ``--batch``
images (data loading is not measured), steps interleaved A, B, A, B, ... so that load on the machine hits
both alike; img/s is the median over ``--steps`` steps after ``--warmup`` steps. MACs are fvcore's
(one multiply-add = one FLOP, per image at 32 px, attention matmuls included).

    .venv/bin/python bench/bench_throughput.py --steps 20
    .venv/bin/python bench/bench_throughput.py --steps 10 --threads 1 --append results/benchmarks.md

On a machine loaded by other jobs use ``--threads 1``: two threads per process then thrash (5-10x slower).
"""
from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from nasloc import LocalityViT
from nasloc.arch import Arch, Block, Stage
from nasloc.deploy.macs import fvcore_macs
from nasloc.space.flops import count
from nasloc.space.search_space import SearchSpace
from nasloc.space.seed_designs import reference_archs

ROOT = Path(__file__).resolve().parent.parent
HEADING = "## Training throughput vs timm ViT (issue 5)"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", default="cifar")
    p.add_argument("--budget", type=float, default=0.1e9, help="MACs per image at the space's resolution")
    p.add_argument("--band-lo", type=float, default=0.08e9, help="lower MACs bound of the searched-looking arch")
    p.add_argument("--seed", type=int, default=0, help="picks the searched-looking arch and the weights")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--pairs", nargs="+", default=["plain", "searched"], choices=["plain", "searched"])
    p.add_argument("--append", type=Path, default=None, help="append a markdown section to this file")
    return p.parse_args()


def plain_arch(like: Arch, dim: int, heads: int, mlp_ratio: float, depth: int) -> Arch:
    """A global-attention-only arch in the skeleton of ``like``: the network timm's ViT builds (its stem is a
    patch embedding, its position embedding absolute, its head the class token, whatever ``like`` has)."""
    stage = Stage(dim=dim, heads=heads, mlp_ratio=mlp_ratio, blocks=(Block(),) * depth)
    return replace(like, stages=(stage,), shortcuts=(), global_tokens=0, cpe=False, ffn="mlp", stem="patch",
                   pos_embed="absolute", head="token")


def timm_twin(arch: Arch) -> VisionTransformer:
    """timm's ViT with the width, depth, heads and MLP ratio of a one-stage plain arch."""
    stage = arch.stages[0]
    return VisionTransformer(
        img_size=arch.img_size, patch_size=arch.patch_size, in_chans=arch.in_chans, num_classes=arch.num_classes,
        embed_dim=stage.dim, depth=stage.depth, num_heads=stage.heads, mlp_ratio=stage.mlp_ratio,
        qkv_bias=arch.qkv_bias, class_token=arch.cls_token, global_pool="token",
    )


def matched_plain(arch: Arch) -> Arch:
    """The plain arch with ``arch``'s depth, heads and MLP ratio whose width gives the closest MACs."""
    stage = arch.stages[0]
    target = count(arch).macs
    widths = range(stage.heads * 4, 8 * stage.dim + 1, stage.heads)  # head dim >= 4, any multiple of heads
    candidates = [plain_arch(arch, d, stage.heads, stage.mlp_ratio, arch.depth) for d in widths]
    return min(candidates, key=lambda a: abs(count(a).macs - target))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    start = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss {loss.item()} in the benchmark loop")
    return time.perf_counter() - start


def race(models: dict[str, nn.Module], batch: int, steps: int, warmup: int, img_size: int, seed: int) -> dict[str, list[float]]:
    """Interleaved training steps; returns each model's img/s per timed step."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, img_size, img_size, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.05) for name, m in models.items()}
    for m in models.values():
        m.train()
    rates: dict[str, list[float]] = {name: [] for name in models}
    for step in range(warmup + steps):
        order = list(models) if step % 2 == 0 else list(reversed(models))  # neither always goes first
        for name in order:
            seconds = train_step(models[name], optimizers[name], x, y)
            if step >= warmup:
                rates[name].append(batch / seconds)
    return rates


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    space = SearchSpace.load(args.space)
    pairs: list[tuple[str, Arch, Arch]] = []
    if "plain" in args.pairs:
        ref = reference_archs(space, args.budget)["plain ViT"]
        pairs.append(("plain ViT (reference)", ref, ref))
    if "searched" in args.pairs:
        arch = space.sample_in_band(random.Random(args.seed), args.band_lo, args.budget)
        pairs.append((f"searched-looking (seed {args.seed})", arch, matched_plain(arch)))

    header = (f"torch {torch.__version__}, {platform.machine()}, {args.threads} threads, batch {args.batch}, "
              f"{space.img_size} px, {args.steps} timed steps "
              f"after {args.warmup} warm-up, interleaved")
    print(header, flush=True)
    rows = []
    for label, arch, twin in pairs:
        torch.manual_seed(args.seed)
        ours = LocalityViT(arch)
        theirs = timm_twin(twin)
        macs = {"nasloc": fvcore_macs(ours, arch.img_size), "timm": fvcore_macs(theirs, arch.img_size)}
        params = {"nasloc": sum(p.numel() for p in ours.parameters()), "timm": sum(p.numel() for p in theirs.parameters())}
        print(f"\n{label}: nasloc {arch.describe()}", flush=True)
        print(f"  timm VisionTransformer(embed_dim={twin.stages[0].dim}, depth={twin.depth}, "
              f"num_heads={twin.stages[0].heads}, mlp_ratio={twin.stages[0].mlp_ratio})", flush=True)
        started = time.time()
        rates = race({"nasloc": ours, "timm": theirs}, args.batch, args.steps, args.warmup, arch.img_size, args.seed)
        median = {k: statistics.median(v) for k, v in rates.items()}
        ratio = median["nasloc"] / median["timm"]
        for k in ("nasloc", "timm"):
            print(f"  {k:6s} {median[k]:7.1f} img/s (median; min {min(rates[k]):.1f}, max {max(rates[k]):.1f})  "
                  f"{macs[k] / 1e6:7.2f} MMACs  {params[k] / 1e6:.2f} M params", flush=True)
        print(f"  ratio nasloc/timm = {ratio:.3f}   ({time.time() - started:.0f} s)", flush=True)
        rows.append((label, arch.describe(), twin, macs, params, median, rates, ratio))

    if args.append:
        append_markdown(args, header, rows)
    return 0


def append_markdown(args: argparse.Namespace, header: str, rows: list) -> None:
    command = "cd /work/main && .venv/bin/python bench/bench_throughput.py " + " ".join(sys.argv[1:])
    lines = [
        "", HEADING, "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} on a shared 2-core CPU machine under load from other jobs "
        f"(absolute img/s are low and noisy; interleaving keeps the ratio fair). {header}.",
        "MACs: fvcore, one multiply-add = one FLOP, per image at 32 px.", "",
        "    " + command, "",
        "| pair | model | MMACs | params (M) | img/s (median) | min-max img/s | nasloc / timm |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, desc, twin, macs, params, median, rates, ratio in rows:
        stage = twin.stages[0]
        lines.append(f"| {label} | nasloc LocalityViT: {desc} | {macs['nasloc'] / 1e6:.2f} | {params['nasloc'] / 1e6:.2f} "
                     f"| {median['nasloc']:.1f} | {min(rates['nasloc']):.1f}-{max(rates['nasloc']):.1f} | **{ratio:.2f}** |")
        lines.append(f"| | timm VisionTransformer(embed_dim={stage.dim}, depth={stage.depth}, num_heads={stage.heads}, "
                     f"mlp_ratio={stage.mlp_ratio}) | {macs['timm'] / 1e6:.2f} | {params['timm'] / 1e6:.2f} "
                     f"| {median['timm']:.1f} | {min(rates['timm']):.1f}-{max(rates['timm']):.1f} | |")
    path = args.append if args.append.is_absolute() else ROOT / args.append
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text("# Benchmarks\n\nMeasured numbers of the scripts in `bench/`; each section names its command.\n")
    with path.open("a") as f:  # append only: other sections belong to other benchmarks
        f.write("\n".join(lines) + "\n")
    print(f"\nappended to {path}")


if __name__ == "__main__":
    sys.exit(main())
