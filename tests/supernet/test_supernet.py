"""The weight-sharing supernet: a subnet run inside it equals its extracted standalone model, it holds
about the weights of the largest subnet, a step trains only the slices an arch uses, and BatchNorm
statistics are recalibrated per subnet."""
from __future__ import annotations

import copy
import random

import pytest
import torch

from nasloc.arch import Arch
from nasloc.models import LocalityViT
from nasloc.models.elastic import load_slices_
from nasloc.space.flops import count
from nasloc.space.search_space import SearchSpace
from nasloc.supernet.supernet import Supernet, recalibrate_batchnorm

# space -> supernet resolution (imagenet at 32 px keeps it cheap: maps of 4, 2 and 1 tokens a side)
RESOLUTION = {"tiny": 16, "tiny_columnar": 16, "cifar": 32, "imagenet": 32}


@pytest.fixture(scope="module")
def spaces() -> dict[str, SearchSpace]:
    return {name: SearchSpace.load(name) for name in RESOLUTION}


_SUPERNETS: dict[str, Supernet] = {}


def supernet_of(space: SearchSpace) -> Supernet:
    """One perturbed supernet per space: every parameter and BN statistic moved off its init, so that a
    wrong slice (wrong rows, wrong group, wrong kernel centre) shows up in the outputs."""
    if space.name not in _SUPERNETS:
        torch.manual_seed(0)
        net = Supernet(space, RESOLUTION[space.name])
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.05)
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.normal_(0, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
        _SUPERNETS[space.name] = net
    return _SUPERNETS[space.name]


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def archs_of(space: SearchSpace, n: int, seed: int, corners: bool = True) -> list[Arch]:
    """The largest arch (every weight of the supernet at its fullest), the smallest, and n random ones."""
    rng = random.Random(seed)
    ends = [space.extreme(largest=True), space.extreme(largest=False)] if corners else []
    return ends + [space.sample(rng) for _ in range(n)]


# ----------------------------------------------------------------------------- subnet == extracted
@pytest.mark.parametrize("name,n", [("tiny", 6), ("tiny_columnar", 6), ("cifar", 2), ("imagenet", 2)])
def test_subnet_equals_extracted_model(name, n, spaces):
    space = spaces[name]
    supernet = supernet_of(space).eval()
    x = torch.randn(2, 3, supernet.img_size, supernet.img_size)
    # (imagenet's largest arch costs seconds to build, twice: its random archs suffice there)
    for arch in archs_of(space, n, seed=len(name), corners=name != "imagenet"):
        model = supernet.extract(arch)
        assert not model.training
        at_res = arch.replace(img_size=supernet.img_size)
        assert model.arch == at_res
        assert shapes(model) == shapes(LocalityViT(at_res))  # exactly the standalone model's weights
        with torch.no_grad():
            inside, alone = supernet(x, arch), model(x)
        assert inside.shape == (2, arch.num_classes)
        assert (inside - alone).abs().max() <= 1e-4, arch.to_json()


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_supernet_holds_both_stems_and_runs_the_arch_one(stem, spaces):
    space = spaces["tiny_columnar"]
    supernet = supernet_of(space).eval()
    layers = {"patch": ("proj",), "conv": ("conv1", "norm1", "conv2", "norm2", "pointwise")}
    assert {name for name, _ in supernet.stem.named_children()} == set(layers["patch"] + layers["conv"])
    x = torch.randn(2, 3, 16, 16)
    for arch in archs_of(space, 3, seed=2):
        arch = arch.replace(stem=stem)
        with torch.no_grad():
            assert (supernet(x, arch) - supernet.extract(arch)(x)).abs().max() <= 1e-4, arch.to_json()
    supernet.zero_grad(set_to_none=True)
    supernet(x, arch).sum().backward()
    other = "conv" if stem == "patch" else "patch"
    assert all(getattr(supernet.stem, name).weight.grad is not None for name in layers[stem])
    assert all(getattr(supernet.stem, name).weight.grad is None for name in layers[other])
    supernet.zero_grad(set_to_none=True)


def test_different_subnets_give_different_outputs(spaces):
    space = spaces["tiny"]
    supernet = supernet_of(space).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        outs = [supernet(x, arch) for arch in archs_of(space, 3, seed=1)]
    for i in range(len(outs)):
        for j in range(i):
            assert (outs[i] - outs[j]).abs().max() > 1e-3


def test_extracted_model_is_independent_of_the_supernet(spaces):
    space = spaces["tiny"]
    supernet = supernet_of(space).eval()
    arch = space.extreme(largest=True)
    model = supernet.extract(arch)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert (supernet(x, arch) - model(x)).abs().max() > 1e-3  # copied, not views of the supernet


# -------------------------------------------------------------------------------------------- size
@pytest.mark.parametrize("name", sorted(RESOLUTION))
def test_supernet_holds_about_the_largest_subnet(name, spaces):
    space = spaces[name]
    supernet = supernet_of(space)
    largest = space.extreme(largest=True).replace(img_size=supernet.img_size)
    total = sum(p.numel() for p in supernet.parameters())
    largest_params = count(largest).params
    assert largest_params <= total <= 1.25 * largest_params
    # and no subnet needs more weights than the supernet holds
    rng = random.Random(0)
    for arch in [space.sample(rng) for _ in range(20)]:
        assert count(arch.replace(img_size=supernet.img_size)).params <= total


# ------------------------------------------------------------------------------ training step slices
def _sliced_grads(supernet: Supernet, arch: Arch) -> LocalityViT:
    """The supernet's gradients cut to the arch's slices (a standalone-shaped model holding grads)."""
    grads = copy.deepcopy(supernet)
    with torch.no_grad():
        for p, g in zip(supernet.parameters(), grads.parameters()):
            g.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
    sliced = LocalityViT(supernet.at_resolution(arch))
    load_slices_(sliced, grads)
    return sliced


@pytest.mark.parametrize("name,seed", [("tiny", 0), ("tiny", 1), ("tiny_columnar", 0), ("cifar", 0)])
def test_training_step_touches_only_the_arch_slices(name, seed, spaces):
    space = spaces[name]
    torch.manual_seed(seed)
    supernet = Supernet(space, RESOLUTION[name]).train()
    arch = space.sample(random.Random(seed))
    # a shallower arch, so that whole blocks are unused
    arch = arch.replace(stages=tuple(s.__class__(s.dim, s.heads, s.mlp_ratio, s.blocks[:1]) for s in arch.stages), shortcuts=())
    model = supernet.extract(arch)
    x, y = torch.randn(4, 3, supernet.img_size, supernet.img_size), torch.randint(0, arch.num_classes, (4,))

    loss = torch.nn.functional.cross_entropy(supernet(x, arch), y)
    loss.backward()
    torch.nn.functional.cross_entropy(model(x), y).backward()

    # 1. the supernet's gradient, cut to the arch's slices, is the standalone model's gradient ...
    sliced = dict(_sliced_grads(supernet, arch).named_parameters())
    for pname, p in model.named_parameters():
        torch.testing.assert_close(sliced[pname], p.grad, atol=1e-5, rtol=1e-4, msg=pname)
    # 2. ... and there is no gradient anywhere else
    total = sum(float(p.grad.abs().sum()) for p in supernet.parameters() if p.grad is not None)
    inside = sum(float(g.detach().abs().sum()) for g in sliced.values())
    assert total == pytest.approx(inside, rel=1e-5)
    # 3. blocks beyond the arch's depth get no gradient at all
    for s, stage in enumerate(supernet.stages):
        for block in stage.blocks[1:]:
            assert all(p.grad is None or not p.grad.any() for p in block.parameters())

    # 4. an AdamW step (no weight decay) moves only used weights
    unused = {n: p.detach().clone() for n, p in supernet.named_parameters() if p.grad is None or not p.grad.any()}
    before = {n: p.detach().clone() for n, p in supernet.named_parameters()}
    torch.optim.AdamW(supernet.parameters(), lr=1e-2, weight_decay=0.0).step()
    for n, p in supernet.named_parameters():
        if n in unused:
            assert torch.equal(p, unused[n]), n
    changed = [n for n, p in supernet.named_parameters() if not torch.equal(p, before[n])]
    assert changed and set(changed) <= {n for n in before if n not in unused}


def test_unused_branches_get_no_gradient(spaces):
    space = spaces["tiny"]
    supernet = Supernet(space, 16).train()
    arch = space.build(lambda gene, options: options[0])  # global mixers, no LIFE, no FFN conv, no shortcuts, no tokens
    assert all(b.mixer == "global" and not b.life and not b.ffn_kernel for _, _, _, b in arch.iter_blocks())
    supernet(torch.randn(2, 3, 16, 16), arch).sum().backward()
    block = supernet.stages[0].blocks[0]

    def untouched(module):
        return all(p.grad is None or not p.grad.any() for p in module.parameters())

    assert untouched(block.attn.life) and untouched(block.attn.rel_pos) and untouched(block.shortcut)
    assert untouched(block.ffn.conv) and untouched(supernet.global_tokens)
    assert block.attn.q.weight.grad[: arch.stages[0].dim, :].any()


# ------------------------------------------------------------------------------------- BatchNorm
@pytest.mark.parametrize("name", ["tiny", "tiny_columnar"])
def test_recalibrate_batchnorm(name, spaces):
    space = spaces[name]
    torch.manual_seed(0)
    supernet = Supernet(space, RESOLUTION[name])
    assert supernet.uses_batchnorm()
    arch = space.sample(random.Random(4))
    norms = {n: m for n, m in supernet.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    before = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in norms.items()}
    momenta = {n: m.momentum for n, m in norms.items()}

    seen: dict[str, list[torch.Tensor]] = {n: [] for n in norms}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: seen[n].append(inp[0].detach())) for n, m in norms.items()]
    batches = [torch.randn(8, 3, supernet.img_size, supernet.img_size) * (i + 1) + i for i in range(3)]
    recalibrate_batchnorm(supernet, lambda x: supernet(x, arch), batches)
    for hook in hooks:
        hook.remove()

    assert not supernet.training  # left in eval mode
    assert {n: m.momentum for n, m in norms.items()} == momenta
    used = [n for n in norms if seen[n]]
    assert used, "the arch runs no BatchNorm"
    for n in used:
        m = norms[n]
        c = seen[n][0].shape[1]
        assert len(seen[n]) == len(batches)
        # the statistics are the plain average of the per-batch statistics (momentum None)
        means = torch.stack([t.mean((0, 2, 3)) for t in seen[n]]).mean(0)
        variances = torch.stack([t.transpose(0, 1).flatten(1).var(1, unbiased=True) for t in seen[n]]).mean(0)
        torch.testing.assert_close(m.running_mean[:c], means, rtol=1e-4, atol=1e-5, msg=n)
        torch.testing.assert_close(m.running_var[:c], variances, rtol=1e-4, atol=1e-5, msg=n)
        assert not torch.equal(m.running_mean[:c], before[n][0][:c])

    # the recalibrated supernet and the model extracted from it agree in eval mode
    x = torch.randn(2, 3, supernet.img_size, supernet.img_size)
    with torch.no_grad():
        assert (supernet(x, arch) - supernet.extract(arch).eval()(x)).abs().max() <= 1e-4

    # recalibration starts from scratch: doing it again gives the same statistics
    first = {n: norms[n].running_mean.clone() for n in used}
    recalibrate_batchnorm(supernet, lambda x: supernet(x, arch), batches)
    for n in used:
        torch.testing.assert_close(norms[n].running_mean, first[n])


def test_recalibrate_without_batchnorm_is_a_no_op():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3)).eval()
    calls = []
    recalibrate_batchnorm(model, lambda x: calls.append(x), [torch.zeros(1, 3)])
    assert calls == [] and not model.training
