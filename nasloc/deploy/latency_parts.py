"""The parts of an arch that the latency table times one by one, and the small models that time them.

An arch is cut the way :func:`nasloc.space.flops.count` walks it: the stem (with the class, global and position
tokens), every block, the downsampling between stages, every depth-wise conv shortcut and the head. Each
part is named by a key, ``"<kind> <json fields>"``, holding exactly what its time depends on (its token
map, width, and its own choices), so equal parts of different archs share one entry of the table.

A block is the product of its token mixer (mixer, heads, dilation rates, LIFE), its FFN (MLP ratio, FFN
conv, FFN kind) and the conditional position encoding; timing every combination would take tens of
thousands of blocks. The two halves run one after the other, so a block's time is additive in them, and
each half is timed inside a whole block next to a fixed *base* half (global attention with one head, an
MLP of ratio 1 without conv, no CPE)::

    block(mixer, ffn, cpe) = attention(mixer) + ffn(ffn) [+ cpe] - base [- base]

where ``attention`` is the block (mixer, base FFN), ``ffn`` the block (base mixer, ffn), ``cpe`` the base
block with the CPE, and ``base`` the base block: the base cancels out. Every part is timed through the same
calls :meth:`LocalityViT.run_blocks` makes, on a one-block model built for it (:func:`probe`).

Dilation rates are keyed sorted: heads of equal rate run together, whichever heads they are.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from itertools import combinations_with_replacement
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ..arch import Arch, Block, Shortcut, Stage
from ..models import LocalityViT
from ..models.layout import Geometry, Tokens
from ..space.search_space import SearchSpace


def part_key(kind: str, **fields: Any) -> str:
    return f"{kind} {json.dumps(fields, sort_keys=True, separators=(',', ':'))}"


def split_key(key: str) -> tuple[str, dict[str, Any]]:
    kind, fields = key.split(" ", 1)
    return kind, json.loads(fields)


# ------------------------------------------------------------------------------------------- parts of an arch
def arch_parts(arch: Arch) -> Counter[str]:
    """Part key -> how many times the arch runs it (the base block counts negative, see the module)."""
    parts: Counter[str] = Counter({_stem(arch): 1, _head(arch): 1})
    for s in range(1, len(arch.stages)):
        parts[_downsample(arch, s)] += 1
    for _, s, _, block in arch.iter_blocks():
        parts.update(_block(arch, s, block))
    stage_of = {index: s for index, s, _, _ in arch.iter_blocks()}
    for shortcut in arch.shortcuts:
        parts[_shortcut(arch, stage_of[shortcut.start], shortcut.kernels)] += 1
    return parts


def _tokens(arch: Arch, s: int) -> dict[str, Any]:
    """The token map of stage ``s``: side, class token, global tokens."""
    return dict(grid=arch.grid(s), cls=int(arch.cls_token), global_tokens=arch.global_tokens)


def _stem(arch: Arch) -> str:
    return part_key("stem", stem=arch.stem, patch_size=arch.patch_size, in_chans=arch.in_chans, img_size=arch.img_size,
                    dim=arch.stages[0].dim, cls=int(arch.cls_token), global_tokens=arch.global_tokens,
                    pos_embed=arch.pos_embed)


def _head(arch: Arch) -> str:
    last = len(arch.stages) - 1
    return part_key("head", **_tokens(arch, last), dim=arch.stages[last].dim, head=arch.head,
                    neck_dim=arch.neck_dim if arch.head == "neck" else 0, num_classes=arch.num_classes,
                    eps=arch.norm_eps)


def _downsample(arch: Arch, s: int) -> str:
    return part_key("downsample", **_tokens(arch, s - 1), downsample=arch.downsample, dim_in=arch.stages[s - 1].dim,
                    dim_out=arch.stages[s].dim, eps=arch.norm_eps)


def _shortcut(arch: Arch, s: int, kernels: tuple[int, ...]) -> str:
    return part_key("shortcut", **_tokens(arch, s), dim=arch.stages[s].dim, kernels=list(kernels))


def _block(arch: Arch, s: int, block: Block) -> Counter[str]:
    stage = arch.stages[s]
    base = dict(_tokens(arch, s), dim=stage.dim, qkv_bias=arch.qkv_bias, eps=arch.norm_eps, heads=1, mixer="global",
                dilations=[], life=False, hidden=stage.dim, ffn_kernel=0, ffn="mlp", cpe=False)
    attention = dict(base, heads=stage.heads, mixer=block.mixer, dilations=sorted(block.dilations), life=block.life)
    if block.mixer == "window":
        attention["window"] = arch.window_size(s)
    if block.mixer == "dilated":
        attention["dilate_kernel"] = arch.dilate_kernel
    ffn = dict(base, hidden=stage.hidden, ffn_kernel=block.ffn_kernel, ffn=arch.ffn)
    halves = [attention, ffn] + ([dict(base, cpe=True)] if arch.cpe else [])
    parts = Counter(part_key("block", **half) for half in halves)
    parts[part_key("block", **base)] -= len(halves) - 1
    return parts


# ------------------------------------------------------------------------------------------- parts of a space
def space_parts(space: SearchSpace) -> set[str]:
    """Every part any arch of ``space`` runs (at its deploy resolution): what a table for it must hold."""
    ref = space.sample(random.Random(0))
    return {key for variant in _variants(space, ref) for key in arch_parts(variant)}


def _variants(space: SearchSpace, ref: Arch) -> Iterator[Arch]:
    """One-block-per-stage archs that together run every part of the space: each gene's options in every
    context (token map, width, global tokens) it can meet."""
    last = len(space.stages) - 1
    for tokens in space.global_tokens:
        for stem in space.stem or (ref.stem,):
            for dim in space.stages[0].dim:
                yield _variant(ref, stem=stem, global_tokens=tokens, dims={0: dim})
        for dim in space.stages[last].dim:
            yield _variant(ref, global_tokens=tokens, dims={last: dim})
        for s in range(1, last + 1):
            for dim_in in space.stages[s - 1].dim:
                for dim_out in space.stages[s].dim:
                    yield _variant(ref, global_tokens=tokens, dims={s - 1: dim_in, s: dim_out})
        for s, choices in enumerate(space.stages):
            for dim in choices.dim:
                yield from _block_variants(space, ref, s, dim, tokens)


def _block_variants(space: SearchSpace, ref: Arch, s: int, dim: int, tokens: int) -> Iterator[Arch]:
    choices = space.stages[s]
    for heads in choices.heads:
        for mixer in choices.mixer:
            rates = combinations_with_replacement(choices.dilation, heads) if mixer == "dilated" else [()]
            for dilations in rates:
                for life in choices.life:
                    block = Block(mixer=mixer, dilations=tuple(dilations), life=life)
                    yield _variant(ref, global_tokens=tokens, dims={s: dim}, heads={s: heads}, block=(s, block))
    for ratio in choices.mlp_ratio:
        for kernel in choices.ffn_kernel:
            for ffn in space.ffn:
                yield _variant(ref, global_tokens=tokens, ffn=ffn, dims={s: dim}, ratios={s: ratio},
                               block=(s, Block(ffn_kernel=kernel)))
    for cpe in space.cpe:
        yield _variant(ref, global_tokens=tokens, cpe=cpe, dims={s: dim})
    if space.shortcut_span != (0,):
        for kernels in space.shortcut_kernels:
            yield _variant(ref, global_tokens=tokens, dims={s: dim}, shortcut=(s, kernels))


def _variant(ref: Arch, *, dims: dict[int, int], heads: dict[int, int] | None = None,
             ratios: dict[int, float] | None = None, block: tuple[int, Block] | None = None,
             shortcut: tuple[int, tuple[int, ...]] | None = None, **skeleton: Any) -> Arch:
    """``ref`` with one block per stage (a plain one, or ``block`` in its stage) and the given changes."""
    heads, ratios = heads or {}, ratios or {}
    stages = []
    for s, stage in enumerate(ref.stages):
        dim = dims.get(s, stage.dim)
        count = heads.get(s, stage.heads if dim % stage.heads == 0 else 1)
        one = block[1] if block is not None and block[0] == s else Block()
        stages.append(Stage(dim, count, ratios.get(s, stage.mlp_ratio), (one,)))
    shortcuts = () if shortcut is None else (Shortcut(start=shortcut[0], kernels=shortcut[1]),)
    return ref.replace(stages=tuple(stages), shortcuts=shortcuts, **skeleton)


# ------------------------------------------------------------------------------------------- probes
class Probe(nn.Module):
    """One part of a LocalityViT, called as :meth:`LocalityViT.run_blocks` and ``forward`` call it."""

    def __init__(self, arch: Arch, kind: str):
        super().__init__()
        self.arch, self.kind = arch, kind
        self.model = LocalityViT(arch).eval()
        self.geo = Geometry(arch.grid(0), arch.grid(0), int(arch.cls_token), arch.global_tokens)

    def forward(self, x: Tensor) -> Tensor:
        """x: images (stem) or tokens (B, n_aux + H*W, C), joined; returns a tensor (ONNX takes no other)."""
        model, arch, geo = self.model, self.arch, self.geo
        if self.kind == "stem":
            return model.embed(x, arch)[0].whole()
        if self.kind == "head":
            return model.head_forward(model.norm(x), arch)
        tokens = Tokens.of_joined(x, geo.n_aux)  # a block converts as it needs (a small copy at latency batches)
        if self.kind == "downsample":
            return model.stages[1].downsample(tokens, geo, arch.stages[1].dim).whole()
        if self.kind == "shortcut":
            return tokens.img + model.stages[0].blocks[0].shortcut(tokens.img, geo, arch.shortcuts[0].kernels)
        stage = arch.stages[0]
        return model.stages[0].blocks[0](tokens, geo, arch, stage, stage.blocks[0], arch.window_size(0)).whole()


def probe(key: str, batch_size: int) -> tuple[Probe, Tensor]:
    """(module, input) whose ``module(input)`` runs the part ``key`` on ``batch_size`` images (CPU, eval mode)."""
    kind, f = split_key(key)
    if kind == "stem":
        arch = _probe_arch(f, [f["dim"]], stem=f["stem"], patch_size=f["patch_size"], img_size=f["img_size"],
                           in_chans=f["in_chans"], pos_embed=f["pos_embed"])
        return Probe(arch, "stem"), torch.randn(batch_size, f["in_chans"], f["img_size"], f["img_size"])
    if kind == "head":
        arch = _probe_arch(f, [f["dim"]], head=f["head"], neck_dim=f["neck_dim"] or 1280, num_classes=f["num_classes"],
                           norm_eps=f["eps"])
        return Probe(arch, "head"), _tokens_input(f, f["dim"], batch_size)
    if kind == "downsample":
        arch = _probe_arch(f, [f["dim_in"], f["dim_out"]], downsample=f["downsample"], norm_eps=f["eps"])
        return Probe(arch, "downsample"), _tokens_input(f, f["dim_in"], batch_size)
    if kind == "shortcut":
        arch = _probe_arch(f, [f["dim"]], shortcuts=(Shortcut(start=0, kernels=tuple(f["kernels"])),))
        return Probe(arch, "shortcut"), _tokens_input(f, f["dim"], batch_size)
    block = Block(mixer=f["mixer"], dilations=tuple(f["dilations"]), life=f["life"], ffn_kernel=f["ffn_kernel"])
    stage = Stage(f["dim"], f["heads"], f["hidden"] / f["dim"], (block,))
    arch = _probe_arch(f, [], stages=(stage,), qkv_bias=f["qkv_bias"], norm_eps=f["eps"], ffn=f["ffn"], cpe=f["cpe"],
                       window=f.get("window", 7), dilate_kernel=f.get("dilate_kernel", 3))
    return Probe(arch, "block"), _tokens_input(f, f["dim"], batch_size)


def _probe_arch(f: dict[str, Any], dims: list[int], **fields: Any) -> Arch:
    """An arch of one-block stages of widths ``dims`` on the part's token map (1-pixel patches)."""
    fields.setdefault("stages", tuple(Stage(dim, 1, 1.0, (Block(),)) for dim in dims))
    defaults = dict(img_size=f.get("grid", 1), patch_size=1, pos_embed="none", head="avg", num_classes=0)
    return Arch(**{**defaults, **fields, "cls_token": bool(f["cls"]), "global_tokens": f["global_tokens"]})


def _tokens_input(f: dict[str, Any], dim: int, batch_size: int) -> Tensor:
    return torch.randn(batch_size, f["cls"] + f["global_tokens"] + f["grid"] ** 2, dim)
