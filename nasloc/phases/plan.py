"""What a run will do and cost, before it does it: ``--dry-run`` prints it, every run prints it first, and
``summary.md`` holds it against what the phases took.

The estimates come from timing a few steps of the MACs band's largest and smallest archs on the run's device
(a training step at the proxy size, a forward pass at the proxy size, a training step at the retrain size), each
at a small batch and scaled to the run's batch, then multiplied by the steps each phase takes: the supernet's
sandwich (the largest, the smallest and random archs of the band per step), the search's evaluations (a forward
pass over the search's half of the validation split per trial), the selection's rungs (halving from the
candidates), the retrain of ``--retrain-top-k`` finalists (a tie may add more) and the export. Processes divide
the work they share (``--workers``, Ray trials; torchrun the supernet's). The memory is the peak of those steps,
scaled to the run's batch the same way.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from ..models import LocalityViT
from ..run import RunRecord
from ..selection.halving import rung_epochs, tie_margin
from ..space.band import supernet_bands
from ..space.search_space import SearchSpace
from ..space.seed_designs import MECHANISMS
from ..supernet.train import SupernetConfig
from ..training.data import DataSplits
from ..training.distributed import resolve_device
from ..units import format_macs
from .retrain import run_recipe

TIMING_BATCH = 32  # images of the largest timed step: seconds of timing on a GPU, a minute or two at 224 px on a CPU
EXPORT_SECONDS = 5.0  # writing the export folder: about constant


@dataclass
class PhasePlan:
    name: str
    epochs: int  # the search's: its trials
    images: int  # per epoch (the search's: per trial)
    est_seconds: float
    note: str = ""


@dataclass
class Plan:
    device: str
    processes: int
    proxy_img_size: int
    retrain_img_size: int
    band_macs: tuple[float, float]
    phases: list[PhasePlan]
    peak_memory_gb: float
    available_memory_gb: float | None
    warnings: list[str] = field(default_factory=list)

    @property
    def est_seconds(self) -> float:
        return sum(p.est_seconds for p in self.phases)

    def by_phase(self) -> dict[str, float]:
        """Estimated seconds by phase name."""
        return {p.name: p.est_seconds for p in self.phases}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        lo, hi = self.band_macs
        out = [f"[nasloc] plan: {self.device}, {self.processes} process{'es' * (self.processes > 1)}; proxy "
               f"{self.proxy_img_size} px, retrain {self.retrain_img_size} px; band {format_macs(lo)} - "
               f"{format_macs(hi)}; peak memory about {self.peak_memory_gb:.1f} GB"]
        for p in self.phases:
            unit = "trials" if p.name == "search" else "epochs"
            line = f"[nasloc]   {p.name:<9} {p.epochs:>4} {unit:<6} x {p.images:>7} images  ~{_duration(p.est_seconds)}"
            out.append(line + (f"  ({p.note})" if p.note else ""))
        out.append(f"[nasloc]   all       ~{_duration(self.est_seconds)}")
        return out + [f"[nasloc] warning: {w}" for w in self.warnings]


class PhaseTimes:
    """The seconds each phase of a run took: ``with times("search"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        started = time.time()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.time() - started  # a family: every budget


def make_plan(record: RunRecord, space: SearchSpace, splits: DataSplits) -> Plan:
    """The plan of the run ``record`` describes, timed on its device (see the module)."""
    options = record.options
    device = resolve_device(options.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    workers = options.workers
    members = len(options.members())  # a family searches, selects and retrains once per budget
    band, _ = supernet_bands(space, [member.budget for _, member in options.members()])
    largest = space.extreme(largest=True, lo=band.lo, hi=band.hi).replace(img_size=options.proxy_img_size)
    smallest = space.extreme(largest=False, lo=band.lo, hi=band.hi).replace(img_size=options.proxy_img_size)
    retrain = run_recipe(options, len(splits.train))
    timed = {name: _time(arch, device, options.batch_size) for name, arch in (("largest", largest),
                                                                            ("smallest", smallest))}
    for name, arch in (("largest", largest), ("smallest", smallest)):  # the same archs at the retrain's size
        same = options.retrain_img_size == options.proxy_img_size and retrain.batch_size == options.batch_size
        timed[f"{name} at retrain size"] = timed[name] if same else _time(
            arch.replace(img_size=options.retrain_img_size), device, retrain.batch_size)
    train_step = {k: v["train_step_s"] for k, v in timed.items()}
    mean_step = (train_step["largest"] + train_step["smallest"]) / 2
    forward_image = (timed["largest"]["forward_image_s"] + timed["smallest"]["forward_image_s"]) / 2
    train_images, val_images = len(splits.train), len(splits.val)

    supernet_cfg = SupernetConfig()
    sandwich = train_step["largest"] + train_step["smallest"] + supernet_cfg.random_subnets * mean_step
    supernet_steps = math.ceil(train_images / (options.batch_size * world))
    phases = [PhasePlan("supernet", options.supernet_epochs, train_images,
                        options.supernet_epochs * supernet_steps * sandwich * 1.1)]  # + its checkpoints, eval
    search_half = val_images // 2
    per_trial = forward_image * (search_half + 4 * min(256, train_images))  # + BatchNorm recalibration batches
    phases.append(PhasePlan("search", options.trials, search_half, options.trials * per_trial / workers,
                            "images per trial, and 4 batches to recalibrate BatchNorm"))
    selection = _selection(options, train_images, val_images, mean_step, forward_image, workers)
    if selection is not None:
        phases.append(selection)
    finalists = options.retrain_top_k
    retrain_step = (train_step["largest at retrain size"] + train_step["smallest at retrain size"]) / 2
    retrain_steps = math.ceil(train_images / retrain.batch_size)
    tie = _tie_note(options, val_images)
    phases += [PhasePlan("retrain", options.retrain_epochs, train_images,
                         finalists * options.retrain_epochs * retrain_steps * retrain_step * 1.05,
                         f"{finalists} finalist{'s' * (finalists != 1)}, {tie}"),
               PhasePlan("export", 0, 0, EXPORT_SECONDS if finalists else 0.0)]
    if members > 1:
        phases[1:] = [replace(p, est_seconds=p.est_seconds * members,
                              note=f"{p.note}{'; ' if p.note else ''}x {members} budgets") for p in phases[1:]]

    peak = max(v["memory_gb"] for v in timed.values())
    available = _available_memory_gb(device)
    warnings = _wide_tie_warning(options, val_images)
    if available is not None and peak > 0.9 * available:
        fits = max(1, int(options.batch_size * 0.8 * available / peak))
        warnings.append(f"the steps would take about {peak:.1f} GB of the {available:.1f} GB available on "
                        f"{device.type}: use --batch-size {fits} or less")
    return Plan(str(device), max(workers, world), options.proxy_img_size, options.retrain_img_size,
                (band.lo, band.hi), phases, peak, available, warnings)


def _cohorts(options: Any) -> list[int]:
    """The selection candidates trained at each rung: the search's best and the seed designs, halved per rung."""
    alive = [options.select_top_k + len(MECHANISMS)]
    for _ in rung_epochs(options.select_epochs)[1:]:
        alive.append(math.ceil(alive[-1] / 2))
    return alive


def _last_rung(options: Any) -> int:
    """How many selection candidates reach the last rung: the most a tie there can send to the retrain."""
    return _cohorts(options)[-1]


def _selecting_with_ties(options: Any, val_images: int) -> bool:
    # tse scores the training loss: no held-out set, no ties
    return bool(options.select_top_k and options.retrain_top_k and val_images) and options.select_score != "tse"


def _tie_note(options: Any, val_images: int) -> str:
    if not _selecting_with_ties(options, val_images):
        return "no ties (no selection, or --select-score tse)"
    return (f"up to {max(options.retrain_top_k, _last_rung(options))} if the selection's last rung ties: scores "
            f"within {tie_margin(val_images):.1f} points on {val_images} held-out images")


# Above this margin (points at 50 % top-1; under 90 held-out images) the last rung mostly ties.
WIDE_TIE_POINTS = 15.0


def _wide_tie_warning(options: Any, val_images: int) -> list[str]:
    """A warning when the held-out set is too small to tell the last rung's candidates apart."""
    last = _last_rung(options)
    if not _selecting_with_ties(options, val_images) or tie_margin(val_images) <= WIDE_TIE_POINTS \
            or last <= options.retrain_top_k:
        return []
    return [f"the {val_images} validation images tie selection scores within {tie_margin(val_images):.0f} points: "
            f"expect most of the last rung's {last} candidates to be retrained, not --retrain-top-k "
            f"{options.retrain_top_k} (the retrain estimate counts {options.retrain_top_k}); more images narrow the tie"]


def _selection(options: Any, train_images: int, held_out: int, step_s: float, forward_image_s: float,
               workers: int) -> PhasePlan | None:
    if not options.select_top_k:
        return None
    rungs, cohorts = rung_epochs(options.select_epochs), _cohorts(options)
    epoch_s = math.ceil(train_images / options.batch_size) * step_s + held_out * forward_image_s
    complete = options.select_score == "complete"  # each rung trains afresh; else it resumes the rung before
    total = sum(alive * (epochs if complete else epochs - before) * epoch_s
                for alive, epochs, before in zip(cohorts, rungs, [0, *rungs[:-1]]))
    return PhasePlan("selection", rungs[-1], train_images, total / workers,
                     f"{cohorts[0]} candidates at most, rungs {','.join(map(str, rungs))}")


def _time(arch: Any, device: torch.device, batch: int, forward_batch: int = 256) -> dict[str, float]:
    """Seconds of a training step at ``batch`` images and of a forward pass per image at ``forward_batch``, and
    the step's peak memory in GB. A batch of at most :data:`TIMING_BATCH` images is timed as it is, a larger one
    at :data:`TIMING_BATCH` images and scaled."""
    model = LocalityViT(arch).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    base = _memory_gb(device)

    def step(images: int) -> float:
        x, y = _batch(arch, images, device)

        def work() -> None:
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model.train()(x), y).backward()
            optimizer.step()
        return _seconds(work, device)

    def infer(images: int) -> float:
        x, _ = _batch(arch, images, device)

        def work() -> None:
            with torch.no_grad():
                model.eval()(x)
        return _seconds(work, device)

    train, used = _extrapolated(step, batch), _memory_gb(device) - base
    forward = _extrapolated(infer, forward_batch) / forward_batch
    return dict(train_step_s=train, forward_image_s=forward, memory_gb=base + used * max(1.0, batch / TIMING_BATCH))


def _extrapolated(seconds: Any, images: int) -> float:
    """``seconds(images)``, measured where ``images`` is at most :data:`TIMING_BATCH`, else scaled from that many
    (by then a step's fixed cost is small; a line through two small batches amplified the noise of a busy CPU)."""
    if images <= TIMING_BATCH:
        return seconds(images)
    return seconds(TIMING_BATCH) * images / TIMING_BATCH


def _batch(arch: Any, images: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(images, arch.in_chans, arch.img_size, arch.img_size, device=device)
    return x, torch.randint(0, max(arch.num_classes, 1), (images,), device=device)


def _seconds(work: Any, device: torch.device, repeats: int = 2) -> float:
    """The fastest of ``repeats`` runs of ``work`` after one to warm up (the fastest: other jobs only add)."""
    work()
    times = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        work()
        _sync(device)
        times.append(time.perf_counter() - started)
    return min(times)


def _memory_gb(device: torch.device) -> float:
    """The process's peak memory so far on ``device`` (GPU memory on CUDA, resident memory on the CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # kilobytes on Linux


def _available_memory_gb(device: torch.device) -> float | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free / 1e9
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024 / 1e9
    except (OSError, KeyError, ValueError):  # not Linux
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
