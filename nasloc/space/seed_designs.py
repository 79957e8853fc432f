"""The seed designs: each published locality mechanism alone, as pins of the micro genes
(:data:`MECHANISMS`), from which :func:`reference_archs` builds, in any search space, the largest arch
within a MACs budget that uses that mechanism alone (the designs a search result is compared with, and
the first trials of every search)."""
from __future__ import annotations

from typing import Any

from ..arch import Arch
from .choosers import FREE, Fixed
from .files import SpaceError
from .search_space import SearchSpace


def _dilated_then_global(stage: int) -> str:
    """DilateFormer's mixer: dilated attention in the first two stages, global after (the paper found dilated
    attention in the later stages worse), in a pyramid space as in the paper."""
    return "dilated" if stage < 2 else "global"


# Each seed mechanism as pins of micro genes (a value, or a function of the stage index); every other micro
# gene is pinned to the plain ViT. LightViT and DilateFormer tokenize with convs in their papers: where a
# space searches the stem they take its conv stem, every other design the patch stem.
MECHANISMS: dict[str, dict[str, Any]] = {
    "plain ViT": {},
    "DW shortcut": {"shortcut": 1, "shortcut_kernels": (3,)},
    "LocalViT FFN": {"ffn_kernel": 3},
    "LIFE": {"life": True},
    "DilateFormer": {"mixer": _dilated_then_global, "dilation": "per-head 1,2,3", "cpe": True, "stem": "conv"},
    "LightViT": {"mixer": "window", "global_tokens": "most", "ffn": "bidim", "stem": "conv"},
}
_PLAIN = {"mixer": "global", "life": False, "ffn_kernel": 0, "shortcut": 0, "global_tokens": 0, "ffn": "mlp", "cpe": False, "stem": "patch"}


def reference_archs(space: SearchSpace, budget: float) -> dict[str, Arch]:
    """Each seed mechanism alone in the space's skeleton: the largest such arch within budget.

    Micro genes are pinned (every block the same mechanism; DilateFormer's stages after the second global,
    as in the paper), macro genes (depth, width, heads,
    MLP ratio) are grown up to the budget. Mechanisms the space cannot express are left out.
    """
    references = {}
    for name, pins in MECHANISMS.items():
        try:
            arch = space.extreme(largest=True, hi=budget, fixed=_pinned(pins))
        except SpaceError:
            continue
        if _expresses(arch, pins):
            references[name] = arch
    return references


def _pinned(pins: dict[str, Any]) -> Fixed:
    """A Fixed function pinning every micro gene to the plain ViT except the mechanism's own."""
    wanted = {**_PLAIN, **pins}

    def fixed(name: str, options: tuple) -> Any:
        gene = name.rsplit(".", 1)[-1]
        if gene not in wanted:
            return FREE
        value = wanted[gene]
        if callable(value):
            value = value(int(name.split(".")[0][1:]))  # the stage: "s1.b0.mixer" -> 1
        if value == "most":
            return max(options)
        if value == "per-head 1,2,3":
            # Head k takes rate k mod 3 + 1: with heads of equal rate grouped this is DilateFormer's
            # [1, 2, 3] split up to a permutation of heads, which changes nothing (rates have no weights).
            head = int(name.split(".")[-2][1:])
            rates = sorted(options)
            return rates[head % len(rates)]
        return value if value in options else FREE  # not offered: _expresses drops the reference

    return fixed


def _expresses(arch: Arch, pins: dict[str, Any]) -> bool:
    """Whether every pinned gene really took its value (the space offers it)."""
    blocks = [b for _, _, _, b in arch.iter_blocks()]
    checks = {
        "mixer": lambda v: all(block.mixer == (v(s) if callable(v) else v) for _, s, _, block in arch.iter_blocks()),
        "life": lambda v: all(b.life == v for b in blocks),
        "ffn_kernel": lambda v: all(b.ffn_kernel == v for b in blocks),
        "shortcut": lambda v: bool(arch.shortcuts),
        "ffn": lambda v: arch.ffn == v,
        "cpe": lambda v: arch.cpe == v,
        "global_tokens": lambda v: arch.global_tokens > 0,
    }
    return all(checks[gene](value) for gene, value in pins.items() if gene in checks)
