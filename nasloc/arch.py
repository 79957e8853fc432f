"""The architecture description ("arch").

An :class:`Arch` is the one value that search, supernet, FLOPs counter, trainer and exporter pass
between each other. It is plain data (nested frozen dataclasses of ints, floats, strings and
tuples), fully determines a network, validates itself when it is made and round-trips through
JSON and YAML unchanged. Every validation error is an :class:`ArchError` whose single line names
the field and the reason.

Layout: an arch is a skeleton (stem, downsampling, position encoding, head, FFN flavour, ...) plus
a list of stages, each with its width, heads, MLP ratio and blocks. A block chooses its token mixer
and its locality switches. Depth-wise conv shortcuts are listed separately, by the global index of
the first block they bypass. One stage with no downsampling is the columnar (DeiT-like) family;
several stages are the pyramid family.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Iterator

import yaml

from .errors import NaslocError

MIXERS = ("global", "dilated", "window")
STEMS = ("patch", "lightvit", "overlap", "conv")
# The stems a space may search (``genes: stem``): their layers have distinct names, so that a supernet
# holds them side by side (see nasloc.models.stems.StemChoice).
SEARCHABLE_STEMS = ("patch", "conv")
DOWNSAMPLES = ("conv", "merge")
POS_EMBEDS = ("absolute", "none")
HEADS = ("token", "avg", "neck")
FFNS = ("mlp", "localvit", "bidim")
SHORTCUT_KERNELS = (3, 5, 7)
MAX_SHORTCUT_SPAN = 4
# Total stride each conv stem supports (see nasloc.models.stems).
STEM_STRIDES = {"lightvit": (2, 4, 8), "overlap": (2, 4), "conv": (2, 4)}
# Widths that follow from an arch's own (nasloc.models builds them, nasloc.space.flops counts them).
OVERLAP_STEM_WIDTHS = (16, 32, 64)  # DilateFormer's stem convs before the embedding


def conv_stem_width(dim: int) -> int:
    """The hidden width of the conv stem: a fixed function of the embedding width, so that a narrower arch uses
    the leading channels of every stem layer of a wider one (the supernet's slice)."""
    return dim // 2


def se_channels(dim: int, hidden: int) -> int:
    """The squeeze width of LocalViT's squeeze-excite in an FFN of ``hidden`` channels at width ``dim``."""
    return max(1, hidden // dim)


class ArchError(NaslocError):
    """An invalid architecture description; the message is one line naming the field."""


@dataclass(frozen=True)
class Block:
    """One transformer block.

    mixer: ``global`` attention, ``dilated`` sliding-window attention (DilateFormer) or ``window``
        attention that aggregates and broadcasts through the global tokens (LightViT).
    dilations: for ``dilated`` only, one dilation rate per head; heads with equal rates are grouped.
    life: LIFE multi-scale qkv projection instead of the plain one.
    ffn_kernel: depth-wise conv inside the FFN (LocalViT): 0 (off) or an odd kernel size.
    """

    mixer: str = "global"
    dilations: tuple[int, ...] = ()
    life: bool = False
    ffn_kernel: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "dilations", tuple(self.dilations))  # a list made in Python would not hash


@dataclass(frozen=True)
class Stage:
    """A run of blocks at one resolution and width; depth is ``len(blocks)``."""

    dim: int
    heads: int
    mlp_ratio: float
    blocks: tuple[Block, ...]

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def hidden(self) -> int:
        return int(round(self.dim * self.mlp_ratio))


@dataclass(frozen=True)
class Shortcut:
    """A depth-wise conv shortcut (Efficient ViT with DW).

    It takes the input of block ``start`` (counted over the whole network) and adds its output to the
    output of block ``start + span - 1``; ``kernels`` run in parallel and are summed.
    """

    start: int
    span: int = 1
    kernels: tuple[int, ...] = (3,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kernels", tuple(self.kernels))  # a list made in Python would not hash


@dataclass(frozen=True)
class Arch:
    stages: tuple[Stage, ...]
    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    stem: str = "patch"
    patch_size: int = 16  # the stem's total stride
    downsample: str = "conv"  # between stages of a pyramid
    pos_embed: str = "absolute"
    cpe: bool = False  # conditional position encoding: x + DWConv3x3(x) before every block
    cls_token: bool = True
    global_tokens: int = 0  # LightViT global aggregation tokens (0 = none)
    window: int = 7  # window of the ``window`` mixer, clipped to the feature map
    dilate_kernel: int = 3  # neighbourhood of the ``dilated`` mixer
    head: str = "token"
    neck_dim: int = 1280  # width of the LightViT neck; used by head="neck"
    ffn: str = "mlp"
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    shortcuts: tuple[Shortcut, ...] = ()

    def __post_init__(self) -> None:
        _validate(self)

    # ----------------------------------------------------------------- derived geometry
    @property
    def depth(self) -> int:
        return sum(s.depth for s in self.stages)

    @property
    def num_aux_tokens(self) -> int:
        """Tokens in front of the image tokens: the class token, then the global tokens."""
        return int(self.cls_token) + self.global_tokens

    @property
    def family(self) -> str:
        return "columnar" if len(self.stages) == 1 else "pyramid"

    def grid(self, stage: int) -> int:
        """Side of the token map in ``stage`` (square inputs)."""
        return self.img_size // self.patch_size // (2**stage)

    def window_size(self, stage: int) -> int:
        """Side of the attention windows in ``stage``: the largest divisor of the map side that is
        at most ``window``, so windows always tile the map (a map smaller than the window is one
        window). At the deploy resolution of a space the windows are exactly ``window``
        (checked when the space is loaded); at a smaller proxy resolution they shrink with the map."""
        grid = self.grid(stage)
        return max(d for d in range(1, min(self.window, grid) + 1) if grid % d == 0)

    def iter_blocks(self) -> Iterator[tuple[int, int, int, Block]]:
        """(global index, stage index, index inside the stage, block) for every block."""
        index = 0
        for s, stage in enumerate(self.stages):
            for b, block in enumerate(stage.blocks):
                yield index, s, b, block
                index += 1

    def describe(self) -> str:
        """One line saying which locality the arch uses, e.g. for tables of searched archs."""
        stages = []
        for stage in self.stages:
            mixers = "/".join(f"{sum(b.mixer == m for b in stage.blocks)} {m}" for m in MIXERS)
            stages.append(f"dim {stage.dim}, depth {stage.depth}, heads {stage.heads}, mlp {stage.mlp_ratio:g}: {mixers}, "
                          f"{sum(b.life for b in stage.blocks)} LIFE, {sum(bool(b.ffn_kernel) for b in stage.blocks)} FFN-conv")
        shortcuts = ", ".join(f"{s.start}+{s.span}:{'/'.join(map(str, s.kernels))}" for s in self.shortcuts) or "none"
        return (" | ".join(stages) + f"; shortcuts (start+span:kernels) {shortcuts}; {self.global_tokens} global tokens, "
                f"ffn {self.ffn}, cpe {'on' if self.cpe else 'off'}, {self.stem} stem")

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Arch":
        if isinstance(data, Arch):
            return data
        _require_mapping(data, "arch")
        data = dict(data)
        _check_keys(data, cls, "arch")
        if "stages" not in data:
            raise ArchError("arch.stages: missing (a list of stages is required)")
        stages = tuple(_stage_from_dict(s, f"stages[{i}]") for i, s in enumerate(_as_list(data.pop("stages"), "stages")))
        shortcuts = tuple(
            _leaf_from_dict(Shortcut, s, f"shortcuts[{i}]", "kernels") for i, s in enumerate(_as_list(data.pop("shortcuts", []), "shortcuts"))
        )
        try:
            return cls(stages=stages, shortcuts=shortcuts, **data)
        except TypeError as e:  # a wrongly typed field that the dataclass refused
            raise ArchError(f"arch: {e}") from None

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "Arch":
        return cls.from_dict(json.loads(text))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "Arch":
        return cls.from_dict(yaml.safe_load(text))

    def replace(self, **changes: Any) -> "Arch":
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------- parsing helpers
def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _require_mapping(data: Any, where: str) -> None:
    if not isinstance(data, dict):
        raise ArchError(f"{where}: expected a mapping, got {type(data).__name__}")


def _as_list(value: Any, where: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise ArchError(f"{where}: expected a list, got {type(value).__name__}")
    return list(value)


def _check_keys(data: dict, cls: type, where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ArchError(f"{where}.{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")


def _leaf_from_dict(cls: type, data: Any, where: str, list_field: str) -> Any:
    """A Block or Shortcut from its dict; ``list_field`` (JSON has no tuples) becomes a tuple."""
    _require_mapping(data, where)
    _check_keys(data, cls, where)
    data = dict(data)
    if list_field in data:
        data[list_field] = tuple(_as_list(data[list_field], f"{where}.{list_field}"))
    return cls(**data)


def _stage_from_dict(data: Any, where: str) -> Stage:
    _require_mapping(data, where)
    _check_keys(data, Stage, where)
    data = dict(data)
    for key in ("dim", "heads", "mlp_ratio", "blocks"):
        if key not in data:
            raise ArchError(f"{where}.{key}: missing")
    blocks = _as_list(data.pop("blocks"), f"{where}.blocks")
    return Stage(blocks=tuple(_leaf_from_dict(Block, b, f"{where}.blocks[{i}]", "dilations") for i, b in enumerate(blocks)), **data)


# --------------------------------------------------------------------------- validation
def _check(ok: bool, where: str, reason: str) -> None:
    if not ok:
        raise ArchError(f"{where}: {reason}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_choice(value: Any, choices: tuple, where: str) -> None:
    _check(value in choices, where, f"{value!r} is not one of {', '.join(map(str, choices))}")


def _check_positive_int(value: Any, where: str) -> None:
    _check(_is_int(value) and value > 0, where, f"must be a positive integer, got {value!r}")


def _validate(arch: Arch) -> None:
    _validate_skeleton(arch)
    for s, stage in enumerate(arch.stages):
        _validate_stage(arch, s, stage)
    _validate_shortcuts(arch)


def total_stride(patch_size: int, stages: int) -> int:
    """Image pixels per token of the last stage's map: the stem's stride, then 2 per downsampling."""
    return patch_size * 2 ** (stages - 1)


def _validate_skeleton(arch: Arch) -> None:
    for name in ("img_size", "in_chans", "num_classes", "patch_size", "window", "neck_dim"):
        if name == "num_classes":
            _check(_is_int(arch.num_classes) and arch.num_classes >= 0, name, "must be an integer >= 0")
        else:
            _check_positive_int(getattr(arch, name), name)
    _check_choice(arch.stem, STEMS, "stem")
    _check_choice(arch.downsample, DOWNSAMPLES, "downsample")
    _check_choice(arch.pos_embed, POS_EMBEDS, "pos_embed")
    _check_choice(arch.head, HEADS, "head")
    _check_choice(arch.ffn, FFNS, "ffn")
    for name in ("cpe", "cls_token", "qkv_bias"):
        _check(isinstance(getattr(arch, name), bool), name, "must be true or false")
    _check(_is_int(arch.global_tokens) and arch.global_tokens >= 0, "global_tokens", "must be an integer >= 0")
    _check(_is_int(arch.dilate_kernel) and arch.dilate_kernel >= 1 and arch.dilate_kernel % 2 == 1, "dilate_kernel",
           "must be an odd integer >= 1")
    _check(isinstance(arch.norm_eps, (int, float)) and arch.norm_eps > 0, "norm_eps", "must be > 0")
    _check(arch.head != "token" or arch.cls_token, "head", "'token' needs cls_token: true (or use head 'avg')")
    if arch.stem in STEM_STRIDES:
        strides = STEM_STRIDES[arch.stem]
        _check(arch.patch_size in strides, "patch_size", f"the {arch.stem} stem has stride {' or '.join(map(str, strides))}")
    _check(isinstance(arch.stages, tuple) and len(arch.stages) > 0, "stages", "at least one stage is required")
    stride = total_stride(arch.patch_size, len(arch.stages))
    _check(arch.img_size % stride == 0, "img_size", f"{arch.img_size} is not divisible by patch_size x 2^(stages-1) = {stride}")


def _validate_stage(arch: Arch, s: int, stage: Stage) -> None:
    where = f"stages[{s}]"
    _check(isinstance(stage, Stage), where, "expected a stage")
    _check_positive_int(stage.dim, f"{where}.dim")
    _check_positive_int(stage.heads, f"{where}.heads")
    _check(stage.dim % stage.heads == 0, f"{where}.heads", f"dim {stage.dim} is not divisible by {stage.heads} heads")
    _check(
        isinstance(stage.mlp_ratio, (int, float)) and stage.mlp_ratio > 0 and stage.hidden > 0,
        f"{where}.mlp_ratio",
        "must be > 0",
    )
    _check(len(stage.blocks) > 0, f"{where}.blocks", "a stage needs at least one block")
    for b, block in enumerate(stage.blocks):
        _validate_block(stage, block, f"{where}.blocks[{b}]")


def _validate_block(stage: Stage, block: Block, where: str) -> None:
    _check(isinstance(block, Block), where, "expected a block")
    _check_choice(block.mixer, MIXERS, f"{where}.mixer")
    _check(isinstance(block.life, bool), f"{where}.life", "must be true or false")
    _check(not block.life or stage.dim % 3 == 0, f"{where}.life", f"LIFE splits channels in 3; dim {stage.dim} is not divisible by 3")
    kernel = block.ffn_kernel
    _check(_is_int(kernel) and (kernel == 0 or (kernel >= 3 and kernel % 2 == 1)), f"{where}.ffn_kernel", "must be 0 (off) or an odd size >= 3")
    if block.mixer == "dilated":
        rates = block.dilations
        _check(len(rates) == stage.heads, f"{where}.dilations", f"needs one rate per head ({stage.heads}), got {len(rates)}")
        _check(all(_is_int(d) and d >= 1 for d in rates), f"{where}.dilations", "rates must be integers >= 1")
    else:
        _check(block.dilations == (), f"{where}.dilations", "only the 'dilated' mixer takes dilation rates")


def _validate_shortcuts(arch: Arch) -> None:
    stage_of = [s for _, s, _, _ in arch.iter_blocks()]
    covered: set[int] = set()
    for i, sc in enumerate(arch.shortcuts):
        where = f"shortcuts[{i}]"
        _check(isinstance(sc, Shortcut), where, "expected a shortcut")
        _check(_is_int(sc.start) and 0 <= sc.start < arch.depth, f"{where}.start", f"must be a block index in [0, {arch.depth - 1}]")
        _check(_is_int(sc.span) and 1 <= sc.span <= MAX_SHORTCUT_SPAN, f"{where}.span", f"must be 1-{MAX_SHORTCUT_SPAN}")
        last = sc.start + sc.span - 1
        _check(last < arch.depth and stage_of[last] == stage_of[sc.start], f"{where}.span", "a shortcut must stay inside one stage")
        kernels = sc.kernels
        _check(len(kernels) > 0 and all(k in SHORTCUT_KERNELS for k in kernels), f"{where}.kernels", "must be a non-empty subset of {3, 5, 7}")
        _check(list(kernels) == sorted(set(kernels)), f"{where}.kernels", "must be sorted and without repeats")
        blocks = set(range(sc.start, last + 1))
        _check(not (blocks & covered), f"{where}", "overlaps another shortcut")
        covered |= blocks
