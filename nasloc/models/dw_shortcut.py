"""Depth-wise conv shortcut (Zhang et al., "Efficient ViT with DW", Neurocomputing 2025).

A module parallel to one or more consecutive transformer blocks: it takes the input of the first
bypassed block and its output is added to the output of the last one (span N, no weight sharing).
Each kernel of the kernel set is its own GELU -> BatchNorm -> depth-wise kxk branch; the branches run
in parallel and are summed. Auxiliary tokens (class, global) receive a zero local term.

Kernels of a set are separate weights, not centre crops of each other: in a parallel set they are
used at the same time, and a shared centre would collapse {3, 5} into one 5x5 conv.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .elastic import ElasticBatchNorm2d, ElasticConv2d
from .layout import Geometry, to_map, to_tokens


class DWBranch(nn.Module):
    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.norm = ElasticBatchNorm2d(dim)
        self.conv = ElasticConv2d(dim, dim, kernel, bias=True, depthwise=True)

    def forward(self, activated: Tensor) -> Tensor:
        return self.conv(self.norm(activated))


class DWShortcut(nn.Module):
    def __init__(self, dim: int, kernels: tuple[int, ...]):
        super().__init__()
        self.branches = nn.ModuleDict({f"k{k}": DWBranch(dim, k) for k in kernels})

    def forward(self, img: Tensor, geo: Geometry, kernels: tuple[int, ...]) -> Tensor:
        """img: the image tokens entering the first bypassed block; returns the term added to the image
        tokens after the last (the auxiliary tokens get none)."""
        activated = F.gelu(to_map(img, geo))  # shared by the branches: GELU has no weights
        return to_tokens(sum(self.branches[f"k{k}"](activated) for k in kernels))
