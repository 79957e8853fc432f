"""nasloc's seed presets vs the official code of their seeds, and locality-heavy CIFAR archs vs timm ViTs
(issue 19). Ratios of img/s measured in one process, the models' steps interleaved.

Two sections:

* ``imagenet``: each preset whose seed's official model file is given (``--official-dir NAME=PATH``)
  against that official model, with timm's ``deit_tiny_patch16_224`` as the common yardstick; eval
  (``torch.inference_mode``) and train (forward, backward, AdamW step) img/s at ``--batch`` 8, 224 px.
* ``cifar``: at 32 px and ``--cifar-batch`` 128, in training, the per-mechanism reference archs of
  ``search_spaces/cifar.yaml`` (``nasloc.space.seed_designs.reference_archs`` at ``--cifar-budget``) and one arch
  using every mechanism, each against the timm ``VisionTransformer`` of equal MACs (same depth, heads
  and MLP ratio, width chosen for the closest MACs; ``bench_throughput.matched_plain``).

The official code is never part of nasloc: get it into a scratch folder outside the repository and name
the file (or a checkout holding it at its usual place), e.g.

    mkdir -p /tmp/official/lightvit /tmp/official/dilateformer
    git --git-dir=<mirror of hunto/image_classification_sota> show HEAD:lib/models/lightvit.py > /tmp/official/lightvit/lightvit.py
    git --git-dir=<mirror of JIAOJIAYUASD/dilateformer> show HEAD:models/dilateformer.py > /tmp/official/dilateformer/dilateformer.py
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_official.py \\
        --official-dir lightvit=/tmp/official/lightvit --official-dir dilateformer=/tmp/official/dilateformer

A seed whose path is not given is skipped (its preset is still timed against DeiT-Ti). The official model
file is loaded with importlib and run as it is, with one exception: DilateFormer's attention writes its
outputs in place into a view of its input, which the qkv conv saved for its backward, so its training
step fails on this torch ("modified by an inplace operation", the repo's issues #2/#12/#13); for training
the bench gives that conv a copy of its input (the community fix), an extra copy the official model pays.

Seeds with no runnable official code here: the DW shortcut's ``models/vit.py`` needs einops (not
installed), LIFE's ``deit.py`` imports ``_init_vit_weights`` (gone from timm 1.0) and LocalViT's
``LocalVisionTransformer`` passes timm 0.3's positional arguments to timm 1.0's ``VisionTransformer``.

Timing: steps run model after model, the order rotated each round; a ratio is the median over ``--steps``
rounds (after ``--warmup``) of the ratio within each round, which cancels most of the bursts of load from
other jobs; ms per step are plain medians. One thread by default. ``--clock cpu`` times steps by the process's
CPU time instead of the wall clock: beside other jobs on a shared machine a one-thread step also waits for a
core (a third of its wall time beside two busy one-thread jobs on 2 cores), and that wait is noise.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import nasloc
from nasloc.arch import Arch, Block, Shortcut, Stage
from nasloc.cli.model_spec import resolve_model
from nasloc.deploy.macs import fvcore_macs
from nasloc.errors import NaslocError
from nasloc.models.presets import PRESETS
from nasloc.space.flops import count
from nasloc.space.search_space import SearchSpace
from nasloc.space.seed_designs import reference_archs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_throughput import matched_plain, timm_twin  # noqa: E402  (a sibling script, not a package)

YARDSTICK = "deit_tiny_patch16_224"


@dataclass(frozen=True)
class Official:
    """Where a seed's official model file lies in its checkout, and its entry point per preset."""

    files: tuple[str, ...]  # relative paths tried inside the given folder
    entry_points: dict[str, str]  # nasloc preset -> official function
    train_fix: Callable[[nn.Module], None] | None = None


def _copy_qkv_input(model: nn.Module) -> None:
    """DilateFormer's community fix: the qkv conv of every MSDA gets a copy of its input."""
    for module in model.modules():
        if type(module).__name__ == "MultiDilatelocalAttention":
            module.qkv = _CopiedInput(module.qkv)


class _CopiedInput(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x.clone())


OFFICIAL = {
    "lightvit": Official(
        ("lightvit.py", "lib/models/lightvit.py", "classification/lib/models/lightvit.py"),
        {"nasloc_lightvit_tiny": "lightvit_tiny", "nasloc_lightvit_small": "lightvit_small"},
    ),
    "dilateformer": Official(
        ("dilateformer.py", "models/dilateformer.py"),
        {"nasloc_dilateformer_tiny": "dilateformer_tiny", "nasloc_dilateformer_small": "dilateformer_small"},
        train_fix=_copy_qkv_input,
    ),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official-dir", action="append", default=[], metavar="NAME=PATH",
                   help=f"a seed's official model file or checkout; NAME in {sorted(OFFICIAL)}")
    p.add_argument("--presets", nargs="+", default=["nasloc_lightvit_tiny", "nasloc_dilateformer_tiny"],
                   choices=sorted(PRESETS))
    p.add_argument("--sections", nargs="+", default=["imagenet", "cifar"], choices=["imagenet", "cifar"])
    p.add_argument("--modes", nargs="+", default=["eval", "train"], choices=["eval", "train"],
                   help="imagenet section only; the cifar section times training")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cifar-batch", type=int, default=128)
    p.add_argument("--cifar-budget", type=float, default=0.03e9, help="MACs of the CIFAR reference archs")
    p.add_argument("--cifar-archs", nargs="+", default=None,
                   help="reference-arch names and/or 'every mechanism' (default: all but the plain ViT)")
    p.add_argument("--cifar-models", nargs="+", default=[], metavar="M",
                   help="more CIFAR archs to time, anything nasloc train --model takes that has an arch (an arch "
                        "file, an export folder such as results/evidence/exports/nasloc_nsga2, RUN:TRIAL)")
    p.add_argument("--steps", type=int, default=5, help="timed rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time, which leaves out the time spent waiting "
                        "for a core while other jobs run (a fair ratio at --threads 1 on a shared machine)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


# ------------------------------------------------------------------------------------ models
def load_official(name: str, path: Path) -> ModuleType:
    """Import a seed's official model file (a file, or a checkout where it lies at a known place)."""
    candidates = [path] if path.is_file() else [path / f for f in OFFICIAL[name].files]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise FileNotFoundError(f"{name}: none of {[str(c) for c in candidates]} exists")
    spec = importlib.util.spec_from_file_location(f"official_{name}", found)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its classes look their module up there
    spec.loader.exec_module(module)
    return module


def official_dirs(pairs: list[str]) -> dict[str, Path]:
    dirs = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or name not in OFFICIAL:
            raise SystemExit(f"--official-dir {pair!r}: expected NAME=PATH with NAME in {sorted(OFFICIAL)}")
        dirs[name] = Path(path).expanduser()
    return dirs


def every_mechanism_arch(space: SearchSpace) -> Arch:
    """One CIFAR arch using every mechanism: window (global tokens, BiDim FFN), dilated and global mixers,
    LIFE, FFN convs, CPE, the conv stem and two shortcuts (one of span 2 with two kernels)."""
    blocks = (
        Block(mixer="window", life=True, ffn_kernel=3),
        Block(mixer="dilated", dilations=(1, 2, 3), ffn_kernel=5),
        Block(mixer="global", life=True),
        Block(mixer="window", ffn_kernel=3),
        Block(mixer="dilated", dilations=(3, 2, 1), life=True),
    )
    return Arch(**{
        **space.skeleton, "stages": (Stage(96, 3, 2, blocks),), "stem": "conv", "cpe": True, "global_tokens": 4,
        "ffn": "bidim", "shortcuts": (Shortcut(0, 2, (3, 5)), Shortcut(3, 1, (7,))),
    })


# ------------------------------------------------------------------------------------ timing
Step = Callable[[], None]


def eval_step(model: nn.Module, x: Tensor) -> Step:
    model.eval()

    def run() -> None:
        with torch.inference_mode():
            model(x)

    return run


def train_step(model: nn.Module, x: Tensor, y: Tensor) -> Step:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def run() -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return run


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def race(steps: dict[str, Step], rounds: int, warmup: int, clock: str = "wall") -> dict[str, list[float]]:
    """Seconds per step of each model in every timed round, the models interleaved (order rotated every
    round, so that no model always runs first or after the same one), by the ``clock`` of :data:`CLOCKS`."""
    now = CLOCKS[clock]
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = now()
            steps[name]()
            if r >= warmup:
                times[name].append(now() - start)
    return times


def speed_ratio(times: dict[str, list[float]], fast: str, slow: str) -> float:
    """img/s of ``fast`` over img/s of ``slow``: the median over rounds of the ratio within each round.

    Load from other jobs comes in bursts of seconds; steps of one round run back to back, so the ratio
    within a round cancels most of it, where a ratio of two medians would not."""
    return statistics.median(s / f for f, s in zip(times[fast], times[slow]))


def median_ms(times: dict[str, list[float]], name: str) -> str:
    return f"{1e3 * statistics.median(times[name]):.0f}" if name in times else "-"


# ------------------------------------------------------------------------------------ sections
def imagenet_section(args: argparse.Namespace, dirs: dict[str, Path]) -> None:
    modules: dict[str, ModuleType] = {}
    for name, path in dirs.items():
        try:
            modules[name] = load_official(name, path)
        except Exception as error:  # an official file that does not import here: say why, go on
            print(f"official {name}: skipped ({type(error).__name__}: {error})", flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, 224, 224, generator=gen)
    y = torch.randint(0, 1000, (args.batch,), generator=gen)
    print(f"\n## {args.batch} images of 224 px; ratios of img/s (above 1: the first is faster)\n")
    print("| preset | mode | nasloc / official | nasloc / DeiT-Ti | official / DeiT-Ti | ms per step nasloc, official, DeiT-Ti |")
    print("|---|---|---|---|---|---|")
    for preset in args.presets:
        seed = next((s for s, o in OFFICIAL.items() if preset in o.entry_points), None)
        for mode in args.modes:
            torch.manual_seed(args.seed)
            models = {"nasloc": timm.create_model(preset), "deit": timm.create_model(YARDSTICK)}
            if seed in modules:
                models["official"] = getattr(modules[seed], OFFICIAL[seed].entry_points[preset])()
                if mode == "train" and OFFICIAL[seed].train_fix:
                    OFFICIAL[seed].train_fix(models["official"])
            steps = {n: eval_step(m, x) if mode == "eval" else train_step(m, x, y) for n, m in models.items()}
            t = race(steps, args.steps, args.warmup, args.clock)
            has_official = "official" in t
            vs_official = f"**{speed_ratio(t, 'nasloc', 'official'):.2f}**" if has_official else "(no official code given)"
            official_deit = f"{speed_ratio(t, 'official', 'deit'):.2f}" if has_official else "-"
            ms = ", ".join(median_ms(t, n) for n in ("nasloc", "official", "deit"))
            print(f"| {preset} | {mode} | {vs_official} | {speed_ratio(t, 'nasloc', 'deit'):.2f} | {official_deit} | {ms} |",
                  flush=True)


def model_arch(text: str, option: str, names: Sequence[str] = ()) -> tuple[str, Arch]:
    """The name and arch of a model that ``nasloc train --model`` takes (an arch JSON, an export or run folder);
    exits with one line when ``text`` names none (saying which ``names`` the option also takes), or names a
    timm model (which has no nasloc arch)."""
    try:
        spec = resolve_model(text, with_weights=False)
    except NaslocError as error:
        also = f"; {option} also takes {', '.join(repr(n) for n in names)}" if names else ""
        raise SystemExit(f"{Path(sys.argv[0]).name}: {option} {text}: {error}{also}") from None
    if spec.arch is None:
        raise SystemExit(f"{Path(sys.argv[0]).name}: {option} {text}: a timm model has no nasloc arch")
    return spec.name, spec.arch


def cifar_section(args: argparse.Namespace) -> None:
    space = SearchSpace.load("cifar")
    archs = {k: a for k, a in reference_archs(space, args.cifar_budget).items() if k != "plain ViT"}
    archs["every mechanism"] = every_mechanism_arch(space)
    if args.cifar_archs or args.cifar_models:
        archs = {k: archs[k] for k in args.cifar_archs or []}
    for text in args.cifar_models:
        archs.update([model_arch(text, "--cifar-models")])
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.cifar_batch, 3, space.img_size, space.img_size, generator=gen)
    y = torch.randint(0, 10, (args.cifar_batch,), generator=gen)
    print(f"\n## CIFAR scale, training, {args.cifar_batch} images of {space.img_size} px; "
          "MMACs per image: nasloc's analytic (= fvcore), the timm model's by fvcore\n")
    print("| arch | nasloc arch | MMACs nasloc / timm | nasloc / timm ViT (train img/s) | ms per step nasloc, timm |")
    print("|---|---|---|---|---|")
    for label, arch in archs.items():
        twin = matched_plain(arch)
        torch.manual_seed(args.seed)
        models = {"nasloc": nasloc.LocalityViT(arch), "timm": timm_twin(twin)}
        timm_macs = fvcore_macs(models["timm"], space.img_size)  # what timm built, not what the twin arch says
        t = race({n: train_step(m, x, y) for n, m in models.items()}, args.steps, args.warmup, args.clock)
        print(f"| {label} | {arch.describe()} | {count(arch).macs / 1e6:.1f} / {timm_macs / 1e6:.1f} "
              f"| **{speed_ratio(t, 'nasloc', 'timm'):.2f}** | {median_ms(t, 'nasloc')}, {median_ms(t, 'timm')} |",
              flush=True)


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    dirs = official_dirs(args.official_dir)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, timm {timm.__version__}, "
          f"{platform.machine()}, {args.threads} thread(s), load average {os.getloadavg()[0]:.1f}, {args.clock} clock; median of "
          f"{args.steps} interleaved rounds after {args.warmup} warm-up", flush=True)
    if "imagenet" in args.sections:
        imagenet_section(args, dirs)
    if "cifar" in args.sections:
        cifar_section(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
