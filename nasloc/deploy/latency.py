"""Latency on the user's own device: a lookup table of measured parts, summed, plus a fitted constant.

Every distinct part of the archs of a space (:mod:`nasloc.deploy.latency_parts`: stem, block halves at their token
map, downsampling, shortcuts, head) is timed once on the target device, with torch eager under
``torch.inference_mode`` or with ONNX Runtime on the CPU. An arch's latency is the sum of its parts plus a
constant fitted against a few end-to-end measurements (what the parts miss: the Python loop over the blocks,
caches warmed by the previous part), in microseconds. The constant is the median gap between measured and
summed times, the least-absolute-deviations fit: on a shared machine one measurement taken while another
process ran would move a least-squares (mean) constant by its whole excess.

The table is a JSON file per target, keyed by the device's name, torch/timm/onnxruntime versions, a hash of
nasloc's model code (a faster block is timed again), threads, backend, batch size and resolution, under
``~/.cache/nasloc/latency/`` (or ``$NASLOC_LATENCY_DIR``), written atomically. The first use for a space measures its parts with a progress bar; later ones reuse them and
measure nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from ..arch import Arch
from ..errors import NaslocError
from ..fileio import write_atomic
from ..models import native
from ..space.search_space import SearchSpace
from .latency_parts import arch_parts, probe, space_parts
from .timing import _torch_threads, fastest_time_us

BACKENDS = ("torch", "onnxruntime")
CACHE_ENV = "NASLOC_LATENCY_DIR"
DEFAULT_CACHE = Path("~/.cache/nasloc/latency")
FIT_ARCHS = 5  # end-to-end measurements the constant is fitted on
FIT_SEED = 1_000_003  # the fit's archs; reports draw theirs from other seeds
_SAVE_EVERY = 200  # parts measured between two writes of the table (an interrupted build keeps its work)


class LatencyError(NaslocError):
    """A latency target that cannot be measured here; the message is one line."""


# ------------------------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Target:
    """Where latency is measured: ``device`` (cpu or cuda), ``backend`` (torch, or onnxruntime on the CPU), batch,
    and the intra-op threads (0: torch's number in the process that measures)."""

    device: str = "cpu"
    backend: str = "torch"
    batch_size: int = 1
    threads: int = 0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise LatencyError(f"backend {self.backend!r}: choose from {', '.join(BACKENDS)}")
        if self.backend == "onnxruntime" and self.device != "cpu":
            raise LatencyError("the onnxruntime backend runs on the CPU: use --device cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise LatencyError("--device cuda: no CUDA device here")

    def device_name(self) -> str:
        if self.device == "cuda":
            return torch.cuda.get_device_name()
        return _cpu_name()

    def versions(self) -> dict[str, str]:
        import timm

        versions = {"torch": torch.__version__, "timm": timm.__version__, "models": _models_fingerprint()}
        if self.backend == "onnxruntime":
            from .onnx import onnxruntime

            versions["onnxruntime"] = onnxruntime().__version__
        return versions

    def thread_count(self) -> int:
        return self.threads or torch.get_num_threads()

    def time_us(self, module: torch.nn.Module, x: torch.Tensor) -> float:
        """Time of ``module(x)`` in microseconds (:func:`fastest_time_us`), with :meth:`thread_count` threads."""
        with _torch_threads(self.thread_count()):
            if self.backend == "onnxruntime":
                from .onnx import ort_runner

                return fastest_time_us(ort_runner(module, x))
            device = torch.device(self.device)
            module, x = module.to(device).eval(), x.to(device)
            sync = torch.cuda.synchronize if device.type == "cuda" else None
            with torch.inference_mode():
                return fastest_time_us(lambda: module(x), sync)


def measure_archs_us(archs: list[Arch], target: Target, rounds: int = 3, together: int = 8) -> list[float]:
    """End-to-end latency of the standalone model of each arch (random weights) on ``target``, in microseconds:
    ``together`` archs at a time are timed in ``rounds`` interleaved rounds and each keeps its fastest, so that
    a burst of load from another process slows one round of one arch, not the result."""
    from ..models import LocalityViT

    fastest = []
    for first in range(0, len(archs), together):
        models = [(LocalityViT(arch), torch.randn(target.batch_size, arch.in_chans, arch.img_size, arch.img_size))
                  for arch in archs[first:first + together]]
        rounds_us = [[target.time_us(*model) for model in models] for _ in range(rounds)]
        fastest += [min(times) for times in zip(*rounds_us)]
    return fastest


def _models_fingerprint() -> str:
    """A hash of the code the parts run (nasloc/models with its C++ kernels, and the probes), and of whether
    those kernels are switched on: a table outlives no change to it."""
    models = Path(__file__).parents[1] / "models"
    digest = hashlib.sha1(str(native.enabled()).encode())
    for path in sorted([*models.rglob("*.py"), *models.rglob("*.cpp"), Path(__file__).with_name("latency_parts.py")]):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def _cpu_name() -> str:
    return native.cpuinfo("model name") or platform.processor() or platform.machine()


# ------------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class LatencyModel:
    """``arch -> milliseconds`` (the search's latency objective and budget): the parts of the arch from the
    table, summed, plus the fitted constant. Plain data, so it pickles to worker processes."""

    parts: dict[str, float]
    constant_us: float = 0.0

    def parts_us(self, arch: Arch) -> float:
        try:
            return sum(count * self.parts[key] for key, count in arch_parts(arch).items())
        except KeyError as missing:
            raise LatencyError(f"the latency table has no entry for {missing}: build it for this space "
                               "(nasloc latency --space ...)") from None

    def predict_us(self, arch: Arch) -> float:
        return self.parts_us(arch) + self.constant_us

    def __call__(self, arch: Arch) -> float:
        return self.predict_us(arch) / 1000


# ------------------------------------------------------------------------------------------- table
@dataclass
class LatencyTable:
    """The measured parts of one target at one resolution, and the constants fitted per space (a JSON file)."""

    path: Path
    meta: dict[str, Any]
    parts: dict[str, float] = field(default_factory=dict)
    fits: dict[str, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def open(cls, target: Target, img_size: int, cache_dir: str | Path | None = None) -> "LatencyTable":
        """The table of ``target`` at ``img_size`` px; empty if it was never built."""
        meta = {"device": target.device_name(), "device_type": target.device, "backend": target.backend,
                "versions": target.versions(), "threads": target.thread_count(), "batch_size": target.batch_size,
                "img_size": img_size}
        folder = Path(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()
        table = cls(folder / _file_name(meta), meta)
        if table.path.is_file():
            try:
                stored = json.loads(table.path.read_text())
                table.parts, table.fits = dict(stored["parts"]), dict(stored["fits"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise LatencyError(f"{table.path}: unreadable latency table ({e}); delete it to rebuild") from None
        return table

    def save(self) -> None:
        write_atomic(self.path, json.dumps({**self.meta, "parts": self.parts, "fits": self.fits}, indent=1))

    def measure(self, keys: Iterable[str], target: Target, progress: bool = True) -> int:
        """Time the parts of ``keys`` the table lacks (saving as it goes); returns how many were timed."""
        from tqdm.auto import tqdm

        missing = sorted(set(keys) - set(self.parts))
        if not missing:
            return 0
        bar = tqdm(missing, desc=f"latency table ({self.meta['device']})", unit="part", disable=not progress,
                   dynamic_ncols=True)
        with bar:
            for i, key in enumerate(bar, 1):
                module, x = probe(key, target.batch_size)
                self.parts[key] = target.time_us(module, x)
                if i % _SAVE_EVERY == 0:
                    self.save()
        self.save()
        return len(missing)

    def fit(self, space: SearchSpace, target: Target, archs: int = FIT_ARCHS) -> float:
        """Fit the constant of ``space`` (the median gap) on ``archs`` random archs timed end to end."""
        model = LatencyModel(self.parts)
        rng = random.Random(FIT_SEED)
        sample = [space.sample(rng) for _ in range(archs)]
        gaps = [measured - model.parts_us(arch) for arch, measured in zip(sample, measure_archs_us(sample, target))]
        self.fits[fit_key(space)] = {"constant_us": statistics.median(gaps), "archs": archs}
        self.save()
        return self.fits[fit_key(space)]["constant_us"]

    def model(self, space: SearchSpace) -> LatencyModel:
        return LatencyModel(dict(self.parts), self.fits.get(fit_key(space), {}).get("constant_us", 0.0))


def fit_key(space: SearchSpace) -> str:
    """A space's constant is fitted per class count too: the head is one of its parts (``imagenet`` for
    ImageNet's 1000 classes and for a 10-class data set share a table, not a constant)."""
    return f"{space.name}-{space.skeleton.get('num_classes', 1000)}classes"


def _file_name(meta: dict[str, Any]) -> str:
    versions = "-".join(f"{name}{version}" for name, version in meta["versions"].items())
    name = (f"{meta['device']}-{meta['backend']}-{versions}-{meta['threads']}threads-batch{meta['batch_size']}-"
            f"{meta['img_size']}px.json")
    return re.sub(r"[^A-Za-z0-9.+_-]+", "_", name)


def build_latency_model(space: SearchSpace, target: Target, *, cache_dir: str | Path | None = None,
                        refresh: bool = False, progress: bool = True) -> tuple[LatencyModel, LatencyTable]:
    """The latency model of ``space`` on ``target``: its table built (missing parts timed) and its constant
    fitted where needed; ``refresh`` times everything again."""
    table = LatencyTable.open(target, space.img_size, cache_dir)
    if refresh:
        table.parts, table.fits = {}, {}
    measured = table.measure(space_parts(space), target, progress)
    if measured or fit_key(space) not in table.fits:
        table.fit(space, target)
    return table.model(space), table


@dataclass(frozen=True)
class LatencyFactory:
    """Picklable (for worker processes): ``LatencyFactory(space, device)()`` is the space's :class:`LatencyModel`
    on ``device`` (``arch -> predicted ms``), built on first use and read from its file after that. ``threads``
    (0: the calling process's) names the table, so that a worker with fewer threads reads the driver's."""

    space: str
    device: str = "cpu"
    num_classes: int | None = None
    threads: int = 0
    cache_dir: str | None = None

    def __call__(self) -> LatencyModel:
        space = SearchSpace.load(self.space)
        if self.num_classes is not None:
            space = space.for_classes(self.num_classes)
        target = Target(self.device, threads=self.threads)
        return build_latency_model(space, target, cache_dir=self.cache_dir)[0]
