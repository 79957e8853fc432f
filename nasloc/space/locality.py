"""How far each locality operation of a space reaches, and the image size that keeps them all meaningful.

A window of 7 on a 4x4 token map is global attention, a dilated neighbourhood wider than the map reaches past
its edges, a 7x7 shortcut kernel on a 2x2 map is a dense layer: at too small a resolution every locality gene the
search exists to choose stops meaning anything, and the archs are ranked in a regime the deployed model never
sees. :func:`locality_size` is the smallest image size at which every stage's token map is at least as wide as
the widest locality operation the space allows in that stage.
"""
from __future__ import annotations

from .search_space import SearchSpace

LIFE_REACH = 7  # LIFE's cascaded 3x3 and 5x5 depth-wise convs see 7 tokens across


def reach(space: SearchSpace, stage: int) -> dict[str, int]:
    """The reach in tokens (side of the square of tokens one output sees) of each locality operation the space
    allows in ``stage``, by what the user knows it as; empty when the stage has none."""
    choices = space.stages[stage]
    reaches = {}
    if "window" in choices.mixer:
        reaches[f"window {space.skeleton.get('window', 7)}"] = int(space.skeleton.get("window", 7))
    if "dilated" in choices.mixer:
        kernel, rate = int(space.skeleton.get("dilate_kernel", 3)), max(choices.dilation)
        reaches[f"dilation {rate}"] = (kernel - 1) * rate + 1
    if max(space.shortcut_span) > 0:
        reaches[f"shortcut kernel {max(max(k) for k in space.shortcut_kernels)}"] = max(
            max(k) for k in space.shortcut_kernels)
    if max(choices.ffn_kernel) > 0:
        reaches[f"FFN kernel {max(choices.ffn_kernel)}"] = max(choices.ffn_kernel)
    if True in choices.life:
        reaches["LIFE"] = LIFE_REACH
    return reaches


def locality_size(space: SearchSpace, floor: int = 32) -> int:
    """The smallest multiple of the space's stride, at least ``floor`` px, at which every stage's map is at least
    as wide as the widest locality operation there; capped at the deploy size."""
    patch = int(space.skeleton.get("patch_size", 16))
    needed = max([floor] + [max(reach(space, s).values(), default=1) * patch * 2**s for s in range(len(space.stages))])
    stride = space.stride
    return min(-(-needed // stride) * stride, space.img_size)


def lost_genes(space: SearchSpace, img_size: int) -> list[str]:
    """What loses its meaning at ``img_size``: per stage, the operations wider than the stage's map."""
    lost = []
    for stage in range(len(space.stages)):
        grid = space.grid(stage, img_size)
        wider = [name for name, side in reach(space, stage).items() if side > grid]
        if wider:
            lost.append(f"stage {stage + 1} ({grid}x{grid} map): {', '.join(wider)}")
    return lost
