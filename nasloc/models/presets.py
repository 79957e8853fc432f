"""The seed papers' published models, each as one arch (:data:`PRESETS`, listed by ``nasloc presets``).

They are registered with timm by :mod:`nasloc.models.registry`, with the generic ``nasloc_vit`` entry
(:data:`GENERIC`) that builds any arch passed as keyword arguments."""
from __future__ import annotations

from typing import Any

from ..arch import Arch, Block, Shortcut, Stage


# ---------------------------------------------------------------------------- presets
def columnar(dim: int, heads: int, depth: int = 12, mlp_ratio: float = 4.0, block: Block = Block(), **skeleton: Any) -> Arch:
    """DeiT-like: 16x16 patch embedding, class token, absolute position embedding, one stage."""
    settings = dict(stem="patch", patch_size=16, cls_token=True, pos_embed="absolute", head="token")
    return Arch(stages=(Stage(dim, heads, mlp_ratio, (block,) * depth),), **{**settings, **skeleton})


def lightvit(dims: tuple[int, ...], heads: tuple[int, ...], depths: tuple[int, ...], tokens: int, **skeleton: Any) -> Arch:
    """LightViT: conv stem (stride 8), window attention with global tokens, BiDim FFN, neck head."""
    ratios = (8, 4, 4)
    stages = tuple(Stage(d, h, r, (Block(mixer="window"),) * n) for d, h, r, n in zip(dims, heads, ratios, depths))
    settings = dict(
        stem="lightvit", patch_size=8, downsample="merge", pos_embed="none", cls_token=False,
        global_tokens=tokens, window=7, head="neck", ffn="bidim",
    )
    return Arch(stages=stages, **{**settings, **skeleton})


def dilateformer(dims: tuple[int, ...], heads: tuple[int, ...], depths: tuple[int, ...], **skeleton: Any) -> Arch:
    """DilateFormer: overlapping stem, CPE, dilated attention (rates 1, 2, 3) in stages 1-2, global after."""
    stages = []
    for s, (d, h, n) in enumerate(zip(dims, heads, depths)):
        rates = tuple(sorted([1, 2, 3] * (h // 3)))
        block = Block(mixer="dilated", dilations=rates) if s < 2 else Block()
        stages.append(Stage(d, h, 4.0, (block,) * n))
    settings = dict(stem="overlap", patch_size=4, downsample="conv", pos_embed="none", cpe=True, cls_token=False, head="avg")
    return Arch(stages=tuple(stages), **{**settings, **skeleton})


def _dw_everywhere(depth: int) -> tuple[Shortcut, ...]:
    return tuple(Shortcut(start=i, span=1, kernels=(3,)) for i in range(depth))


PRESETS: dict[str, Arch] = {
    "nasloc_deit_tiny": columnar(192, 3),
    "nasloc_dw_vit_tiny": columnar(192, 3, num_classes=10, qkv_bias=False, norm_eps=1e-5, shortcuts=_dw_everywhere(12)),
    "nasloc_localvit_tiny": columnar(192, 4, block=Block(ffn_kernel=3), ffn="localvit"),
    "nasloc_localvit_small": columnar(384, 8, block=Block(ffn_kernel=3), ffn="localvit"),
    "nasloc_life_deit_tiny": columnar(192, 3, block=Block(life=True), num_classes=100),
    "nasloc_lightvit_tiny": lightvit((64, 128, 256), (2, 4, 8), (2, 6, 6), tokens=8),
    "nasloc_lightvit_small": lightvit((96, 192, 384), (3, 6, 12), (2, 6, 6), tokens=16),
    "nasloc_dilateformer_tiny": dilateformer((72, 144, 288, 576), (3, 6, 12, 24), (2, 2, 6, 2)),
    "nasloc_dilateformer_small": dilateformer((72, 144, 288, 576), (3, 6, 12, 24), (3, 5, 8, 3)),
}


# The paper each preset reproduces (``nasloc presets`` lists them).
PAPERS: dict[str, str] = {
    "nasloc_deit_tiny": "DeiT (Touvron et al. 2021, arXiv 2012.12877)",
    "nasloc_dw_vit_tiny": "Efficient ViT with DW (Zhang et al. 2025, arXiv 2407.19394)",
    "nasloc_localvit_tiny": "LocalViT (Li et al. 2021, arXiv 2104.05707)",
    "nasloc_localvit_small": "LocalViT (Li et al. 2021, arXiv 2104.05707)",
    "nasloc_life_deit_tiny": "LIFE (Akkaya et al. 2024, arXiv 2305.08551)",
    "nasloc_lightvit_tiny": "LightViT (Huang et al. 2022, arXiv 2207.05557)",
    "nasloc_lightvit_small": "LightViT (Huang et al. 2022, arXiv 2207.05557)",
    "nasloc_dilateformer_tiny": "DilateFormer (Jiao et al. 2023, arXiv 2302.01791)",
    "nasloc_dilateformer_small": "DilateFormer (Jiao et al. 2023, arXiv 2302.01791)",
}
GENERIC = "nasloc_vit"  # builds the arch given as keyword arguments; defaults to DeiT-Ti
