"""LocalityViT: the one model family of nasloc, built from an :class:`~nasloc.arch.Arch`.

The network is built from a :class:`Capacity` (the largest size and every option each layer must
support) and run with an arch. A standalone model's capacity is its own arch, so it holds exactly
the weights the arch needs; the supernet (:mod:`nasloc.supernet`) is a LocalityViT built with the
capacity of a whole search space, which runs any arch of it as a slice.

timm conventions: ``forward_features`` returns the normalised tokens (B, N, C), ``forward_head``
pools and classifies, ``forward_intermediates`` serves ``features_only=True``; :func:`pretrained_cfg`
and :func:`default_out_indices` describe any arch to timm, and :func:`checkpoint_filter_fn` loads weights
trained at one resolution into a model built at another. The named presets and their timm entry points
are in :mod:`nasloc.space.seed_designs`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table_simple, trunc_normal_
from timm.models import checkpoint
from torch import Tensor, nn

from ..arch import Arch, Block, Stage
from .attention import TokenMixer
from .downsample import make_downsample
from .dw_shortcut import DWShortcut
from .elastic import ElasticLayerNorm, ElasticLinear, ElasticParameter
from .heads import Neck, pool
from .layout import Geometry, Tokens, add, to_map, tokenwise
from .localvit import LocalityFFN
from .mlp import Mlp
from .pos_embed import ConvPosEnc
from .stems import make_stem


# ------------------------------------------------------------------------------------ capacity
@dataclass(frozen=True)
class BlockCapacity:
    plain_qkv: bool = True
    life: bool = False
    window: bool = False  # the window mixer can be used (relative position table)
    ffn_kernel: int = 0  # largest FFN depth-wise kernel (0 = never)
    shortcut_kernels: tuple[int, ...] = ()  # kernels of a shortcut that may start at this block


@dataclass(frozen=True)
class StageCapacity:
    dim: int
    heads: int
    hidden: int
    blocks: tuple[BlockCapacity, ...]


@dataclass(frozen=True)
class Capacity:
    """What a network must hold. ``skeleton`` is an arch whose skeleton fields (stem, head, ...) are
    shared by every arch the network runs."""

    skeleton: Arch
    stages: tuple[StageCapacity, ...]
    global_tokens: int  # the most global tokens
    cpe: bool = False  # some arch uses the conditional position encoding
    ffn_gate: bool = False  # some arch uses the BiDim gate (ffn "bidim")
    stems: tuple[str, ...] = ()  # every stem some arch uses (empty: the skeleton's alone)

    @classmethod
    def of_arch(cls, arch: Arch) -> "Capacity":
        starts = {sc.start: sc.kernels for sc in arch.shortcuts}
        stages = []
        for s, stage in enumerate(arch.stages):
            offset = sum(st.depth for st in arch.stages[:s])
            blocks = tuple(
                BlockCapacity(
                    plain_qkv=not b.life,
                    life=b.life,
                    window=b.mixer == "window",
                    ffn_kernel=b.ffn_kernel,
                    shortcut_kernels=starts.get(offset + i, ()),
                )
                for i, b in enumerate(stage.blocks)
            )
            stages.append(StageCapacity(stage.dim, stage.heads, stage.hidden, blocks))
        return cls(arch, tuple(stages), arch.global_tokens, arch.cpe, arch.ffn == "bidim", (arch.stem,))


# ------------------------------------------------------------------------------------ blocks
class LocalityBlock(nn.Module):
    def __init__(self, cap: Capacity, stage: StageCapacity, block: BlockCapacity, window: int, drop_path: float):
        super().__init__()
        arch, dim = cap.skeleton, stage.dim
        eps = arch.norm_eps
        self.cpe = ConvPosEnc(dim) if cap.cpe else None
        self.norm1 = ElasticLayerNorm(dim, eps)
        self.attn = TokenMixer(
            dim,
            stage.heads,
            qkv_bias=arch.qkv_bias,
            plain=block.plain_qkv,
            life=block.life,
            window=window if block.window else 0,
            broadcast=block.window and cap.global_tokens > 0,
        )
        if arch.ffn == "localvit":
            self.norm2, self.ffn = None, LocalityFFN(dim, stage.hidden, block.ffn_kernel)
        else:
            self.norm2 = ElasticLayerNorm(dim, eps)
            self.ffn = Mlp(dim, stage.hidden, block.ffn_kernel, gate=cap.ffn_gate)
        self.shortcut = DWShortcut(dim, block.shortcut_kernels) if block.shortcut_kernels else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()  # nasloc's, on Tokens

    @staticmethod
    def runs_joined(arch: Arch, block: Block) -> bool:
        """Whether the block runs on joined tokens (global attention, nothing that sees the image tokens alone)
        or apart (:class:`~nasloc.models.layout.Tokens`)."""
        return block.mixer == "global" and not (block.life or block.ffn_kernel or arch.cpe or arch.ffn == "localvit")

    def forward(self, x: Tokens, geo: Geometry, arch: Arch, stage: Stage, block: Block, window: int) -> Tokens:
        x = x.in_form(joined=self.runs_joined(arch, block))
        if arch.cpe:
            x = x.with_img(self.cpe(x.img, geo))
        mixed = self.attn(tokenwise(self.norm1, x), geo, stage.heads, block, arch.qkv_bias, window, arch.dilate_kernel)
        x = add(self.drop_path(mixed), x)  # in the form of the mixer's output
        if self.norm2 is None:  # LocalViT's FFN carries its own residual and no drop-path
            return self.ffn(x, geo, stage.hidden, block.ffn_kernel)
        ffn = self.ffn(tokenwise(self.norm2, x), geo, stage.hidden, block.ffn_kernel, gate=arch.ffn == "bidim")
        return add(x, self.drop_path(ffn))


class DropPath(nn.Module):
    """timm's DropPath (stochastic depth) on :class:`Tokens`: one draw per sample drops the residual branch
    for all of its tokens."""

    def __init__(self, prob: float):
        super().__init__()
        self.prob = prob

    def forward(self, x: Tokens) -> Tokens:
        if not self.training:
            return x
        keep = 1 - self.prob
        t = x.either()
        mask = t.new_empty(t.shape[0], 1, 1).bernoulli_(keep).div_(keep)
        return tokenwise(lambda t: t * mask, x)


class LocalityStage(nn.Module):
    def __init__(self, downsample: nn.Module | None, blocks: Iterable[LocalityBlock]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.ModuleList(blocks)


# ------------------------------------------------------------------------------------ model
# Keyword arguments timm's train.py may pass that have no meaning for this family.
_TIMM_IGNORED = {"drop_block_rate", "bn_momentum", "bn_eps", "attn_drop_rate", "proj_drop_rate", "pos_drop_rate"}


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _resolve_arch(arch: Arch | dict | None, overrides: dict[str, Any]) -> Arch:
    """Apply timm-style keyword overrides (num_classes, img_size, in_chans, ...) to an arch."""
    base = Arch.from_dict(arch) if arch is not None else None
    if base is None:
        raise ValueError("LocalityViT needs an arch (an nasloc.arch.Arch or its dict)")
    if "img_size" in overrides and isinstance(overrides["img_size"], Sequence):
        side = set(overrides["img_size"])
        if len(side) != 1:
            raise ValueError(f"img_size: nasloc models take square inputs, got {overrides['img_size']}")
        overrides["img_size"] = side.pop()
    pool = overrides.pop("global_pool", None)
    if pool in ("token", "avg"):
        overrides["head"] = pool
    return Arch.from_dict({**base.to_dict(), **overrides}) if overrides else base


class LocalityViT(nn.Module):
    """A vision transformer whose every locality choice comes from its arch."""

    def __init__(
        self,
        arch: Arch | dict | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        *,
        capacity: Capacity | None = None,
        **kwargs: Any,
    ):
        """Holds exactly what ``arch`` needs (timm's keyword overrides applied), or, given a
        ``capacity`` instead, room for every arch it covers (the supernet, :mod:`nasloc.supernet`)."""
        super().__init__()
        kwargs = {k: v for k, v in kwargs.items() if k not in _TIMM_IGNORED}
        if capacity is not None and (arch is not None or kwargs):
            raise ValueError("LocalityViT takes an arch (with overrides) or a capacity, not both")
        capacity = capacity or Capacity.of_arch(_resolve_arch(arch, kwargs))
        self.arch = capacity.skeleton
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self._build(capacity, drop_path_rate)

    # -------------------------------------------------------------------------------- build
    def _build(self, cap: Capacity, drop_path_rate: float = 0.0) -> None:
        arch = cap.skeleton
        first, last = cap.stages[0], cap.stages[-1]
        self.num_classes = arch.num_classes
        self.embed_dim = last.dim
        self.num_features = self.head_hidden_size = arch.neck_dim if arch.head == "neck" else last.dim
        self.stem = make_stem(arch, first.dim, cap.stems or (arch.stem,))
        grid = arch.grid(0)
        self.cls_token = ElasticParameter(1, 1, first.dim) if arch.cls_token else None
        self.pos_embed = ElasticParameter(1, int(arch.cls_token) + grid * grid, first.dim) if arch.pos_embed == "absolute" else None
        self.global_tokens = ElasticParameter(1, cap.global_tokens, first.dim) if cap.global_tokens else None
        has_aux = arch.cls_token or cap.global_tokens > 0
        depth = sum(len(s.blocks) for s in cap.stages)
        rates = torch.linspace(0, drop_path_rate, depth).tolist() if depth > 1 else [drop_path_rate]
        stages, index = [], 0
        for s, stage in enumerate(cap.stages):
            down = make_downsample(arch, cap.stages[s - 1].dim, stage.dim, has_aux) if s else None
            window = arch.window_size(s)
            blocks = []
            for block in stage.blocks:
                blocks.append(LocalityBlock(cap, stage, block, window, rates[index]))
                index += 1
            stages.append(LocalityStage(down, blocks))
        self.stages = nn.ModuleList(stages)
        self.norm = ElasticLayerNorm(last.dim, arch.norm_eps)
        self.neck = Neck(last.dim, arch.neck_dim) if arch.head == "neck" else None
        self.head_drop = nn.Dropout(self.drop_rate)
        self.head = ElasticLinear(self.num_features, arch.num_classes) if arch.num_classes else nn.Identity()
        self.feature_info = self._feature_info(arch)
        self.apply(_init_weights)

    def _feature_info(self, arch: Arch) -> list[dict[str, Any]]:
        return [
            dict(module=f"stages.{s}.blocks.{b}", num_chs=arch.stages[s].dim, reduction=arch.patch_size * 2**s)
            for _, s, b, _ in arch.iter_blocks()
        ]

    # -------------------------------------------------------------------------------- forward
    def embed(self, x: Tensor, arch: Arch) -> tuple[Tokens, Geometry]:
        dim, n_cls = arch.stages[0].dim, int(arch.cls_token)
        img = self.stem(x, arch)
        b = img.shape[0]
        aux = []
        if self.cls_token is not None:
            aux.append(self.cls_token(1, 1, dim))
        if self.pos_embed is not None:  # the class token has its own entry; global tokens have none
            pos_cls, pos_img = self.pos_embed(1, n_cls + img.shape[1], dim).split([n_cls, img.shape[1]], dim=1)
            img = img + pos_img
            aux = [aux[0] + pos_cls] if n_cls else aux
        if arch.global_tokens:
            aux.append(self.global_tokens(1, arch.global_tokens, dim))
        grid = arch.grid(0)
        aux_tokens = torch.cat(aux, dim=1).expand(b, -1, -1) if aux else None
        return Tokens.of_parts(aux_tokens, img), Geometry(grid, grid, n_cls, arch.global_tokens)

    def run_blocks(self, x: Tensor, arch: Arch):
        """Run the network block by block; yields (global block index, stage index, tokens, geometry)."""
        x, geo = self.embed(x, arch)
        starts = {sc.start: sc for sc in arch.shortcuts}
        pending = None  # (input of the first bypassed block, the block owning the shortcut, its arch)
        for index, s, b, _ in arch.iter_blocks():
            stage_arch, stage = arch.stages[s], self.stages[s]
            if b == 0 and s > 0:
                x = stage.downsample(x, geo, stage_arch.dim)
                geo = geo.halved()
            block = stage.blocks[b]
            if index in starts:
                pending = (x.img, block, starts[index])
            args = (geo, arch, stage_arch, stage_arch.blocks[b], arch.window_size(s))
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, *args)
            else:
                x = block(x, *args)
            if pending is not None and index == pending[2].start + pending[2].span - 1:
                shortcut_input, owner, shortcut = pending
                x = x.with_img(x.img + owner.shortcut(shortcut_input, geo, shortcut.kernels))
                pending = None
            yield index, s, x, geo

    def features(self, x: Tensor, arch: Arch) -> Tensor:
        for *_, x, _geo in self.run_blocks(x, arch):
            pass
        return self.norm(x.whole())

    def head_forward(self, x: Tensor, arch: Arch, pre_logits: bool = False) -> Tensor:
        x = self.head_drop(pool(x, arch, self.neck))
        return x if pre_logits else self.head(x)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x, self.arch)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head_forward(x, self.arch, pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Image-token maps (B, C, H, W) after the selected blocks (timm's features_only). The final norm is of
        the last stage's width: ``norm`` and the returned final features apply it within the last stage only
        (as timm's pyramids do); with ``stop_early``, the final features are those of the last block run."""
        from timm.models._features import feature_take_indices

        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt: {output_fmt!r} is not NCHW or NLC")
        take, max_index = feature_take_indices(self.arch.depth, indices)
        last_stage = len(self.arch.stages) - 1
        intermediates = []
        for index, stage, tokens, geo in self.run_blocks(x, self.arch):
            if index in take:
                img = self.norm(tokens.img) if norm and stage == last_stage else tokens.img
                intermediates.append(to_map(img, geo) if output_fmt == "NCHW" else img)
            last, last_in = tokens, stage
            if stop_early and index >= max_index:
                break
        if intermediates_only:
            return intermediates
        return (self.norm(last.whole()) if last_in == last_stage else last.whole()), intermediates

    # -------------------------------------------------------------------------------- timm API
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {
            name
            for name, _ in self.named_parameters()
            if name.split(".")[0] in ("cls_token", "pos_embed", "global_tokens") or ".rel_pos.table" in name
        }

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^cls_token|^pos_embed|^global_tokens|^stem",
            blocks=[(r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        changes: dict[str, Any] = {"num_classes": num_classes}
        if global_pool in ("token", "avg"):
            changes["head"] = global_pool
        self.arch = self.arch.replace(**changes)
        if self.arch.head != "neck":  # LightViT's neck goes with its pooling: the head reads the last stage
            self.neck = None
            self.num_features = self.head_hidden_size = self.arch.stages[-1].dim
        self.num_classes = num_classes
        self.head = ElasticLinear(self.num_features, num_classes) if num_classes else nn.Identity()


def default_out_indices(arch: Arch) -> list[int]:
    """features_only default: the last block of every stage, or the last three of a columnar net."""
    if arch.family == "columnar":
        return list(range(max(arch.depth - 3, 0), arch.depth))
    ends, total = [], 0
    for stage in arch.stages:
        total += stage.depth
        ends.append(total - 1)
    return ends


EVAL_CROP_PCT = 0.875  # DeiT's eval crop: what nasloc's trainings evaluate with and what exports declare


def pretrained_cfg(arch: Arch, **extra: Any) -> dict[str, Any]:
    """timm's pretrained cfg of an arch (input size, normalisation, crop, first conv, classifier)."""
    first_conv = {"patch": "stem.proj", "conv": "stem.conv1", "lightvit": "stem.conv1", "overlap": "stem.convs.0"}[arch.stem]
    return dict(
        url="",
        num_classes=arch.num_classes,
        input_size=(arch.in_chans, arch.img_size, arch.img_size),
        pool_size=None,
        crop_pct=EVAL_CROP_PCT,
        interpolation="bicubic",
        fixed_input_size=True,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        first_conv=first_conv,
        classifier="head",
        license="apache-2.0",
        **extra,
    )


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: LocalityViT) -> dict[str, Tensor]:
    """``state_dict``, trained at any resolution, made to fit ``model``'s resolution (timm's filter hook).

    Only two kinds of weights depend on the resolution: the absolute position embedding (one entry per
    token of the first map) and the window mixer's relative position tables (one per offset inside a
    window, and windows shrink with the map below the deploy resolution). Both are resampled bicubically,
    as timm's ViT and Swin filters do; everything else passes through, so the model's own resolution
    loads exactly.
    """
    target = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        wanted = target.get(key)
        if wanted is not None and value.shape != wanted.shape:
            if key == "pos_embed.value":
                grid = model.arch.grid(0)
                value = resample_abs_pos_embed(value, [grid, grid], num_prefix_tokens=int(model.arch.cls_token))
            elif key.endswith(".rel_pos.table.value"):
                window = model.get_submodule(key[: -len(".table.value")]).window
                value = resize_rel_pos_bias_table_simple(value, (window, window), tuple(wanted.shape))
        out[key] = value
    return out
