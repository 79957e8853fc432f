"""The architecture description: round trips through JSON and YAML, and one-line validation errors."""
from __future__ import annotations

import json
import random

import pytest
import yaml

from nasloc.arch import Arch, ArchError, Block, Shortcut, Stage
from nasloc.models import LocalityViT
from nasloc.models.presets import PRESETS
from nasloc.space.choosers import RecordingChooser, ReplayChooser
from nasloc.space.search_space import SearchSpace

SMALL = Arch(
    stages=(
        Stage(24, 3, 2.0, (Block(mixer="dilated", dilations=(1, 2, 1), life=True, ffn_kernel=3), Block(mixer="window"))),
        Stage(64, 4, 3, (Block(), Block(ffn_kernel=5), Block(mixer="dilated", dilations=(2, 2, 1, 1)))),
    ),
    img_size=32, num_classes=5, patch_size=4, pos_embed="none", cls_token=False, head="avg", cpe=True,
    global_tokens=2, window=4, ffn="bidim", shortcuts=(Shortcut(0, 2, (3, 5, 7)), Shortcut(3, 2, (5,))),
)


def _sampled(n_per_space: int = 3) -> list[Arch]:
    rng = random.Random(7)
    return [SearchSpace.load(name).sample(rng) for name in ("tiny", "tiny_columnar", "cifar", "imagenet") for _ in range(n_per_space)]


ROUND_TRIP = {
    **{f"preset:{k}": v for k, v in PRESETS.items()}, "small": SMALL, "conv stem": SMALL.replace(stem="conv"),
    **{f"sampled:{i}": a for i, a in enumerate(_sampled())},
}


def shapes(model) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


# -------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_json_and_yaml_round_trips_are_exact(name):
    arch = ROUND_TRIP[name]
    from_json = Arch.from_json(arch.to_json())
    from_yaml = Arch.from_yaml(arch.to_yaml())
    assert from_json == arch and from_yaml == arch
    assert hash(from_json) == hash(arch)  # frozen, hashable all the way down (tuples, not lists)
    # serialisation is a fixed point, and the plain dict really is plain JSON/YAML data
    assert from_json.to_json() == arch.to_json()
    assert from_yaml.to_yaml() == arch.to_yaml()
    assert json.loads(arch.to_json()) == arch.to_dict() == yaml.safe_load(arch.to_yaml())
    assert Arch.from_dict(arch.to_dict()) == arch


def test_from_dict_accepts_an_arch_and_fills_defaults():
    assert Arch.from_dict(SMALL) is SMALL
    minimal = Arch.from_dict({"stages": [{"dim": 48, "heads": 3, "mlp_ratio": 4, "blocks": [{}, {"mixer": "window"}]}]})
    assert minimal.depth == 2 and minimal.img_size == 224 and minimal.stages[0].blocks[0] == Block()


@pytest.mark.parametrize("name", ["small", "conv stem", "sampled:0", "sampled:3", "sampled:6"])
def test_models_from_round_tripped_archs_are_identical(name):
    arch = ROUND_TRIP[name]
    if arch.img_size > 64:
        arch = arch.replace(img_size=64)
    reference = shapes(LocalityViT(arch))
    assert reference == shapes(LocalityViT(Arch.from_json(arch.to_json())))
    assert reference == shapes(LocalityViT(Arch.from_yaml(arch.to_yaml())))
    assert list(reference) == list(shapes(LocalityViT(arch.to_dict())))  # same order, same names


def test_describe_names_every_locality_choice():
    assert SMALL.describe() == (
        "dim 24, depth 2, heads 3, mlp 2: 0 global/1 dilated/1 window, 1 LIFE, 1 FFN-conv | "
        "dim 64, depth 3, heads 4, mlp 3: 2 global/1 dilated/0 window, 0 LIFE, 1 FFN-conv; "
        "shortcuts (start+span:kernels) 0+2:3/5/7, 3+2:5; 2 global tokens, ffn bidim, cpe on, patch stem")
    assert "shortcuts (start+span:kernels) none; 0 global tokens, ffn mlp, cpe off" in PRESETS["nasloc_deit_tiny"].describe()
    assert SMALL.replace(stem="conv").describe().endswith("cpe on, conv stem")


def test_stem_gene_round_trips():
    """An arch whose stem a space searched keeps it through JSON, YAML and a replay of its decisions."""
    space = SearchSpace.load("tiny_columnar")
    assert space.stem == ("patch", "conv")
    for stem in space.stem:
        chooser = RecordingChooser(lambda name, options: stem if name == "stem" else options[-1])
        arch = space.build(chooser)
        assert arch.stem == stem and chooser.decisions["stem"] == stem
        assert Arch.from_json(arch.to_json()) == arch == Arch.from_yaml(arch.to_yaml())
        assert space.build(ReplayChooser(chooser.decisions, fallback=None)) == arch


def test_yaml_written_by_hand():
    text = """
    img_size: 32
    patch_size: 4
    num_classes: 10
    stages:
      - dim: 36
        heads: 3
        mlp_ratio: 4
        blocks:
          - {mixer: dilated, dilations: [1, 2, 3], life: true}
          - {mixer: global, ffn_kernel: 3}
    shortcuts:
      - {start: 0, span: 2, kernels: [3, 5]}
    """
    arch = Arch.from_yaml(text)
    assert arch.stages[0].blocks[0].dilations == (1, 2, 3)
    assert arch.shortcuts == (Shortcut(0, 2, (3, 5)),)
    assert Arch.from_yaml(arch.to_yaml()) == arch


# -------------------------------------------------------------------------------------- validation
def _with(path: tuple, value) -> dict:
    """SMALL as a dict with one field replaced (``path`` indexes into the dict)."""
    data = SMALL.to_dict()
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


INVALID = {
    # name: (arch dict, field the message must start with)
    "dim not divisible by heads": (_with(("stages", 1, "heads"), 5), "stages[1].heads"),
    "dilations count != heads": (_with(("stages", 0, "blocks", 0, "dilations"), [1, 2]), "stages[0].blocks[0].dilations"),
    "dilations on a global block": (_with(("stages", 1, "blocks", 0, "dilations"), [1, 1, 1, 1]), "stages[1].blocks[0].dilations"),
    "dilation rate 0": (_with(("stages", 0, "blocks", 0, "dilations"), [1, 0, 1]), "stages[0].blocks[0].dilations"),
    "life with dim % 3": (_with(("stages", 1, "blocks", 1, "life"), True), "stages[1].blocks[1].life"),
    "overlapping shortcuts": (_with(("shortcuts",), [{"start": 0, "span": 2}, {"start": 1, "span": 1}]), "shortcuts[1]"),
    "shortcut spanning two stages": (_with(("shortcuts",), [{"start": 1, "span": 2}]), "shortcuts[0].span"),
    "shortcut span 5": (_with(("shortcuts",), [{"start": 2, "span": 5}]), "shortcuts[0].span"),
    "shortcut past the end": (_with(("shortcuts",), [{"start": 5}]), "shortcuts[0].start"),
    "shortcut kernel 4": (_with(("shortcuts",), [{"start": 0, "kernels": [3, 4]}]), "shortcuts[0].kernels"),
    "shortcut kernels unsorted": (_with(("shortcuts",), [{"start": 0, "kernels": [5, 3]}]), "shortcuts[0].kernels"),
    "unknown arch field": ({**SMALL.to_dict(), "dropout": 0.1}, "arch.dropout"),
    "unknown stage field": (_with(("stages", 0, "width"), 3), "stages[0].width"),
    "unknown block field": (_with(("stages", 0, "blocks", 1, "kernel"), 3), "stages[0].blocks[1].kernel"),
    "unknown shortcut field": (_with(("shortcuts",), [{"start": 0, "length": 2}]), "shortcuts[0].length"),
    "head token without cls_token": (_with(("head",), "token"), "head"),
    "unknown mixer": (_with(("stages", 0, "blocks", 1, "mixer"), "swin"), "stages[0].blocks[1].mixer"),
    "even ffn kernel": (_with(("stages", 0, "blocks", 1, "ffn_kernel"), 4), "stages[0].blocks[1].ffn_kernel"),
    "unknown stem": (_with(("stem",), "resnet"), "stem"),
    "img_size not divisible": (_with(("img_size",), 36), "img_size"),
    "negative global tokens": (_with(("global_tokens",), -1), "global_tokens"),
    "even dilate_kernel": (_with(("dilate_kernel",), 4), "dilate_kernel"),
    "negative dilate_kernel": (_with(("dilate_kernel",), -1), "dilate_kernel"),
    "no stages": (_with(("stages",), []), "stages"),
    "missing stages": ({k: v for k, v in SMALL.to_dict().items() if k != "stages"}, "arch.stages"),
    "missing dim": (_with(("stages", 0), {"heads": 3, "mlp_ratio": 2, "blocks": [{}]}), "stages[0].dim"),
    "empty stage": (_with(("stages", 0, "blocks"), []), "stages[0].blocks"),
    "dim not an int": (_with(("stages", 0, "dim"), "24"), "stages[0].dim"),
    "blocks not a list": (_with(("stages", 0, "blocks"), "global"), "stages[0].blocks"),
    "cpe not a bool": (_with(("cpe",), "yes"), "cpe"),
    "lightvit stem stride 16": (_with(("stem",), "lightvit") | {"patch_size": 16, "img_size": 64}, "patch_size"),
    "conv stem stride 8": (_with(("stem",), "conv") | {"patch_size": 8, "img_size": 64}, "patch_size"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_arch_raises_one_line_naming_the_field(case):
    data, field = INVALID[case]
    for parse in (Arch.from_dict, lambda d: Arch.from_json(json.dumps(d)), lambda d: Arch.from_yaml(yaml.safe_dump(d))):
        with pytest.raises(ArchError) as info:
            parse(data)
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith(f"{field}:"), message
        assert len(message) > len(field) + 5  # and says why


def test_invalid_arch_built_directly_raises_too():
    with pytest.raises(ArchError, match=r"^stages\[0\]\.heads: dim 32 is not divisible by 3 heads$"):
        Arch(stages=(Stage(32, 3, 4.0, (Block(),)),))
    with pytest.raises(ArchError, match=r"^head: "):
        Arch(stages=(Stage(32, 2, 4.0, (Block(),)),), cls_token=False)
    with pytest.raises(ArchError, match=r"^img_size: "):
        SMALL.replace(img_size=44)


def test_lists_made_in_python_become_tuples_and_the_arch_is_counted():
    from nasloc.space.flops import count

    arch = Arch(stages=(Stage(48, 3, 2.0, (Block("dilated", dilations=[1, 2, 3]), Block())),), img_size=32,
                patch_size=4, shortcuts=(Shortcut(0, 2, kernels=[3, 5]),))
    assert arch.stages[0].blocks[0].dilations == (1, 2, 3) and arch.shortcuts[0].kernels == (3, 5)
    assert count(arch).macs > 0  # lists were unhashable there


def test_features_only_default_of_a_shallow_columnar_arch_takes_every_block():
    from nasloc.models.locality_vit import default_out_indices

    assert default_out_indices(Arch(stages=(Stage(32, 2, 2.0, (Block(), Block())),), img_size=32, patch_size=4)) == [0, 1]


def test_arch_error_is_a_value_error():
    assert issubclass(ArchError, ValueError)


def test_parsing_garbage_is_an_arch_error():
    for text in ("[1, 2]", "just a string", "stages: 3"):
        with pytest.raises(ArchError):
            Arch.from_yaml(text)


def test_derived_geometry():
    assert SMALL.depth == 5 and SMALL.family == "pyramid" and SMALL.num_aux_tokens == 2
    assert [SMALL.grid(s) for s in range(2)] == [8, 4]
    assert [SMALL.window_size(s) for s in range(2)] == [4, 4]
    assert SMALL.replace(window=3).window_size(0) == 2  # largest divisor of 8 that is <= 3
    assert [(i, s, b) for i, s, b, _ in SMALL.iter_blocks()] == [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1), (4, 1, 2)]
    assert PRESETS["nasloc_deit_tiny"].family == "columnar" and PRESETS["nasloc_deit_tiny"].num_aux_tokens == 1
