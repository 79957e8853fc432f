"""nasloc.supernet.train on the tiny space and the embedded digits at 16 px: sandwich sampling inside the
MACs band, learning, atomic checkpoints, exact resume, refusals, NaN guard and DDP on gloo."""
from __future__ import annotations

import logging
import math
import os
import random
import shutil
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from nasloc.errors import NaslocError, TrainingDiverged
from nasloc.space.band import Band
from nasloc.space.flops import count
from nasloc.space.search_space import SearchSpace
from nasloc.supernet.supernet import Supernet
from nasloc.supernet.train import FINISHED, SandwichSampler, SupernetConfig, load_supernet, train_supernet
from nasloc.training.checkpoint import finish_checkpoint
from nasloc.training.data import DataSplits, load_dataset
from nasloc.training.distributed import cleanup_distributed

SPACE = "tiny"  # MACs of its archs span 0.23M - 2.6M at 16 px
BAND = Band(5e5, 1.2e6)
# 64 training images in batches of 16: 4 sandwich steps (12 forwards) per epoch.
FAST = dict(batch_size=16, lr=2e-3, warmup_epochs=0, random_subnets=1, num_workers=0)
STEPS = 4


@pytest.fixture(scope="module")
def few_digits() -> DataSplits:
    digits = load_dataset("digits", None, img_size=16)
    return replace(digits, train=digits.train.subset(np.arange(64)), val=digits.val.subset(np.arange(50)))


def _train(supernet: Supernet, splits: DataSplits, out: Path, band: Band = BAND, **cfg):
    torch.set_num_threads(1)  # module fixtures may run before conftest's per-test setting
    config = SupernetConfig(**{**FAST, **cfg})
    return train_supernet(supernet, splits, band, config, out, device="cpu", progress=False)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


class Preempted(Exception):
    pass


class KilledSupernet(Supernet):
    """The supernet of a job that is killed after `forwards` training forwards (mid-epoch)."""

    def __init__(self, space: SearchSpace, forwards: int):
        super().__init__(space)
        self.forwards_left = forwards

    def forward(self, x, arch=None):
        if self.training:
            self.forwards_left -= 1
            if self.forwards_left < 0:
                raise Preempted
        return super().forward(x, arch)


@pytest.fixture(scope="module")
def straight(few_digits, tmp_path_factory):
    """An uninterrupted 2-epoch run, watched at every torch.save."""
    out = tmp_path_factory.mktemp("straight")
    torch.manual_seed(0)
    supernet = Supernet(SearchSpace.load(SPACE))
    initial = _state(supernet)
    saves = []
    real_save = torch.save

    def watching_save(obj, f, *args, **kwargs):
        last = out / "last.pth"
        # What a reader would find at last.pth while this file is being written.
        previous = torch.load(last, weights_only=True)["epoch"] if last.exists() else None
        saves.append((Path(f.name), previous))  # save_checkpoint writes through an open file
        return real_save(obj, f, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "save", watching_save)
        result = _train(supernet, few_digits, out, epochs=2)
    return dict(out=out, result=result, initial=initial, final=_state(supernet), saves=saves)


# ---------------------------------------------------------------------------------------------- sampler
def test_sandwich_sampler_gives_largest_smallest_and_random_archs_inside_the_band():
    sampler = SandwichSampler(Supernet(SearchSpace.load(SPACE)), BAND, random_subnets=3)
    (largest_arch, smallest_arch), = sampler.extremes  # one stem in this space: one pair
    largest, smallest = count(largest_arch).macs, count(smallest_arch).macs
    width = BAND.hi - BAND.lo
    assert BAND.hi - 0.05 * width <= largest <= BAND.hi  # at the edges of the band, not merely inside it
    assert BAND.lo <= smallest <= BAND.lo + 0.05 * width
    rng = random.Random(0)
    randoms = []
    for _ in range(8):
        archs = sampler.step(rng)
        assert len(archs) == 5 and archs[0] == largest_arch and archs[1] == smallest_arch
        randoms += archs[2:]
    macs = [count(a).macs for a in randoms]
    assert all(BAND.lo <= m <= BAND.hi for m in macs), macs
    assert len(set(randoms)) == len(randoms)  # really random, and spread over the band
    assert max(macs) - min(macs) > width / 3
    # The same seed gives the same archs: every DDP rank trains the same subnets at every step.
    again = random.Random(0)
    assert [a for _ in range(8) for a in sampler.step(again)[2:]] == randoms


def test_each_searched_stem_gets_its_own_largest_and_smallest_arch_in_turn():
    # By MACs alone the extremes would always take the cheaper patch stem, and the shared blocks would be
    # trained mostly on its features (the conv stem only in random subnets, never as the teacher).
    space = SearchSpace.load("tiny_columnar")
    band = Band(1.5e5, 4e5)
    sampler = SandwichSampler(Supernet(space), band, random_subnets=1)
    assert [(large.stem, small.stem) for large, small in sampler.extremes] == [("patch", "patch"), ("conv", "conv")]
    for large, small in sampler.extremes:  # each stem's own extremes, inside the band
        assert band.lo <= count(small).macs < count(large).macs <= band.hi
        assert count(large).macs >= band.hi - 0.1 * (band.hi - band.lo)
    rng = random.Random(0)
    firsts = [sampler.step(rng)[:2] for _ in range(40)]
    assert all(tuple(pair) in sampler.extremes for pair in firsts)
    assert 10 <= sum(large.stem == "conv" for large, _ in firsts) <= 30


def test_random_archs_spread_evenly_over_the_macs_band():
    space = SearchSpace.load(SPACE)
    lo, hi = space.macs_range()
    band = Band(lo, hi)  # the whole space: most of its archs are small

    def quarters(sub_bands: int) -> list[int]:
        sampler = SandwichSampler(Supernet(space), band, random_subnets=1, sub_bands=sub_bands)
        rng = random.Random(0)
        macs = [count(sampler.step(rng)[2]).macs for _ in range(200)]
        assert all(lo <= m <= hi for m in macs)
        return np.bincount([min(int(4 * (m - lo) / (hi - lo)), 3) for m in macs], minlength=4).tolist()

    even, uniform = quarters(4), quarters(1)
    assert min(even) >= 35, even  # 50 expected in each
    assert uniform[3] < 10 < 35 <= even[3], (uniform, even)  # uniform archs of the band hardly reach its top

    assert Band(0, 8).split(4) == [Band(0, 2), Band(2, 4), Band(4, 6), Band(6, 8)]
    below = Band(0, 3.9 * lo)  # its lowest quarter holds no arch: left out
    assert SandwichSampler(Supernet(space), below, random_subnets=1).parts == below.split(4)[1:]


# ---------------------------------------------------------------------------------------------- training
def test_training_is_finite_changes_weights_and_checkpoints_atomically(straight):
    result, out = straight["result"], straight["out"]
    assert math.isfinite(result.last_loss) and 0 < result.last_loss < 10
    assert result.epochs_run == 2 and result.checkpoint == out / "last.pth"
    changed = [k for k, v in straight["initial"].items() if not torch.equal(v, straight["final"][k])]
    for name in ("stem.proj.weight", "head.weight", "stages.0.blocks.0.attn.q.weight"):
        assert name in straight["initial"] and name in changed, name
    assert len(changed) > len(straight["initial"]) // 2

    # One save per epoch, each to a temporary file beside last.pth (a rename is atomic only within one
    # file system); while it is written, last.pth still holds the previous complete epoch.
    assert [(p.parent, p.name != "last.pth") for p, _ in straight["saves"]] == [(out, True)] * 2
    assert [previous for _, previous in straight["saves"]] == [None, 0]
    # Nothing temporary left behind; the epoch before the last is kept until a newer one is complete.
    assert sorted(p.name for p in out.iterdir()) == ["last.pth", "previous.pth"]
    assert torch.load(out / "previous.pth", weights_only=True)["epoch"] == 0

    saved = torch.load(out / "last.pth", weights_only=True)
    assert saved["epoch"] == 1 and saved["band"] == {"lo": BAND.lo, "hi": BAND.hi} and saved["img_size"] == 16
    _assert_same_state(saved["model"], straight["final"])


def test_killed_run_resumes_to_the_same_weights(straight, few_digits, tmp_path):
    space = SearchSpace.load(SPACE)
    torch.manual_seed(0)
    killed = KilledSupernet(space, forwards=3 * (STEPS + 1) + 1)  # dies inside epoch 2, step 2
    with pytest.raises(Preempted):
        _train(killed, few_digits, tmp_path, epochs=2)
    assert torch.load(tmp_path / "last.pth", weights_only=True)["epoch"] == 0

    torch.manual_seed(1)  # another init: everything must come from the checkpoint
    supernet = Supernet(space)
    result = _train(supernet, few_digits, tmp_path, epochs=2)
    assert result.epochs_run == 1
    # Weights, BatchNorm statistics, optimizer, lr schedule, shuffle, augmentation and sampled archs resumed.
    _assert_same_state(_state(supernet), straight["final"])
    assert result.last_loss == straight["result"].last_loss

    again = _train(supernet, few_digits, tmp_path, epochs=2)  # nothing left to do
    assert again.epochs_run == 0
    _assert_same_state(_state(supernet), straight["final"])


def test_more_epochs_resume_from_the_saved_epoch_on_the_longer_schedule(straight, few_digits, tmp_path):
    shutil.copy(straight["out"] / "last.pth", tmp_path / "last.pth")
    torch.manual_seed(5)
    supernet = Supernet(SearchSpace.load(SPACE))
    result = _train(supernet, few_digits, tmp_path, epochs=3)
    assert result.epochs_run == 1 and math.isfinite(result.last_loss)
    saved = torch.load(tmp_path / "last.pth", weights_only=True)
    assert saved["epoch"] == 2 and saved["config"]["epochs"] == 3
    # The cosine schedule of the resumed run spans 3 epochs; the checkpoint's 2-epoch schedule would
    # have trained the whole third epoch at min_lr.
    assert saved["scheduler"]["t_initial"] == 3 * STEPS


def test_a_finished_cut_down_checkpoint_warns_only_when_more_epochs_follow(straight, few_digits, tmp_path, caplog):
    """--keep-checkpoints needed drops the optimizer state of a finished supernet: a rerun of the same run says
    nothing (nothing is trained), a longer one says its next epochs start a fresh optimizer."""
    shutil.copy(straight["out"] / "last.pth", tmp_path / "last.pth")
    finish_checkpoint(tmp_path / "last.pth", keep=FINISHED)
    with caplog.at_level(logging.WARNING, logger="nasloc.supernet.train"):
        assert _train(Supernet(SearchSpace.load(SPACE)), few_digits, tmp_path, epochs=2).epochs_run == 0
        assert not [r for r in caplog.records if "kept no optimizer state" in r.getMessage()]
        assert _train(Supernet(SearchSpace.load(SPACE)), few_digits, tmp_path, epochs=3).epochs_run == 1
    assert [r for r in caplog.records if "kept no optimizer state" in r.getMessage()]


def test_checkpoint_of_another_band_or_space_is_refused_in_one_line(straight, few_digits, tmp_path):
    shutil.copy(straight["out"] / "last.pth", tmp_path / "last.pth")
    before = (tmp_path / "last.pth").read_bytes()
    supernet = Supernet(SearchSpace.load(SPACE))
    with pytest.raises(NaslocError, match="MACs band") as band_error:
        _train(supernet, few_digits, tmp_path, band=Band(6e5, 1.2e6), epochs=3)
    other = Supernet(SearchSpace.load("tiny_columnar"))
    with pytest.raises(NaslocError, match="another space or resolution") as space_error:
        _train(other, few_digits, tmp_path, epochs=3)
    with pytest.raises(NaslocError, match="another space or resolution") as load_error:
        load_supernet(tmp_path / "last.pth", Supernet(SearchSpace.load(SPACE), img_size=32))
    for error in (band_error, space_error, load_error):
        message = str(error.value)
        assert "\n" not in message and str(tmp_path / "last.pth") in message
    assert (tmp_path / "last.pth").read_bytes() == before  # refused before touching anything

    loaded = load_supernet(tmp_path / "last.pth", Supernet(SearchSpace.load(SPACE)))  # the right one loads
    _assert_same_state(_state(loaded), straight["final"])


def _truncate(path: Path) -> None:
    """What a full disk or an interrupted copy leaves: the first half of the file."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_checkpoint_resumes_from_the_previous_epoch(straight, few_digits, tmp_path, caplog):
    for name in ("last.pth", "previous.pth"):
        shutil.copy(straight["out"] / name, tmp_path / name)
    previous = (tmp_path / "previous.pth").read_bytes()
    _truncate(tmp_path / "last.pth")
    torch.manual_seed(1)  # another init: everything must come from previous.pth
    supernet = Supernet(SearchSpace.load(SPACE))
    result = _train(supernet, few_digits, tmp_path, epochs=2)

    assert result.epochs_run == 1  # epoch 1 of 0-1 again, not a restart from scratch
    _assert_same_state(_state(supernet), straight["final"])
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "\n" not in warning and warning.startswith(f"{tmp_path / 'last.pth'}: unreadable checkpoint (")
    assert warning.endswith(f"resuming from {tmp_path / 'previous.pth'}")
    assert torch.load(tmp_path / "last.pth", weights_only=True)["epoch"] == 1
    assert (tmp_path / "previous.pth").read_bytes() == previous  # the good one, not the broken one, is kept
    assert (tmp_path / "last.pth.unreadable").exists()  # moved aside, for a look


def test_truncated_checkpoint_without_a_previous_one_starts_again_in_one_line(straight, few_digits, tmp_path, caplog):
    shutil.copy(straight["out"] / "last.pth", tmp_path / "last.pth")
    _truncate(tmp_path / "last.pth")
    result = _train(Supernet(SearchSpace.load(SPACE)), few_digits, tmp_path, epochs=1)
    assert result.epochs_run == 1
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(f"{tmp_path / 'last.pth'}: unreadable checkpoint (") and "\n" not in warning
    assert warning.endswith(f"no earlier checkpoint: starting this training again in {tmp_path}")
    with pytest.raises(NaslocError, match="unreadable checkpoint") as error:  # the trained result: no fallback
        load_supernet(tmp_path / "last.pth.unreadable", Supernet(SearchSpace.load(SPACE)))
    assert str(error.value).startswith(str(tmp_path / "last.pth.unreadable")) and "\n" not in str(error.value)


class NaNImages(Dataset):
    """Float images are taken as already normalised by the loader, so NaN reaches the model as is."""

    hflip = False

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.full((3, 16, 16), float("nan")), i % 10


def test_nan_loss_raises_a_one_line_error(few_digits, tmp_path):
    supernet = Supernet(SearchSpace.load(SPACE))
    with pytest.raises(TrainingDiverged, match="loss became nan at epoch 1") as error:
        _train(supernet, replace(few_digits, train=NaNImages()), tmp_path, epochs=1)
    assert isinstance(error.value, NaslocError) and isinstance(error.value, FloatingPointError)  # the CLI prints one line
    assert "\n" not in str(error.value)
    assert not (tmp_path / "last.pth").exists()


# ---------------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, port: int, splits: DataSplits, out: Path) -> None:
    # What torchrun would set; setup_distributed() inside train_supernet() reads it.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)  # a forked child can't reuse the parent's OpenMP pool
    torch.manual_seed(100 + rank)  # a different init per rank: rank 0's weights must reach rank 1
    supernet = Supernet(SearchSpace.load(SPACE))
    torch.save(_state(supernet), out / f"init{rank}.pt")
    result = _train(supernet, splits, out, epochs=1)
    assert result.epochs_run == 1 and math.isfinite(result.last_loss)
    torch.save(_state(supernet), out / f"rank{rank}.pt")
    cleanup_distributed()


@pytest.mark.timeout(180)  # a rendezvous that never completes must fail the test, not hang CI
def test_ddp_two_cpu_processes_end_with_identical_weights(few_digits, tmp_path):
    # fork, not spawn: the children inherit the imported torch/timm/nasloc instead of paying ~10 s each.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.start_processes(_ddp_worker, args=(port, few_digits, tmp_path), nprocs=2,
                                          daemon=True, start_method="fork")
    init = [torch.load(tmp_path / f"init{r}.pt", weights_only=True) for r in range(2)]
    final = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert not torch.equal(init[0]["head.weight"], init[1]["head.weight"])
    _assert_same_state(final[0], final[1])  # parameters and BatchNorm statistics
    assert not torch.equal(final[0]["head.weight"], init[0]["head.weight"])
    ckpt = torch.load(tmp_path / "last.pth", weights_only=True)
    _assert_same_state(ckpt["model"], final[0])
    # Each rank trained on its own half of the data: 64 images / 2 ranks / batch 16 = 2 steps.
    assert ckpt["scheduler"]["t_initial"] == 2
    steps = {int(s["step"]) for s in ckpt["optimizer"]["state"].values()}
    assert steps == {2}
