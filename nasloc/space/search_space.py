"""Search spaces: a skeleton plus the choices of every gene, loaded from YAML.

A space turns decisions into archs with one function, :meth:`SearchSpace.build`, which asks a
*chooser* for every gene in a fixed order. Random sampling, Optuna's define-by-run suggestions,
mutation (replaying earlier decisions) and the smallest/largest searches are only different
choosers, so they can never disagree about what the space contains.

Gene names (also the Optuna parameter names): ``stem`` (only where searched), ``global_tokens``, ``ffn``, ``cpe``,
``s{i}.depth|dim|heads|mlp_ratio``, ``s{i}.b{j}.mixer|life|ffn_kernel``, ``s{i}.b{j}.h{k}.dilation``
and, for shortcuts, ``s{i}.b{j}.shortcut`` (span, 0 = none) and ``s{i}.b{j}.shortcut_kernels``.
Choices of a name never change (Optuna needs static distributions): a span longer than the blocks
left in the stage is shortened to fit.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import yaml

from ..arch import (
    FFNS,
    MAX_SHORTCUT_SPAN,
    MIXERS,
    SEARCHABLE_STEMS,
    SHORTCUT_KERNELS,
    Arch,
    ArchError,
    Block,
    Shortcut,
    Stage,
    total_stride,
)
from .choosers import FREE, MISSING, Chooser, Fixed, OptunaChooser, RandomChooser, RecordingChooser, ReplayChooser
from .files import SpaceError, resolve_space_path
from .flops import count


@dataclass(frozen=True)
class StageChoices:
    depth: tuple[int, ...]
    dim: tuple[int, ...]
    heads: tuple[int, ...]
    mlp_ratio: tuple[float, ...]
    mixer: tuple[str, ...] = ("global",)
    dilation: tuple[int, ...] = (1,)
    life: tuple[bool, ...] = (False,)
    ffn_kernel: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class SearchSpace:
    name: str
    skeleton: dict[str, Any]
    stages: tuple[StageChoices, ...]
    global_tokens: tuple[int, ...] = (0,)
    ffn: tuple[str, ...] = ("mlp",)
    cpe: tuple[bool, ...] = (False,)
    shortcut_span: tuple[int, ...] = (0,)
    shortcut_kernels: tuple[tuple[int, ...], ...] = ((3,),)
    stem: tuple[str, ...] = ()  # the stems searched; empty: the skeleton's stem, not searched
    source: str = "<space>"

    # ------------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path) -> "SearchSpace":
        path = resolve_space_path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise SpaceError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<space>") -> "SearchSpace":
        def fail(field: str, reason: str) -> SpaceError:
            return SpaceError(f"{source}: {field}: {reason}")

        if not isinstance(data, dict):
            raise fail("space", "expected a mapping with skeleton, genes and stages")
        _known(data, {"name", "description", "skeleton", "genes", "stages"}, "", fail)
        genes = data.get("genes") or {}
        _known(genes, {"stem", "global_tokens", "ffn", "cpe", "shortcuts"}, "genes.", fail)
        shortcuts = genes.get("shortcuts") or {}
        _known(shortcuts, {"span", "kernels"}, "genes.shortcuts.", fail)
        stage_fields = {f.name for f in fields(StageChoices)}
        stages = []
        for i, stage in enumerate(data.get("stages") or []):
            if not isinstance(stage, dict):
                raise fail(f"stages[{i}]", "expected a mapping of gene choices")
            _known(stage, stage_fields, f"stages[{i}].", fail)
            missing = {"depth", "dim", "heads", "mlp_ratio"} - set(stage)
            if missing:
                raise fail(f"stages[{i}].{sorted(missing)[0]}", "missing")
            stages.append(StageChoices(**{k: _options(v, f"stages[{i}].{k}", fail) for k, v in stage.items()}))
        if not stages:
            raise fail("stages", "at least one stage is required")
        space = cls(
            name=str(data.get("name") or Path(source).stem),
            skeleton=dict(data.get("skeleton") or {}),
            stages=tuple(stages),
            global_tokens=_options(genes.get("global_tokens", [0]), "genes.global_tokens", fail),
            ffn=_options(genes.get("ffn", ["mlp"]), "genes.ffn", fail),
            cpe=_options(genes.get("cpe", [False]), "genes.cpe", fail),
            shortcut_span=_options(shortcuts.get("span", [0]), "genes.shortcuts.span", fail),
            shortcut_kernels=tuple(tuple(k) if isinstance(k, (list, tuple)) else (k,) for k in _options(shortcuts.get("kernels", [[3]]), "genes.shortcuts.kernels", fail)),
            stem=_options(genes["stem"], "genes.stem", fail) if "stem" in genes else (),
            source=source,
        )
        _validate_space(space, fail)
        return space

    def for_classes(self, num_classes: int) -> "SearchSpace":
        """The same space with archs for ``num_classes`` (the data set's, not the skeleton's)."""
        return dataclasses.replace(self, skeleton={**self.skeleton, "num_classes": num_classes})

    # ------------------------------------------------------------------------ geometry
    @property
    def img_size(self) -> int:
        return int(self.skeleton.get("img_size", 224))

    @property
    def stride(self) -> int:
        """Image pixels per token of the last stage's map: every image size of the space's archs is a multiple."""
        return total_stride(int(self.skeleton.get("patch_size", 16)), len(self.stages))

    def grid(self, stage: int, img_size: int | None = None) -> int:
        return (img_size or self.img_size) // int(self.skeleton.get("patch_size", 16)) // 2**stage

    # ------------------------------------------------------------------------ archs
    def build(self, choose: Chooser) -> Arch:
        """The arch that ``choose(name, options)`` picks, gene by gene in a fixed order."""
        stages = []
        shortcuts: list[Shortcut] = []
        offset = 0
        for i, choices in enumerate(self.stages):
            depth = choose(f"s{i}.depth", choices.depth)
            heads = choose(f"s{i}.heads", choices.heads)
            stage = Stage(
                dim=choose(f"s{i}.dim", choices.dim),
                heads=heads,
                mlp_ratio=choose(f"s{i}.mlp_ratio", choices.mlp_ratio),
                blocks=tuple(self._block(choose, f"s{i}.b{j}", choices, heads) for j in range(depth)),
            )
            stages.append(stage)
            shortcuts += self._shortcuts(choose, i, depth, offset)
            offset += depth
        skeleton = {**self.skeleton, "stem": choose("stem", self.stem)} if self.stem else self.skeleton
        return Arch(
            stages=tuple(stages),
            shortcuts=tuple(shortcuts),
            global_tokens=choose("global_tokens", self.global_tokens),
            ffn=choose("ffn", self.ffn),
            cpe=choose("cpe", self.cpe),
            **skeleton,
        )

    def _block(self, choose: Chooser, prefix: str, choices: StageChoices, heads: int) -> Block:
        mixer = choose(f"{prefix}.mixer", choices.mixer)
        dilations = tuple(choose(f"{prefix}.h{k}.dilation", choices.dilation) for k in range(heads)) if mixer == "dilated" else ()
        return Block(
            mixer=mixer,
            dilations=dilations,
            life=choose(f"{prefix}.life", choices.life),
            ffn_kernel=choose(f"{prefix}.ffn_kernel", choices.ffn_kernel),
        )

    def _shortcuts(self, choose: Chooser, stage: int, depth: int, offset: int) -> list[Shortcut]:
        if self.shortcut_span == (0,):
            return []
        found, j = [], 0
        while j < depth:
            span = min(choose(f"s{stage}.b{j}.shortcut", self.shortcut_span), depth - j)
            if span:
                kernels = choose(f"s{stage}.b{j}.shortcut_kernels", self.shortcut_kernels)
                found.append(Shortcut(start=offset + j, span=span, kernels=kernels))
            j += max(span, 1)
        return found

    def sample(self, rng: random.Random) -> Arch:
        return self.build(RandomChooser(rng))

    def suggest(self, trial: Any) -> Arch:
        """The arch an Optuna trial suggests (define-by-run; tuples are encoded as '3+5')."""
        return self.build(OptunaChooser(trial))

    # ------------------------------------------------------------------------ MACs band
    def macs_range(self) -> tuple[int, int]:
        """MACs of the smallest and of the largest arch at the deploy resolution."""
        return count(self.extreme(largest=False)).macs, count(self.extreme(largest=True)).macs

    def extreme(self, largest: bool, lo: float = 0.0, hi: float = float("inf"), fixed: "Fixed | None" = None) -> Arch:
        """The largest arch with MACs <= hi (or the smallest with MACs >= lo), by coordinate search.

        Starting from the opposite corner of the space, every gene in turn takes the option that
        moves MACs furthest in the wanted direction without crossing the bound; two passes settle
        genes whose options depend on others (depth, heads). ``fixed(name, options)`` may pin genes
        (return :data:`FREE` for the others), as :func:`nasloc.space.seed_designs.reference_archs` pins each seed
        mechanism. Deterministic. Raises :class:`SpaceError` if the
        result is not inside [lo, hi].
        """
        decisions = _Decisions(self, start_largest=not largest, fixed=fixed)
        for _ in range(2):
            for name in decisions.free_names():
                decisions.improve(name, largest, lo, hi)
        arch = decisions.arch()
        macs = count(arch).macs
        if not lo <= macs <= hi:
            raise SpaceError(f"{self.source}: no arch found with MACs in [{lo:.4g}, {hi:.4g}]")
        return arch

    def sample_in_band(self, rng: random.Random, lo: float, hi: float, tries: int = 64) -> Arch:
        """A random arch with MACs in [lo, hi] (see :meth:`decisions_in_band`)."""
        return self.build(ReplayChooser(self.decisions_in_band(rng, lo, hi, tries), RandomChooser(rng)))  # complete: no fallback

    def decisions_in_band(self, rng: random.Random, lo: float, hi: float, tries: int = 64,
                          start: Chooser | None = None) -> dict[str, Any]:
        """The gene decisions (name -> option) of a random arch with MACs in [lo, hi]; bounded work.

        1. Rejection: up to ``tries`` uniform samples; the first inside the band is returned (for a
           band that holds a fair share of the space this is uniform over the band). With ``start``
           (e.g. an evolutionary child to repair) the one arch it chooses replaces these samples.
        2. Repair: otherwise the sample closest to the band is walked towards it, one gene
           re-drawn at a time, keeping a change only when it brings MACs closer, for at most
           ``20 * tries`` steps. A walk stuck in a local minimum (no progress in twice as many
           steps as it has genes) restarts from a fresh uniform sample.
        A band that the walk cannot reach raises :class:`SpaceError`.
        """
        best, best_gap = None, float("inf")
        starts = [start] if start is not None else (RandomChooser(rng) for _ in range(tries))
        for chooser in map(RecordingChooser, starts):
            arch = self.build(chooser)
            gap = _gap(count(arch).macs, lo, hi)
            if gap == 0:
                return chooser.decisions
            if gap < best_gap:
                best, best_gap = chooser.decisions, gap
        current, current_gap, stale = best, best_gap, 0
        for _ in range(20 * tries):
            if stale >= 2 * len(current):
                chooser = RecordingChooser(RandomChooser(rng))
                self.build(chooser)
                current, current_gap, stale = chooser.decisions, float("inf"), 0
            name = rng.choice(sorted(current))
            trial = dict(current)
            del trial[name]
            chooser = RecordingChooser(ReplayChooser(trial, RandomChooser(rng)))
            arch = self.build(chooser)
            gap = _gap(count(arch).macs, lo, hi)
            if gap == 0:
                return chooser.decisions
            stale += 1
            if gap < current_gap:
                current, current_gap, stale = chooser.decisions, gap, 0
            best_gap = min(best_gap, gap)
        raise SpaceError(f"{self.source}: could not reach the MACs band [{lo:.4g}, {hi:.4g}] (closest arch is {best_gap:.4g} MACs away)")


class _Decisions:
    """Decisions being tuned one gene at a time (for :meth:`SearchSpace.extreme`)."""

    def __init__(self, space: SearchSpace, start_largest: bool, fixed: Fixed | None):
        corner = -1 if start_largest else 0
        self.space, self.fixed = space, fixed or (lambda name, options: FREE)
        self.values: dict[str, Any] = {}
        self.arch(default=lambda name, options: _by_cost(name, options)[corner])

    def _pick(self, values: dict[str, Any], default: Chooser) -> Chooser:
        def choose(name: str, options: tuple) -> Any:
            pinned = self.fixed(name, options)
            if pinned is not FREE:
                return pinned
            value = values.get(name, MISSING)
            return value if value in options else default(name, options)

        return choose

    def free_names(self) -> list[str]:
        return [name for name in list(self.values) if name in self.values and not self._is_fixed(name)]

    def _is_fixed(self, name: str) -> bool:
        return self.fixed(name, (self.values[name],)) is not FREE

    def arch(self, values: dict[str, Any] | None = None, default: Chooser | None = None) -> Arch:
        """Build from ``values`` (default: the current ones, which are then refreshed)."""
        chooser = RecordingChooser(self._pick(values if values is not None else self.values, default or (lambda name, options: _by_cost(name, options)[0])))
        arch = self.space.build(chooser)
        if values is None:
            self.values = chooser.decisions
        return arch

    def improve(self, name: str, largest: bool, lo: float, hi: float) -> None:
        if name not in self.values:
            return
        best_value, best_macs = self.values[name], None
        for option in _options_of(self.space, name, self.values):
            macs = count(self.arch({**self.values, name: option})).macs
            allowed = macs <= hi if largest else macs >= lo
            better = best_macs is None or (macs > best_macs if largest else macs < best_macs)
            if allowed and better:
                best_value, best_macs = option, macs
        self.values[name] = best_value
        self.arch()


def _options_of(space: SearchSpace, name: str, values: dict[str, Any]) -> tuple:
    found: list[tuple] = []

    def spy(gene: str, options: tuple) -> Any:
        if gene == name:
            found.append(options)
        return values.get(gene) if values.get(gene, MISSING) in options else options[0]

    space.build(spy)
    return found[0] if found else ()


def _by_cost(name: str, options: tuple) -> tuple:
    """Options ordered from cheap to expensive where that order is obvious (numbers, off before on)."""
    if all(isinstance(o, (bool, int, float)) for o in options):
        return tuple(sorted(options))
    return options


def _gap(macs: float, lo: float, hi: float) -> float:
    return max(lo - macs, macs - hi, 0.0)


def _known(data: dict, known: set[str], prefix: str, fail: Callable[[str, str], SpaceError]) -> None:
    if not isinstance(data, dict):
        raise fail(prefix.rstrip(".") or "space", "expected a mapping")
    unknown = sorted(set(data) - known)
    if unknown:
        raise fail(f"{prefix}{unknown[0]}", f"unknown gene or field (known: {', '.join(sorted(known))})")


def _options(value: Any, field: str, fail: Callable[[str, str], SpaceError]) -> tuple:
    options = value if isinstance(value, (list, tuple)) else [value]
    if not options:
        raise fail(field, "needs at least one choice")
    return tuple(tuple(o) if isinstance(o, list) else o for o in options)


def _validate_space(space: SearchSpace, fail: Callable[[str, str], SpaceError]) -> None:
    for key in space.skeleton:
        if key not in Arch.__dataclass_fields__ or key in ("stages", "shortcuts", "global_tokens", "ffn", "cpe"):
            raise fail(f"skeleton.{key}", "unknown skeleton field (genes go under 'genes' or 'stages')")
    _validate_genes(space, fail)
    for i, stage in enumerate(space.stages):
        _validate_stage(space, i, stage, fail)
    deepest = max(max(s.depth) for s in space.stages)
    for span in space.shortcut_span:
        if span and span > deepest:
            raise fail("genes.shortcuts.span", f"a span of {span} blocks crosses a stage (the deepest stage has {deepest})")
    for largest in (False, True):  # both corners must build; Arch names anything else wrong
        try:
            space.build(lambda name, options: _by_cost(name, options)[-1 if largest else 0])
        except ArchError as e:
            raise fail("arch", str(e)) from None


def _validate_genes(space: SearchSpace, fail: Callable[[str, str], SpaceError]) -> None:
    if not all(isinstance(n, int) and n >= 0 for n in space.global_tokens):
        raise fail("genes.global_tokens", "choices must be integers >= 0")
    if not set(space.ffn) <= set(FFNS) or ("localvit" in space.ffn and len(space.ffn) > 1):
        raise fail("genes.ffn", "choose among mlp and bidim, or exactly [localvit] (its FFN has other weights)")
    if not all(isinstance(c, bool) for c in space.cpe):
        raise fail("genes.cpe", "choices must be true or false")
    if space.stem and not (set(space.stem) <= set(SEARCHABLE_STEMS) and space.skeleton.get("stem", "patch") in space.stem):
        raise fail("genes.stem", f"choose among {', '.join(SEARCHABLE_STEMS)}, the skeleton's stem (the default) included")
    if not all(isinstance(s, int) and 0 <= s <= MAX_SHORTCUT_SPAN for s in space.shortcut_span):
        raise fail("genes.shortcuts.span", f"spans must be 0 (no shortcut) to {MAX_SHORTCUT_SPAN}")
    for kernels in space.shortcut_kernels:
        if not kernels or not set(kernels) <= set(SHORTCUT_KERNELS) or list(kernels) != sorted(set(kernels)):
            raise fail("genes.shortcuts.kernels", f"{list(kernels)} is not a sorted non-empty subset of [3, 5, 7]")


def _validate_stage(space: SearchSpace, i: int, stage: StageChoices, fail: Callable[[str, str], SpaceError]) -> None:
    where = f"stages[{i}]"
    for name in ("depth", "dim", "heads"):
        if not all(isinstance(v, int) and v > 0 for v in getattr(stage, name)):
            raise fail(f"{where}.{name}", "choices must be positive integers")
    for dim in stage.dim:
        for heads in stage.heads:
            if dim % heads:
                raise fail(f"{where}.heads", f"dim {dim} is not divisible by {heads} heads")
        if True in stage.life and dim % 3:
            raise fail(f"{where}.life", f"LIFE splits channels in 3 but dim {dim} is not divisible by 3")
    if not set(stage.mixer) <= set(MIXERS):
        raise fail(f"{where}.mixer", f"choose among {', '.join(MIXERS)}")
    # Choices between the two corners are never built by the corner check below: check them here.
    if not all(type(k) is int and (k == 0 or (k >= 3 and k % 2 == 1)) for k in stage.ffn_kernel):
        raise fail(f"{where}.ffn_kernel", "choices must be 0 (off) or odd sizes >= 3")
    if not all(type(d) is int and d >= 1 for d in stage.dilation):
        raise fail(f"{where}.dilation", "choices must be integers >= 1")
    if not all(isinstance(v, bool) for v in stage.life):
        raise fail(f"{where}.life", "choices must be true or false")
    if not all(type(r) in (int, float) and r > 0 for r in stage.mlp_ratio):
        raise fail(f"{where}.mlp_ratio", "choices must be numbers > 0")
    grid = space.grid(i)
    if "dilated" in stage.mixer:
        kernel = int(space.skeleton.get("dilate_kernel", 3))
        reach = (kernel - 1) * max(stage.dilation) + 1
        if reach > grid:
            raise fail(f"{where}.dilation", f"a dilated {kernel}x{kernel} neighbourhood at rate {max(stage.dilation)} spans {reach} > the {grid}x{grid} feature map")
    if "window" in stage.mixer:
        window = int(space.skeleton.get("window", 7))
        if window < grid and grid % window:
            raise fail(f"{where}.mixer", f"window {window} does not tile the {grid}x{grid} feature map")
