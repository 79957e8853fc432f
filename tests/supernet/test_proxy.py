"""nasloc.supernet.proxy: proxy top-1 with supernet weights (BatchNorm recalibrated per subnet), the evaluator
rebuilt in a fresh process from a checkpoint, and measured latency. Tiny spaces, digits at 16 px."""
from __future__ import annotations

import math
import pickle
import random
from dataclasses import replace
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from nasloc.arch import Arch
from nasloc.deploy.latency import Target, measure_archs_us
from nasloc.models import LocalityViT
from nasloc.space.band import Band
from nasloc.space.files import SPACES_DIR
from nasloc.space.search_space import SearchSpace
from nasloc.supernet.proxy import EvaluatorSpec, ProxyEvaluator, make_evaluator
from nasloc.supernet.supernet import Supernet
from nasloc.supernet.train import SandwichSampler, SupernetConfig, train_supernet
from nasloc.training.data import DataSplits, load_dataset

COLUMNAR_BAND = Band(1.5e5, 4e5)  # tiny_columnar spans 57k - 643k MACs at 16 px
# 2 epochs of 8 steps: above chance (10 %) and shared BatchNorm statistics that moved, in a few seconds.
BRIEF = SupernetConfig(epochs=2, batch_size=32, lr=1e-2, warmup_epochs=0, num_workers=0)
BRIEF_IMAGES = 256


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return load_dataset("digits", None, img_size=16)  # what EvaluatorSpec loads too (seed 0)


def _briefly_trained(space: SearchSpace, band: Band, splits: DataSplits, out: Path) -> Supernet:
    """A supernet after 16 sandwich steps."""
    torch.set_num_threads(1)  # module fixtures may run before conftest's per-test setting
    torch.manual_seed(0)
    supernet = Supernet(space)
    few = replace(splits, train=splits.train.subset(np.arange(BRIEF_IMAGES)))
    train_supernet(supernet, few, band, BRIEF, out, device="cpu", progress=False)
    return supernet


@pytest.fixture(scope="module")
def columnar(digits, tmp_path_factory):
    """tiny_columnar: every arch has BatchNorm (LocalViT's FFN), some also DW shortcuts."""
    out = tmp_path_factory.mktemp("columnar")
    supernet = _briefly_trained(SearchSpace.load("tiny_columnar"), COLUMNAR_BAND, digits, out)
    return supernet, out / "last.pth", make_evaluator(supernet, digits)


def _band_archs(supernet: Supernet, band: Band, n: int) -> list[Arch]:
    sampler = SandwichSampler(supernet, band, random_subnets=n - 2)
    return sampler.step(random.Random(1))


def _norms(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


def _supernet_top1(supernet: Supernet, arch: Arch, loader) -> float:
    """Top-1 of the subnet run inside the supernet, with the supernet's shared statistics."""
    supernet.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (supernet(x, arch).argmax(1) == y).sum().item()
            total += len(y)
    return 100.0 * correct / total


# ---------------------------------------------------------------------------------------------- tests
def test_proxy_top1_is_a_percentage_and_leaves_the_supernet_alone(columnar):
    supernet, _, evaluator = columnar
    assert isinstance(evaluator, ProxyEvaluator)
    before = {k: v.clone() for k, v in supernet.state_dict().items()}
    archs = _band_archs(supernet, COLUMNAR_BAND, 3)
    scores = [evaluator(arch) for arch in archs]
    assert all(0.0 <= s <= 100.0 for s in scores), scores
    assert max(scores) > 12, scores  # chance is 10
    assert evaluator(archs[0]) == scores[0]  # deterministic: the same calibration batches every time
    for name, value in supernet.state_dict().items():  # statistics are recalibrated on a copy
        assert torch.equal(value, before[name]), name


def test_batchnorm_statistics_are_recalibrated_per_subnet(columnar):
    supernet, _, evaluator = columnar
    arch = next(a for a in _band_archs(supernet, COLUMNAR_BAND, 6) if a.shortcuts)  # FFN and shortcut BNs
    raw, calibrated = _norms(supernet.extract(arch)), _norms(evaluator.model(arch))
    assert raw.keys() == calibrated.keys() and any(".shortcut." in name for name in raw)
    assert any(".ffn." in name for name in raw)
    for name, norm in calibrated.items():
        assert not torch.allclose(norm.running_mean, raw[name].running_mean), name
        assert not torch.allclose(norm.running_var, raw[name].running_var), name
        assert norm.momentum == raw[name].momentum  # restored after calibration

    # The statistics are the plain average over the calibration batches of each BatchNorm's input
    # statistics (measured here in train mode, in which BatchNorm normalises by the batch itself).
    probe = supernet.extract(arch).train()
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in raw}
    hooks = [m.register_forward_pre_hook(lambda _m, args, name=name: seen[name].append(
        (args[0].mean((0, 2, 3)), args[0].transpose(0, 1).flatten(1).var(1, unbiased=True))))
        for name, m in _norms(probe).items()]
    with torch.no_grad():
        for x, _ in islice(evaluator.calib_loader, evaluator.calib_batches):
            probe(x)
    for hook in hooks:
        hook.remove()
    for name, norm in calibrated.items():
        assert len(seen[name]) == evaluator.calib_batches
        mean = torch.stack([m for m, _ in seen[name]]).mean(0)
        var = torch.stack([v for _, v in seen[name]]).mean(0)
        torch.testing.assert_close(norm.running_mean, mean, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(norm.running_var, var, rtol=1e-4, atol=1e-5, msg=name)


def test_batchnorm_free_arch_scores_exactly_the_supernets_own_accuracy(digits, tmp_path):
    # tiny_columnar with the plain MLP FFN: only the DW shortcuts have BatchNorm, so an arch without
    # shortcuts has none and there is nothing to recalibrate. (Average pooling instead of the class
    # token: after 16 steps the class-token head still predicts one class for every image.)
    data = yaml.safe_load((SPACES_DIR / "tiny_columnar.yaml").read_text())
    data["genes"]["ffn"] = ["mlp"]
    data["genes"].pop("stem")  # the conv stem has BatchNorm too
    data["skeleton"].update(head="avg", cls_token=False)
    space = SearchSpace.from_dict(data, source="tiny_columnar_mlp")
    supernet = _briefly_trained(space, COLUMNAR_BAND, digits, tmp_path)
    assert supernet.uses_batchnorm()
    evaluator = make_evaluator(supernet, digits)
    rng = random.Random(0)
    for _ in range(2):
        arch = space.build(lambda name, options: 0 if name.endswith(".shortcut") else rng.choice(options))
        assert not arch.shortcuts and not _norms(LocalityViT(arch))
        model = evaluator.model(arch)
        supernet.eval()
        predictions = []
        with torch.no_grad():
            for x, _ in evaluator.val_loader:
                logits = supernet(x, arch)
                assert torch.equal(model(x), logits)
                predictions.append(logits.argmax(1))
        assert len(torch.cat(predictions).unique()) >= 3  # not a constant prediction
        assert evaluator(arch) == _supernet_top1(supernet, arch, evaluator.val_loader)


def test_evaluator_rebuilt_from_the_checkpoint_agrees(columnar):
    supernet, checkpoint, evaluator = columnar
    spec = EvaluatorSpec(space="tiny_columnar", checkpoint=str(checkpoint), img_size=16, dataset="digits",
                         data_dir=None, seed=0, device="cpu")
    assert pickle.loads(pickle.dumps(spec)) == spec  # what a Ray worker receives
    rebuilt = spec()
    assert rebuilt is not evaluator and rebuilt.supernet is not supernet
    for name, value in supernet.state_dict().items():
        assert torch.equal(rebuilt.supernet.state_dict()[name], value), name
    x, _ = next(iter(evaluator.val_loader))
    for arch in _band_archs(supernet, COLUMNAR_BAND, 2):  # the band's largest and smallest
        with torch.no_grad():  # the same recalibrated model, so the same logits
            assert torch.equal(rebuilt.model(arch)(x), evaluator.model(arch)(x))
        assert rebuilt(arch) == evaluator(arch)


def test_end_to_end_latency_is_positive_and_grows_with_the_batch(columnar):
    supernet, _, _ = columnar
    arch = _band_archs(supernet, COLUMNAR_BAND, 2)[0]
    # the fastest of 5 rounds: a busy machine (other trainings) slowed a single round of batch 1 past batch 32
    one, many = (measure_archs_us([arch], Target(batch_size=b), rounds=5)[0] for b in (1, 32))
    assert math.isfinite(one) and 0 < one < many
