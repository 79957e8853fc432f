"""The MACs band of a search: the archs the supernet trains on and the selection draws its candidates from."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .search_space import SearchSpace


@dataclass(frozen=True)
class Band:
    """MACs per image at the space's deploy resolution that the search will consider."""

    lo: float
    hi: float

    def split(self, parts: int) -> list["Band"]:
        """``parts`` equal sub-bands, from low to high MACs."""
        edges = [self.lo + (self.hi - self.lo) * k / parts for k in range(parts)] + [self.hi]
        return [Band(lo, hi) for lo, hi in zip(edges, edges[1:])]


# The supernet trains on archs with MACs in [BAND_LOW * budget, budget]: the part of the space the
# search cares about (NASViT/ElasticViT sample inside the FLOPs band too).
BAND_LOW = 0.5


def search_band(space: SearchSpace, budget: float) -> Band:
    """The MACs band the supernet trains and the selection draws its candidates from: the budget down to
    :data:`BAND_LOW` of it (or the space's smallest arch)."""
    return Band(max(space.macs_range()[0], BAND_LOW * budget), budget)


def supernet_bands(space: SearchSpace, budgets: Sequence[float]) -> tuple[Band, list[Band]]:
    """The band one supernet trains on for ``budgets`` (a model family: the union of their bands) and the bands
    themselves, the buckets its random archs are spread over (AttentiveNAS samples FLOPs bins alike)."""
    bands = [search_band(space, budget) for budget in budgets]
    return Band(min(b.lo for b in bands), max(b.hi for b in bands)), bands
