"""nasloc.space.locality: how far each locality operation reaches, and the image size that keeps it meaningful."""
from __future__ import annotations

from nasloc.space.locality import locality_size, lost_genes, reach
from nasloc.space.search_space import SearchSpace


def _space(mixers: list[str], dilation: list[int], img_size: int = 224) -> SearchSpace:
    stage = dict(depth=[1], dim=[48], heads=[3], mlp_ratio=[4], mixer=mixers, dilation=dilation, ffn_kernel=[0, 3])
    return SearchSpace.from_dict(dict(
        name="pyramid", skeleton=dict(img_size=img_size, num_classes=10, stem="lightvit", patch_size=8,
                                      downsample="merge", pos_embed="none", window=7, head="avg"),
        genes=dict(shortcuts=dict(span=[0, 1], kernels=[[3], [3, 5]])), stages=[stage, stage, stage]))


def test_each_operation_reaches_as_far_as_its_window_neighbourhood_or_kernel() -> None:
    space = _space(["window", "dilated", "global"], [1, 2])
    assert reach(space, 0) == {"window 7": 7, "dilation 2": 5, "shortcut kernel 5": 5, "FFN kernel 3": 3}
    assert reach(_space(["global"], [1]), 2) == {"shortcut kernel 5": 5, "FFN kernel 3": 3}


def test_the_locality_size_gives_the_last_stage_a_map_as_wide_as_its_widest_operation() -> None:
    assert locality_size(_space(["window", "global"], [1])) == 224  # 7 tokens in stage 3: 7 x 8 x 4 = 224 px
    assert locality_size(_space(["dilated", "global"], [1, 2])) == 160  # 5 tokens: 5 x 32 = 160 px
    assert locality_size(_space(["window"], [1], img_size=32)) == 32  # capped at the deploy size
    assert locality_size(SearchSpace.load("imagenet")) == 224 and locality_size(SearchSpace.load("cifar")) == 32


def test_the_genes_a_small_size_makes_meaningless_are_named_per_stage() -> None:
    space = SearchSpace.load("imagenet")
    assert lost_genes(space, 224) == []
    lost = lost_genes(space, 32)
    assert len(lost) == 3 and lost[2].startswith("stage 3 (1x1 map): window 7, dilation 3, shortcut kernel 7")
