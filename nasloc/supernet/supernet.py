"""The weight-sharing supernet of a search space.

One :class:`~nasloc.models.LocalityViT` built with the capacity of the whole space
(:func:`space_capacity`: the largest width, heads, MLP ratio and depth of every stage, every
optional branch), so that every arch of the space runs as a slice of it (weight entanglement); see
:mod:`nasloc.models.elastic`. The three mixers share the q, k, v and output projections; shortcuts,
FFN convs, LIFE convs, the BiDim gate, CPE and the global tokens are branches switched on per arch.
A space that searches the stem holds every stem it offers and runs the arch's.

``supernet(x, arch)`` runs a subnet; ``supernet.extract(arch)`` returns the standalone model with
copied weights, whose logits equal the subnet's.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from ..arch import Arch
from ..models import LocalityViT
from ..models.elastic import ElasticBatchNorm2d, load_slices_
from ..models.locality_vit import BlockCapacity, Capacity, StageCapacity
from ..space.search_space import SearchSpace


def space_capacity(space: SearchSpace, img_size: int) -> Capacity:
    """What a supernet must hold to run every arch of the space at ``img_size``."""
    skeleton = space.extreme(largest=False).replace(img_size=img_size)
    kernels = tuple(sorted({k for ks in space.shortcut_kernels for k in ks})) if any(space.shortcut_span) else ()
    stages = []
    for choices in space.stages:
        block = BlockCapacity(
            plain_qkv=True,
            life=True in choices.life,
            window="window" in choices.mixer,
            ffn_kernel=max(choices.ffn_kernel),
            shortcut_kernels=kernels,
        )
        hidden = max(int(round(d * r)) for d in choices.dim for r in choices.mlp_ratio)
        stages.append(StageCapacity(max(choices.dim), max(choices.heads), hidden, (block,) * max(choices.depth)))
    return Capacity(skeleton, tuple(stages), max(space.global_tokens), True in space.cpe, "bidim" in space.ffn, space.stem)


class Supernet(LocalityViT):
    def __init__(self, space: SearchSpace, img_size: int | None = None):
        img_size = img_size or space.img_size
        super().__init__(capacity=space_capacity(space, img_size))
        self.space = space
        self.img_size = img_size

    def at_resolution(self, arch: Arch) -> Arch:
        """The arch as this supernet runs it (its own input resolution)."""
        return arch if arch.img_size == self.img_size else arch.replace(img_size=self.img_size)

    def forward(self, x: Tensor, arch: Arch | None = None) -> Tensor:
        arch = self.at_resolution(arch or self.arch)
        return self.head_forward(self.features(x, arch), arch)

    def extract(self, arch: Arch) -> LocalityViT:
        """The standalone model of ``arch`` (at the supernet's resolution) with the weights it uses here."""
        model = LocalityViT(self.at_resolution(arch)).to(next(self.parameters()).device)
        load_slices_(model, self)
        return model.train(self.training)

    def uses_batchnorm(self) -> bool:
        return any(isinstance(m, ElasticBatchNorm2d) for m in self.modules())


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, run: "callable", batches: Iterable[Tensor]) -> None:
    """Re-estimate BatchNorm statistics for one subnet (its statistics are shared with others).

    Resets every BatchNorm's running statistics and accumulates a plain average over ``batches``
    (momentum None), calling ``run(x)`` in train mode; the model is left in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not norms:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for x in batches:
        run(x)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    model.eval()
