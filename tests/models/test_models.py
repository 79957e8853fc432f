"""The model family: seed presets against the published numbers, every locality mechanism end to end,
the analytic MACs/params counter against fvcore, and the timm API.

MACs follow the seeds' and fvcore's convention: one multiply-add is one FLOP (GMACs below).
"""
from __future__ import annotations

import math
import random

import pytest
import timm
import timm.optim
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import nasloc
from nasloc.arch import Arch, Block, Shortcut, Stage
from nasloc.deploy.macs import fvcore_macs
from nasloc.models import LocalityViT
from nasloc.models.dilated import fused_dilated_attention, masked_dense_attention, shift_multiply_attention
from nasloc.models.layout import Geometry, Tokens
from nasloc.models.locality_vit import pretrained_cfg
from nasloc.models.presets import GENERIC, PRESETS
from nasloc.space.flops import count
from nasloc.space.search_space import SearchSpace

# name -> (params in M, GMACs at 224) from the issue; params exact to 0.2 %, GMACs within 2 %.
PUBLISHED = {
    "nasloc_deit_tiny": (5.717, 1.258),
    "nasloc_dw_vit_tiny": (5.547, 1.263),  # 10 classes
    "nasloc_localvit_tiny": (5.909, 1.279),
    "nasloc_life_deit_tiny": (5.617, 1.274),  # 100 classes
    "nasloc_lightvit_tiny": (9.378, 0.781),
    "nasloc_dilateformer_tiny": (17.24, 3.177),
    "nasloc_lightvit_small": (19.200, 1.839),  # LightViT-S
    "nasloc_localvit_small": (22.433, 4.642),  # LocalViT-S
    "nasloc_dilateformer_small": (24.06, 4.613),  # DilateFormer-S
}
SPACES = ("tiny", "tiny_columnar", "cifar", "imagenet")


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def param_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def forward_backward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One training forward + backward; every parameter must receive a finite gradient."""
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out.float().pow(2).mean() + out.float().mean()).backward()
    assert torch.isfinite(out).all()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters that take no part in the forward: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    return out


# ------------------------------------------------------------------------------------------- presets
def test_every_preset_is_in_the_table():
    assert set(PRESETS) == set(PUBLISHED)


@pytest.fixture(scope="module", params=sorted(PUBLISHED))
def preset(request):
    """(name, model built by timm, fvcore MACs at 224); one build and one fvcore run per preset."""
    name = request.param
    model = timm.create_model(name)
    return name, model, fvcore_macs(model, 224)


def test_preset_params_match_paper(preset):
    name, model, _ = preset
    published = PUBLISHED[name][0] * 1e6
    assert n_params(model) == pytest.approx(published, rel=2e-3)


def unread_aux_keys_values(arch: Arch) -> int:
    """MACs of the keys and values of the auxiliary tokens in local mixers: the official LightViT makes them
    (one qkv linear over all tokens, its FLOPs count them) but no query reads them, and nasloc does not make
    them."""
    return sum(2 * arch.num_aux_tokens * arch.stages[s].dim ** 2
               for _, s, _, block in arch.iter_blocks() if block.mixer != "global" and not block.life)


def test_preset_gmacs_match_paper(preset):
    name, _, macs = preset
    assert (macs + unread_aux_keys_values(PRESETS[name])) / 1e9 == pytest.approx(PUBLISHED[name][1], rel=2e-2)


def test_preset_analytic_count_matches_fvcore(preset):
    name, model, macs = preset
    cost = count(PRESETS[name])
    assert cost.params == n_params(model)
    assert cost.macs == pytest.approx(macs, rel=5e-3)


def test_preset_forward_backward_at_224(preset):
    name, model, _ = preset
    out = forward_backward(model, torch.randn(1, 3, 224, 224))
    assert out.shape == (1, PRESETS[name].num_classes)


def test_preset_num_classes_come_from_the_arch():
    # The DW and LIFE presets are published with 10 and 100 classes; timm must not reset them to 1000.
    assert PRESETS["nasloc_dw_vit_tiny"].num_classes == 10
    assert PRESETS["nasloc_life_deit_tiny"].num_classes == 100
    model = timm.create_model("nasloc_dw_vit_tiny", img_size=32, patch_size=8)  # arch fields pass through timm
    assert model.arch.patch_size == 8 and model.pos_embed.value.shape == (1, 1 + 16, 192)
    assert model.num_classes == 10 and model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


# -------------------------------------------------------------------------- analytic vs fvcore, random
def _random_archs(space_name: str, n: int, seed: int) -> list[Arch]:
    space = SearchSpace.load(space_name)
    rng = random.Random(seed)
    archs = [space.sample(rng) for _ in range(n)]
    if space_name == "imagenet":  # fvcore at 224 costs seconds per model
        archs = [a.replace(img_size=64) for a in archs]
    return archs


@pytest.mark.parametrize("space_name,n", [("tiny", 4), ("tiny_columnar", 4), ("cifar", 3), ("imagenet", 2)])
def test_analytic_count_matches_fvcore_on_random_archs(space_name, n):
    for arch in _random_archs(space_name, n, seed=sum(map(ord, space_name))):
        model = LocalityViT(arch)
        cost = count(arch)
        assert cost.params == n_params(model), arch.to_json()
        assert cost.macs == pytest.approx(fvcore_macs(model, arch.img_size), rel=5e-3), arch.to_json()


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_analytic_count_equals_fvcore_for_each_searched_stem(stem):
    """Exactly, at the stem's strides 4 (tiny_columnar) and 2 (tiny's skeleton)."""
    archs = [a.replace(stem=stem) for a in _random_archs("tiny_columnar", 3, seed=5) + _random_archs("tiny", 2, seed=5)]
    for arch in archs:
        model = LocalityViT(arch)
        assert count(arch) == (fvcore_macs(model, arch.img_size), n_params(model)), arch.to_json()


def test_count_img_size_argument_equals_replace():
    arch = PRESETS["nasloc_lightvit_tiny"]
    assert count(arch, img_size=160) == count(arch.replace(img_size=160))
    assert count(arch, img_size=160).macs < count(arch).macs


# ------------------------------------------------------------------------------ mechanisms at 32 px
def _columnar(block: Block = Block(), depth: int = 3, dim: int = 48, heads: int = 3, **skeleton) -> Arch:
    settings = dict(img_size=32, patch_size=4, num_classes=7)
    return Arch(stages=(Stage(dim, heads, 2.0, (block,) * depth),), **{**settings, **skeleton})


MECHANISMS = {
    "dw_shortcut": _columnar(shortcuts=(Shortcut(start=0, span=2, kernels=(3, 5)), Shortcut(start=2, span=1, kernels=(7,)))),
    "lightvit": Arch(
        stages=(
            Stage(32, 2, 4.0, (Block(mixer="window"), Block(mixer="window"))),
            Stage(64, 4, 4.0, (Block(mixer="window"),)),
        ),
        img_size=32, num_classes=7, stem="lightvit", patch_size=4, downsample="merge", pos_embed="none",
        cls_token=False, global_tokens=3, window=4, head="neck", neck_dim=96, ffn="bidim",
    ),
    "life": _columnar(Block(life=True), dim=48, heads=3),
    "localvit": _columnar(Block(ffn_kernel=3), dim=48, heads=4, ffn="localvit"),
    "dilateformer": Arch(
        stages=(
            Stage(36, 3, 4.0, (Block(mixer="dilated", dilations=(1, 2, 1)), Block(mixer="dilated", dilations=(2, 1, 3)))),
            Stage(48, 4, 4.0, (Block(),)),
        ),
        img_size=32, num_classes=7, stem="overlap", patch_size=4, downsample="conv", pos_embed="none",
        cpe=True, cls_token=False, head="avg",
    ),
    # all three mixers and the FFN conv in one net, with a class token and global tokens
    "mixed": Arch(
        stages=(
            Stage(48, 3, 2.0, (Block(mixer="dilated", dilations=(3, 1, 2), ffn_kernel=5), Block(mixer="window", life=True), Block())),
        ),
        img_size=32, patch_size=4, num_classes=7, global_tokens=2, window=4,
    ),
}


@pytest.mark.parametrize("name", sorted(MECHANISMS))
def test_mechanism_forward_backward_at_32(name):
    arch = MECHANISMS[name]
    torch.manual_seed(0)
    model = LocalityViT(arch)
    out = forward_backward(model, torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)


@pytest.mark.parametrize("name", sorted(MECHANISMS))
def test_mechanism_analytic_count_matches_fvcore(name):
    arch = MECHANISMS[name]
    model = LocalityViT(arch)
    cost = count(arch)
    assert cost.params == n_params(model)
    assert cost.macs == pytest.approx(fvcore_macs(model, 32), rel=5e-3)


def test_dw_shortcut_structure_and_effect():
    arch = MECHANISMS["dw_shortcut"]
    model = LocalityViT(arch).eval()
    blocks = model.stages[0].blocks
    assert sorted(blocks[0].shortcut.branches) == ["k3", "k5"]
    assert blocks[1].shortcut is None  # block 1 is bypassed by the span-2 shortcut that starts at 0
    assert sorted(blocks[2].shortcut.branches) == ["k7"]
    assert blocks[0].shortcut.branches["k5"].conv.weight.shape == (48, 1, 5, 5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        for branch in blocks[0].shortcut.branches.values():
            branch.conv.weight.zero_()
            branch.conv.bias.zero_()
        after = model(x)
    assert (before - after).abs().max() > 1e-4


def test_dw_shortcut_adds_to_the_output_of_its_last_block():
    arch = _columnar(depth=3, shortcuts=(Shortcut(start=1, span=2, kernels=(3,)),))
    model = LocalityViT(arch).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        outs = [t.whole() for _, _, t, _ in model.run_blocks(x, arch)]
        tokens, geo = model.embed(x, arch)
        b0 = model.stages[0].blocks[0](tokens, geo, arch, arch.stages[0], arch.stages[0].blocks[0], 8)
        b1 = model.stages[0].blocks[1](b0, geo, arch, arch.stages[0], arch.stages[0].blocks[1], 8)
        b2 = model.stages[0].blocks[2](b1, geo, arch, arch.stages[0], arch.stages[0].blocks[2], 8)
        expected = Tokens.of_parts(b2.aux, b2.img + model.stages[0].blocks[1].shortcut(b0.img, geo, (3,)))
    torch.testing.assert_close(outs[0], b0.whole())
    torch.testing.assert_close(outs[1], b1.whole())  # nothing added after the first bypassed block
    torch.testing.assert_close(outs[2], expected.whole())
    assert torch.equal(outs[2][:, 0], b2.aux[:, 0])  # the class token gets no local term


def test_localvit_ffn_is_bypassed_by_the_class_token():
    arch = MECHANISMS["localvit"]
    model = LocalityViT(arch)
    ffn = model.stages[0].blocks[0].ffn
    geo = Geometry(8, 8, 1, 0)
    x = Tokens.of_parts(torch.randn(2, 1, 48), torch.randn(2, 64, 48))
    for mode in (ffn.train, ffn.eval):
        mode()
        out = ffn(x, geo, arch.stages[0].hidden, 3)
        assert torch.equal(out.aux, x.aux)
        assert (out.img - x.img).abs().max() > 1e-3
    # and in the whole block the class token reaches the FFN output only through attention
    assert model.stages[0].blocks[0].norm2 is None


def test_life_projection_has_multi_scale_convs():
    model = LocalityViT(MECHANISMS["life"])
    attn = model.stages[0].blocks[0].attn
    assert attn.life.dw3.weight.shape == (48, 1, 3, 3) and attn.life.dw5.weight.shape == (48, 1, 5, 5)
    # LIFE's pointwise projections carry no bias, only the first scale does
    assert attn.q.bias is not None and attn.k.bias is None and attn.v.bias is None


def test_life_rejects_dims_not_divisible_by_3():
    with pytest.raises(nasloc.ArchError, match=r"life"):
        _columnar(Block(life=True), dim=32, heads=2)


# ------------------------------------------------------------------------------ dilated attention
# Every implementation against the same references: the fused CPU kernel, the eager shift and multiply, and the
# masked dense SDPA (CUDA's form for small maps, run here on the CPU).
@pytest.fixture(params=["fused", "shift_multiply", "masked_dense"])
def dilated_attention(request):
    return {"fused": fused_dilated_attention, "shift_multiply": shift_multiply_attention,
            "masked_dense": masked_dense_attention}[request.param]


def _reference_dilated(q, k, v, height, width, dilations, kernel):
    """Per query, softmax over the in-map keys of its dilated kxk neighbourhood (loops; slow but obvious)."""
    b, heads, n, d = q.shape
    out = torch.zeros_like(q)
    r = kernel // 2
    for h, rate in enumerate(dilations):
        for i in range(height):
            for j in range(width):
                keys = [
                    (i + di * rate) * width + (j + dj * rate)
                    for di in range(-r, r + 1)
                    for dj in range(-r, r + 1)
                    if 0 <= i + di * rate < height and 0 <= j + dj * rate < width
                ]
                logits = q[:, h, i * width + j, None, :] @ k[:, h, keys].transpose(-1, -2) * d**-0.5
                out[:, h, i * width + j] = (logits.softmax(-1) @ v[:, h, keys])[:, 0]
    return out


@pytest.mark.parametrize("dilations,kernel", [((1, 2, 1), 3), ((3, 1, 2, 1), 3), ((2, 2), 5)])
def test_dilated_attention_matches_reference(dilated_attention, dilations, kernel):
    torch.manual_seed(0)
    heads, side = len(dilations), 6
    q, k, v = (torch.randn(2, heads, side * side, 4) for _ in range(3))
    out = dilated_attention(q, k, v, Geometry(side, side, 0, 0), dilations, kernel)
    torch.testing.assert_close(out, _reference_dilated(q, k, v, side, side, dilations, kernel), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dilations,side,kernel", [((1, 2, 1), 5, 3), ((2, 1, 2), 4, 3), ((3, 1), 2, 3), ((2, 3), 3, 5)])
def test_dilated_attention_gradients_match_reference(dilated_attention, dilations, side, kernel):
    # The backward is hand-written. Maps of 2-3 tokens a side put whole offsets outside the map.
    torch.manual_seed(0)
    shape = (2, len(dilations), side * side, 3)
    q, k, v = (torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(shape, dtype=torch.float64)
    out = dilated_attention(q, k, v, Geometry(side, side, 0, 0), dilations, kernel)
    expected = _reference_dilated(q, k, v, side, side, dilations, kernel)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    for got, want in zip(grads, torch.autograd.grad(expected, (q, k, v), grad_out)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dilations", [(1, 2, 3), (2, 1, 2)])
def test_dilated_attention_keeps_padding_out_of_the_softmax(dilated_attention, dilations):
    # All values 1: any convex combination of real keys is exactly 1. The official code lets zero-padded
    # keys (value 0) into the softmax, which would give 4/9 at a corner with q = 0.
    heads, side = len(dilations), 5
    geo = Geometry(side, side, 0, 0)
    v = torch.ones(1, heads, side * side, 8)
    for q in (torch.zeros(1, heads, side * side, 8), torch.randn(1, heads, side * side, 8)):
        out = dilated_attention(q, torch.randn_like(q), v, geo, dilations, 3)
        torch.testing.assert_close(out, torch.ones_like(out))


def test_dilated_attention_is_local(dilated_attention):
    # changing a key outside a query's neighbourhood must not change that query's output
    torch.manual_seed(0)
    side, geo = 8, Geometry(8, 8, 0, 0)
    q, k, v = (torch.randn(1, 1, side * side, 4) for _ in range(3))
    out = dilated_attention(q, k, v, geo, (2,), 3)
    k2, v2 = k.clone(), v.clone()
    far = 7 * side + 7  # (7, 7); query (0, 0) at rate 2 sees rows/cols {0, 2}
    k2[:, :, far] += 10
    v2[:, :, far] += 10
    out2 = dilated_attention(q, k2, v2, geo, (2,), 3)
    assert torch.equal(out[:, :, 0], out2[:, :, 0])
    assert not torch.equal(out[:, :, far], out2[:, :, far])


# --------------------------------------------------------------------------------- locality is real
LOCAL_VS_GLOBAL = [
    ("dilated", Block(mixer="dilated", dilations=(1, 2, 3))),
    ("window", Block(mixer="window")),
]


@pytest.mark.parametrize("name,block", LOCAL_VS_GLOBAL, ids=[n for n, _ in LOCAL_VS_GLOBAL])
def test_local_mixers_cost_fewer_macs_than_global(name, block):
    local = _columnar(block, depth=2, img_size=64, window=4, global_tokens=2)
    glob = _columnar(Block(), depth=2, img_size=64, window=4, global_tokens=2)
    attention_global = 2 * 2 * (1 + 2 + 256) ** 2 * 48  # 2 blocks x (q.k + attn.v) over 259 tokens
    analytic_gap = count(glob).macs - count(local).macs
    assert analytic_gap > 0.5 * attention_global
    fv_local, fv_global = fvcore_macs(LocalityViT(local), 64), fvcore_macs(LocalityViT(glob), 64)
    assert fv_global - fv_local > 0.5 * attention_global
    assert fv_local == pytest.approx(count(local).macs, rel=5e-3)


def test_dilated_macs_do_not_grow_quadratically_with_the_map():
    def attention_macs(img_size: int, block: Block) -> int:
        def macs(size: int) -> int:
            return count(_columnar(block, depth=1, img_size=size, cls_token=False, head="avg", num_classes=0)).macs

        return macs(img_size) - 4 * macs(img_size // 2)

    # without class token and classifier every cost is per token, so 4x the tokens is 4x the MACs,
    # except for global attention, which is quadratic
    assert attention_macs(64, Block(mixer="dilated", dilations=(1, 2, 3))) == 0
    assert attention_macs(64, Block()) > 0


# ------------------------------------------------------------------------------------------ timm API
def test_list_models_has_every_preset():
    listed = set(timm.list_models("nasloc_*"))
    assert set(PRESETS) | {GENERIC} <= listed


@pytest.mark.parametrize(
    "name,kwargs,n_maps",
    [
        ("nasloc_dilateformer_tiny", dict(img_size=64), 4),  # pyramid: last block of each stage
        ("nasloc_deit_tiny", dict(img_size=64), 3),  # columnar: the last three blocks
        ("nasloc_lightvit_tiny", dict(img_size=64, out_indices=(0, 5)), 2),
    ],
)
def test_features_only(name, kwargs, n_maps):
    model = timm.create_model(name, features_only=True, **kwargs).eval()
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    assert len(channels) == n_maps
    with torch.no_grad():
        maps = model(torch.randn(2, 3, 64, 64))
    assert len(maps) == n_maps
    for fmap, c, r in zip(maps, channels, reductions):
        assert fmap.shape == (2, c, 64 // r, 64 // r)
    assert reductions == sorted(reductions)


@pytest.mark.parametrize("name", ["nasloc_deit_tiny", "nasloc_dilateformer_tiny"])
def test_forward_intermediates_stops_early_after_the_last_index_taken(name):
    model = timm.create_model(name, img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x, indices=[model.arch.depth - 1], stop_early=True)
        assert torch.allclose(final, model.forward_features(x)) and len(maps) == 1
        first, early = model.forward_intermediates(x, indices=[0], stop_early=True)  # the final features of block 0
    assert len(early) == 1 and first.shape[-1] == early[0].shape[1] == model.arch.stages[0].dim


def test_reset_classifier_to_avg_pooling_drops_lightvits_neck():
    model = timm.create_model("nasloc_lightvit_tiny", img_size=64).eval()
    assert model.arch.head == "neck" and model.num_features == model.arch.neck_dim
    model.reset_classifier(5, "avg")
    assert model.neck is None and model.num_features == model.arch.stages[-1].dim
    assert model.head.weight.shape == (5, model.arch.stages[-1].dim)  # it slices no wider weight
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)


NO_WEIGHT_DECAY = {
    "nasloc_deit_tiny": {"cls_token.value", "pos_embed.value"},
    "nasloc_lightvit_tiny": {"global_tokens.value"}
    | {f"stages.{s}.blocks.{b}.attn.rel_pos.table.value" for s, depth in enumerate((2, 6, 6)) for b in range(depth)},
    "nasloc_dilateformer_tiny": set(),  # no position embedding, class token or bias table
}


@pytest.mark.parametrize("name", sorted(NO_WEIGHT_DECAY))
def test_forward_head_reset_classifier_and_weight_decay(name):
    model = timm.create_model(name, img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        assert pooled.shape == (2, model.num_features)
        torch.testing.assert_close(model.forward_head(feats), model(x))
        model.reset_classifier(5)
        assert model.num_classes == 5 and model(x).shape == (2, 5)
        assert model.get_classifier().out_features == 5
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), pooled)
    names = dict(model.named_parameters())
    no_decay = model.no_weight_decay()
    assert no_decay == NO_WEIGHT_DECAY[name]
    assert no_decay <= set(names)
    # and timm's optimizer factory uses it without complaint
    timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = LocalityViT(MECHANISMS["mixed"]).eval()  # eval: no BN-statistics updates
    x = torch.randn(2, 3, 32, 32)

    def grads():
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.set_grad_checkpointing()
    assert model.grad_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_resolve_data_config():
    model = timm.create_model("nasloc_lightvit_tiny")
    config = timm.data.resolve_data_config(model=model)
    assert config["input_size"] == (3, 224, 224)
    assert config["interpolation"] == "bicubic"


def test_generic_entry_builds_any_arch():
    arch = MECHANISMS["dilateformer"]
    model = timm.create_model(GENERIC, **arch.to_dict())
    assert model.arch == arch
    assert param_shapes(model) == param_shapes(LocalityViT(arch))


def test_timm_builds_an_arch_with_the_conv_stem():
    arch = SearchSpace.load("tiny_columnar").extreme(largest=True)
    assert arch.stem == "conv"
    model = timm.create_model(GENERIC, **arch.to_dict())
    assert model.arch == arch and param_shapes(model) == param_shapes(LocalityViT(arch))
    assert pretrained_cfg(arch)["first_conv"] == "stem.conv1" and model.stem.conv1.in_channels == 3
    out = forward_backward(model, torch.randn(2, 3, arch.img_size, arch.img_size))
    assert out.shape == (2, arch.num_classes)


def test_timm_overrides_reach_the_arch():
    model = timm.create_model("nasloc_deit_tiny", num_classes=3, img_size=96, in_chans=1, global_pool="avg")
    assert (model.arch.num_classes, model.arch.img_size, model.arch.in_chans, model.arch.head) == (3, 96, 1, "avg")
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 1, 96, 96)).shape == (1, 3)
    assert model.pos_embed.value.shape == (1, 1 + 36, 192)
    assert math.isclose(count(model.arch).params, n_params(model))


class _CountCopies(TorchDispatchMode):
    """Counts the ops that join or gather tokens into new memory (cat, and copies made to contiguous)."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("cat", "clone", "_to_copy", "copy_"):
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mixer", ["window", "dilated"])
def test_local_blocks_with_convs_and_aux_tokens_join_nothing(mixer):
    """Local blocks keep the auxiliary tokens apart from the image tokens (Tokens): their CPE, FFN conv and the
    DW shortcut see the image tokens as a map without a copy, and nothing is joined back after them."""
    arch = _columnar(Block(mixer=mixer, dilations=(1, 2, 1) if mixer == "dilated" else (), ffn_kernel=3), depth=2,
                     window=4, cpe=True, global_tokens=2, shortcuts=(Shortcut(start=0, span=2, kernels=(3,)),))
    model = LocalityViT(arch).eval()
    tokens, geo = model.embed(torch.randn(2, 3, 32, 32), arch)
    tokens = Tokens.of_parts(tokens.aux.contiguous(), tokens.img)
    with torch.no_grad(), _CountCopies() as counted:
        out = model.stages[0].blocks[0](tokens, geo, arch, arch.stages[0], arch.stages[0].blocks[0], 4)
        out.img + model.stages[0].blocks[0].shortcut(out.img, geo, (3,))
    assert not out.made_joined
    assert counted.calls.get("cat", 0) == 0, counted.calls
