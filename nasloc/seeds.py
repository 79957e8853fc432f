"""The five seed designs in one place, each in its two forms.

* As a *preset*: the paper's published model as one arch (:data:`PRESETS`), registered with timm.
  ``import nasloc`` registers every preset and the generic ``nasloc_vit`` entry point, which builds
  any arch passed as keyword arguments (that is how exported models reload: their ``config.json``
  carries ``architecture: nasloc_vit`` and ``model_args`` = the arch).
* As a *mechanism*: pins of the micro genes (:data:`MECHANISMS`), from which
  :func:`reference_archs` builds, in any search space, the largest arch within a MACs budget that
  uses that mechanism alone (the seeds a search result is compared with).
"""
from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .arch import Arch, Block, Shortcut, Stage
from .models import LocalityViT
from .models.locality_vit import checkpoint_filter_fn, default_out_indices, pretrained_cfg
from .space import FREE, Fixed, SearchSpace, SpaceError


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


# ---------------------------------------------------------------------------- mechanisms
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


# ---------------------------------------------------------------------------- timm entry points
default_cfgs = generate_default_cfgs({name: pretrained_cfg(arch) for name, arch in {**PRESETS, GENERIC: PRESETS["nasloc_deit_tiny"]}.items()})


def create(variant: str, pretrained: bool = False, **kwargs: Any) -> LocalityViT:
    """Build a preset (or the generic entry) with timm's builder; arch fields in kwargs override."""
    base = PRESETS.get(variant, PRESETS["nasloc_deit_tiny"])
    arch_fields = {k: kwargs.pop(k) for k in list(kwargs) if k in Arch.__dataclass_fields__ and k not in ("num_classes", "img_size", "in_chans")}
    arch = Arch.from_dict({**base.to_dict(), **arch_fields}) if arch_fields else base
    out_indices = kwargs.pop("out_indices", default_out_indices(arch))
    model = build_model_with_cfg(
        LocalityViT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,  # weights of any resolution load at the model's own
        arch=arch,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )
    if isinstance(model, LocalityViT):  # built at another img_size: its data config says so (fixed input size)
        size = model.arch.img_size
        model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, "input_size": (model.arch.in_chans, size, size)}
    return model


def _entry_point(variant: str):
    def entry(pretrained: bool = False, **kwargs: Any) -> LocalityViT:
        return create(variant, pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = variant
    entry.__module__ = __name__
    entry.__doc__ = f"{variant}: a nasloc LocalityViT preset (see nasloc.seeds.PRESETS)."
    return entry


for _variant in (*PRESETS, GENERIC):
    register_model(_entry_point(_variant))
