"""Search spaces: loading, one-line errors for bad files, deterministic sampling, MACs bands and extremes.

MACs are multiply-adds per image at the space's deploy resolution (the seeds' "FLOPs").
"""
from __future__ import annotations

import copy
import random

import pytest
import yaml

from nasloc.arch import Arch
from nasloc.space.choosers import RandomChooser, RecordingChooser
from nasloc.space.files import SPACES_DIR, SpaceError
from nasloc.space.flops import count
from nasloc.space.search_space import SearchSpace
from nasloc.space.seed_designs import reference_archs

SHIPPED = sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))
TINY = yaml.safe_load((SPACES_DIR / "tiny.yaml").read_text())


def macs(arch: Arch) -> int:
    return count(arch).macs


@pytest.fixture(scope="module")
def spaces() -> dict[str, SearchSpace]:
    return {name: SearchSpace.load(name) for name in SHIPPED}


@pytest.fixture(scope="module")
def samples(spaces) -> dict[str, list[int]]:
    """MACs of 150 uniform samples per shipped space."""
    out = {}
    for name, space in spaces.items():
        rng = random.Random(11)
        out[name] = [macs(space.sample(rng)) for _ in range(150)]
    return out


# ------------------------------------------------------------------------------------------ loading
def test_the_four_spaces_ship():
    assert {"tiny", "tiny_columnar", "cifar", "imagenet"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_space_loads(name):
    by_name = SearchSpace.load(name)
    by_path = SearchSpace.load(SPACES_DIR / f"{name}.yaml")
    assert by_name == by_path
    assert by_name.name == name and by_name.stages
    arch = by_name.sample(random.Random(0))
    assert arch.img_size == by_name.img_size


def test_shipped_spaces_contain_their_seed_mechanisms(spaces):
    """Every locality gene the design names can be switched on in the two full spaces."""
    for name in ("cifar", "imagenet"):
        space = spaces[name]
        assert max(space.global_tokens) > 0 and max(space.shortcut_span) > 0 and "bidim" in space.ffn
        for stage in space.stages:
            assert set(stage.mixer) == {"global", "dilated", "window"}
            assert True in stage.life and max(stage.ffn_kernel) > 0 and len(stage.dilation) > 1


# ---------------------------------------------------------------------------------------- bad files
def _mutated(mutate) -> dict:
    data = copy.deepcopy(TINY)
    mutate(data)
    return data


BAD = {
    # name: (space as a dict (or raw text), field the message must name)
    "unknown gene": (_mutated(lambda d: d["genes"].update(window_size=[3, 5])), "genes.window_size"),
    "unknown stage gene": (_mutated(lambda d: d["stages"][0].update(kernel=[3])), "stages[0].kernel"),
    "unknown top-level field": (_mutated(lambda d: d.update(budget="0.7G")), "budget"),
    "gene in the skeleton": (_mutated(lambda d: d["skeleton"].update(global_tokens=2)), "skeleton.global_tokens"),
    "unknown skeleton field": (_mutated(lambda d: d["skeleton"].update(dropout=0.1)), "skeleton.dropout"),
    "dim not divisible by heads": (_mutated(lambda d: d["stages"][1].update(dim=[24, 36], heads=[5])), "stages[1].heads"),
    "dilated neighbourhood larger than the map": (_mutated(lambda d: d["stages"][0].update(dilation=[1, 4])), "stages[0].dilation"),
    "dilation too large in the second stage": (_mutated(lambda d: d["stages"][1].update(dilation=[2])), "stages[1].dilation"),
    "span larger than any stage": (_mutated(lambda d: d["genes"]["shortcuts"].update(span=[0, 3])), "genes.shortcuts.span"),
    "life with dim % 3": (_mutated(lambda d: d["stages"][1].update(dim=[24, 32], heads=[2, 4])), "stages[1].life"),
    "window that does not tile the map": (_mutated(lambda d: d["skeleton"].update(window=3)), "stages[0].mixer"),
    "unknown mixer": (_mutated(lambda d: d["stages"][0].update(mixer=["global", "swin"])), "stages[0].mixer"),
    "even ffn kernel between the corners": (_mutated(lambda d: d["stages"][0].update(ffn_kernel=[0, 2, 3])), "stages[0].ffn_kernel"),
    "dilation 0 (dilated is no corner mixer)": (_mutated(lambda d: d["stages"][0].update(dilation=[0, 1])), "stages[0].dilation"),
    "shortcut kernel 4": (_mutated(lambda d: d["genes"]["shortcuts"].update(kernels=[[3], [3, 4]])), "genes.shortcuts.kernels"),
    "localvit mixed with mlp": (_mutated(lambda d: d["genes"].update(ffn=["mlp", "localvit"])), "genes.ffn"),
    "negative global tokens": (_mutated(lambda d: d["genes"].update(global_tokens=[0, -2])), "genes.global_tokens"),
    "empty choice list": (_mutated(lambda d: d["stages"][0].update(dim=[])), "stages[0].dim"),
    "missing stage field": (_mutated(lambda d: d["stages"][0].pop("heads")), "stages[0].heads"),
    "no stages": (_mutated(lambda d: d.update(stages=[])), "stages"),
    "depth 0": (_mutated(lambda d: d["stages"][0].update(depth=[0, 1])), "stages[0].depth"),
    "skeleton the arch refuses": (_mutated(lambda d: d["skeleton"].update(head="token")), "head"),
    "stem gene with stems that share layer names": (_mutated(lambda d: d["genes"].update(stem=["patch", "lightvit"])), "genes.stem"),
    "stem gene without the skeleton's stem": (_mutated(lambda d: d["genes"].update(stem=["conv"])), "genes.stem"),
    "conv stem at a stride it lacks": (
        _mutated(lambda d: (d["skeleton"].update(img_size=64, patch_size=8), d["genes"].update(stem=["patch", "conv"]))), "patch_size"),
    "not a mapping": ([1, 2, 3], "space"),
    "invalid YAML": ("name: broken\nstages: [\n  {depth: [1, 2]\n", "YAML"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_space_file_fails_with_one_line_naming_file_and_field(case, tmp_path):
    content, field = BAD[case]
    path = tmp_path / "bad_space.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    with pytest.raises(SpaceError) as info:
        SearchSpace.load(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(f"{path}: "), message
    assert field in message, message


def test_missing_space_file(tmp_path):
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(SpaceError) as info:
        SearchSpace.load(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "tiny" in message  # lists the shipped spaces


def test_space_error_is_a_value_error():
    assert issubclass(SpaceError, ValueError)


def test_every_choice_of_a_loaded_space_builds(spaces):
    """Sampling never hits an invalid arch: whatever a space accepts at load time, it can build."""
    for name, space in spaces.items():
        rng = random.Random(3)
        for _ in range(100):
            space.sample(rng)  # raises ArchError if the space let a bad combination through


# ----------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("name", SHIPPED)
def test_sampling_is_deterministic_for_a_seed(name, spaces):
    space = spaces[name]
    first = [space.sample(random.Random(42)) for _ in range(3)]
    rng_a, rng_b = random.Random(5), random.Random(5)
    a = [space.sample(rng_a) for _ in range(20)]
    random.seed(123)  # the global generator plays no part
    b = [space.sample(rng_b) for _ in range(20)]
    assert a == b
    assert first[0] == first[1] == first[2]
    other = [space.sample(random.Random(6)) for _ in range(1)] + [space.sample(rng_a) for _ in range(5)]
    assert any(x not in a for x in other)  # and different seeds explore
    assert len(set(a)) > 10  # the space is not degenerate


@pytest.mark.parametrize("name", SHIPPED)
def test_samples_use_every_option(name, spaces):
    space = spaces[name]
    rng = random.Random(0)
    archs = [space.sample(rng) for _ in range(150)]
    mixers = {b.mixer for a in archs for _, _, _, b in a.iter_blocks()}
    kernels = {b.ffn_kernel for a in archs for _, _, _, b in a.iter_blocks()}
    assert mixers == {m for s in space.stages for m in s.mixer}
    assert kernels == {k for s in space.stages for k in s.ffn_kernel}
    assert {a.global_tokens for a in archs} == set(space.global_tokens)
    assert {a.stem for a in archs} == set(space.stem or [space.skeleton["stem"]])
    for s, choices in enumerate(space.stages):
        assert {a.stages[s].depth for a in archs} == set(choices.depth)
        assert {a.stages[s].dim for a in archs} == set(choices.dim)
    if max(space.shortcut_span):
        spans = {sc.span for a in archs for sc in a.shortcuts}
        assert spans == {s for s in space.shortcut_span if s}


def test_the_columnar_spaces_search_the_stem(spaces):
    for name in ("tiny_columnar", "cifar"):
        assert spaces[name].stem == ("patch", "conv") and spaces[name].skeleton["stem"] == "patch"
    # a space without the gene never asks for it: no decision, no Optuna parameter, the skeleton's stem
    chooser = RecordingChooser(RandomChooser(random.Random(0)))
    assert spaces["tiny"].stem == () and spaces["tiny"].build(chooser).stem == "patch"
    assert "stem" not in chooser.decisions


def test_reference_designs_take_the_conv_stem_where_the_space_searches_it(spaces):
    """LightViT and DilateFormer tokenize with convs in their papers; the other designs with patches."""
    stems = {name: arch.stem for name, arch in reference_archs(spaces["cifar"], 0.1e9).items()}
    assert stems == {"plain ViT": "patch", "DW shortcut": "patch", "LocalViT FFN": "patch", "LIFE": "patch",
                     "DilateFormer": "conv", "LightViT": "conv"}
    tiny = spaces["tiny"]  # no stem gene: every design keeps the skeleton's stem
    assert {arch.stem for arch in reference_archs(tiny, tiny.macs_range()[1]).values()} == {"patch"}


# -------------------------------------------------------------------------------------- MACs bands
@pytest.mark.parametrize("name", SHIPPED)
def test_macs_range_brackets_random_samples(name, spaces, samples):
    lo, hi = spaces[name].macs_range()
    assert 0 < lo < hi
    assert lo <= min(samples[name]) and max(samples[name]) <= hi
    # and it is the true range: the corner archs are in the space
    assert macs(spaces[name].extreme(largest=False)) == lo
    assert macs(spaces[name].extreme(largest=True)) == hi


def test_imagenet_range_is_as_documented(spaces):
    lo, hi = spaces["imagenet"].macs_range()
    assert 0.1e9 < lo < 0.3e9 and 2.0e9 < hi < 3.0e9


def _bands(space: SearchSpace) -> dict[str, tuple[float, float]]:
    lo, hi = space.macs_range()
    span = hi - lo
    return {
        "low": (lo, lo + 0.2 * span),
        "middle": (lo + 0.3 * span, lo + 0.6 * span),
        "narrow": (lo + 0.45 * span, lo + 0.47 * span),
        "very narrow": (lo + 0.2 * span, lo + 0.205 * span),
    }


@pytest.mark.parametrize("name", SHIPPED)
def test_sample_in_band_stays_in_band(name, spaces):
    space = spaces[name]
    n = 4 if name == "imagenet" else 8
    for band, (lo, hi) in _bands(space).items():
        rng = random.Random(sum(map(ord, band)))
        archs = [space.sample_in_band(rng, lo, hi) for _ in range(n)]
        for arch in archs:
            assert lo <= macs(arch) <= hi, (band, macs(arch))
        if band != "very narrow":
            assert len(set(archs)) > 1, band  # random, not one fixed answer
        again = random.Random(sum(map(ord, band)))
        assert [space.sample_in_band(again, lo, hi) for _ in range(n)] == archs  # deterministic


def test_sample_in_band_gives_up_on_an_unreachable_band(spaces):
    space = spaces["tiny"]
    _, hi = space.macs_range()
    with pytest.raises(SpaceError, match="could not reach the MACs band") as info:
        space.sample_in_band(random.Random(0), 2 * hi, 3 * hi, tries=8)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", SHIPPED)
def test_extreme_unbounded_dominates_random_samples(name, spaces, samples):
    space = spaces[name]
    assert macs(space.extreme(largest=True)) >= max(samples[name])
    assert macs(space.extreme(largest=False)) <= min(samples[name])


# (space, band, largest?) where extreme() misses: asserted to fail in the strict xfail test below.
EXTREME_MISSES = [("tiny_columnar", "narrow", True), ("tiny_columnar", "narrow", False), ("imagenet", "very narrow", False)]


@pytest.mark.parametrize("name", SHIPPED)
def test_extreme_in_band(name, spaces):
    space = spaces[name]
    for band, (lo, hi) in _bands(space).items():
        if band == "very narrow" or (name, band, False) in EXTREME_MISSES:
            continue
        largest, smallest = space.extreme(True, lo, hi), space.extreme(False, lo, hi)
        assert lo <= macs(smallest) <= macs(largest) <= hi, band
        if name != "imagenet":  # (each imagenet extreme takes a second on a busy machine)
            assert space.extreme(True, lo, hi) == largest  # deterministic
        rng = random.Random(1)
        drawn = sorted(macs(space.sample_in_band(rng, lo, hi)) for _ in range(7))
        # extreme() is a coordinate search, a heuristic: it must beat a typical in-band sample and land
        # near the best one (strict dominance is not reached everywhere, see the xfail below)
        median = drawn[len(drawn) // 2]
        assert macs(largest) >= median and macs(largest) >= 0.97 * drawn[-1], band
        assert macs(smallest) <= median and macs(smallest) <= 1.03 * drawn[0], band


@pytest.mark.xfail(
    strict=True,
    raises=(AssertionError, SpaceError),
    reason="known limitation of extreme(): its coordinate search can stop short of the best in-band arch "
    "(tiny_columnar narrow band: a uniform in-band sample beats 'largest' by 0.6 % and 'smallest' by 0.3 %) "
    "and can miss a non-empty narrow band altogether "
    "(imagenet very narrow band: 'smallest' raises although sample_in_band finds archs there)",
)
@pytest.mark.parametrize("name,band,largest", EXTREME_MISSES)
def test_extreme_in_band_dominates_every_sample_strictly(spaces, name, band, largest):
    space = spaces[name]
    lo, hi = _bands(space)[band]
    found = macs(space.extreme(largest, lo, hi))
    rng = random.Random(3)
    drawn = [macs(space.sample_in_band(rng, lo, hi)) for _ in range(20)]
    assert found >= max(drawn) if largest else found <= min(drawn)


def test_extreme_raises_on_an_empty_band(spaces):
    space = spaces["tiny"]
    lo, _ = space.macs_range()
    with pytest.raises(SpaceError, match="no arch found") as info:
        space.extreme(True, 0, lo - 1)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------ optuna
def test_optuna_suggest_builds_the_same_arch_as_replaying_its_params(spaces):
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = spaces["cifar"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    archs = []
    for _ in range(5):
        trial = study.ask()
        archs.append(space.suggest(trial))
        study.tell(trial, 0.0)
    for trial, arch in zip(study.trials, archs):
        replayed = space.suggest(optuna.trial.FixedTrial(trial.params))
        assert replayed == arch
