"""CUDA out of memory in the supernet training or in a selection candidate's training: one line naming the arch, the
batch size and half of it, nothing lost (the checkpoints written before stay, nothing half-written), and the rerun
resumes.

``torch.cuda.OutOfMemoryError`` exists in CPU builds too: a forward hook raises it, with the text CUDA gives, in
the forward pass of a chosen step, where a GPU would run out.
"""
from __future__ import annotations

import pickle
import random
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from nasloc.cli.main import search_main
from nasloc.errors import NaslocError, OutOfMemory
from nasloc.models import LocalityViT
from nasloc.selection.candidates import Candidate
from nasloc.selection.trainer import RungTrainer, SelectionConfig
from nasloc.space.band import Band
from nasloc.space.search_space import SearchSpace
from nasloc.supernet.supernet import Supernet
from nasloc.supernet.train import SandwichSampler, SupernetConfig, described, train_supernet
from nasloc.training.data import DataSplits, load_dataset

pytestmark = pytest.mark.timeout(600)
CUDA_TEXT = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.11 GiB of which "
             "1.06 GiB is free. Including non-PyTorch memory, this process has 78.04 GiB memory in use.")
BAND = Band(5e5, 1.2e6)
FAST = {"batch_size": 16, "lr": 2e-3, "warmup_epochs": 0, "random_subnets": 1, "num_workers": 0}  # 4 steps of 64


@pytest.fixture(scope="module")
def few_digits() -> DataSplits:
    digits = load_dataset("digits", None, img_size=16)
    return replace(digits, train=digits.train.subset(np.arange(64)), val=digits.val.subset(np.arange(50)))


@contextmanager
def out_of_memory_in(kind: type, when: Callable[[int], bool]) -> Iterator[list[int]]:
    """While in it, the ``n``-th training forward of any ``kind`` module (counted from 1) raises CUDA's out of
    memory error when ``when(n)``: a global forward hook, as a GPU that runs out in that pass."""
    calls: list[int] = []

    def hook(module: torch.nn.Module, args: object, output: object) -> None:
        if isinstance(module, kind) and module.training:
            calls.append(len(calls) + 1)
            if when(calls[-1]):
                raise torch.cuda.OutOfMemoryError(CUDA_TEXT)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


def _one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert isinstance(error.value, NaslocError) and "\n" not in text and "Traceback" not in text
    assert pickle.loads(pickle.dumps(error.value)).args == error.value.args  # crosses a --workers process intact
    return text


# ------------------------------------------------------------------------------------------- supernet
def _train(splits: DataSplits, out: Path, **cfg) -> object:
    torch.manual_seed(0)
    return train_supernet(Supernet(SearchSpace.load("tiny")), splits, BAND, SupernetConfig(**{**FAST, **cfg}), out,
                          device="cpu", progress=False)


def test_supernet_out_of_memory_is_one_line_keeps_the_epochs_and_the_rerun_resumes(few_digits, tmp_path):
    out = tmp_path / "supernet"
    _train(few_digits, out, epochs=1)
    kept = _files(out)
    assert "last.pth" in kept
    # Epoch 2, step 1: the largest arch's forward passes, the smallest arch's (the 2nd forward) runs out.
    with out_of_memory_in(Supernet, lambda n: n == 2) as calls, pytest.raises(OutOfMemory) as error:
        _train(few_digits, out, epochs=2)
    assert calls == [1, 2]
    supernet = Supernet(SearchSpace.load("tiny"))
    smallest = supernet.at_resolution(SandwichSampler(supernet, BAND, 1).extremes[0][1])
    assert _one_line(error) == (
        f"CUDA out of memory in the supernet training (epoch 2 step 1) on the smallest arch of the band "
        f"({described(smallest)}) at --batch-size 16 (tried to allocate 2.00 GiB); rerun with --batch-size 8; the "
        f"completed epochs stay in {out / 'last.pth'} and the rerun resumes from them")
    assert re.fullmatch(r"0\.\d+M MACs, depth \d+, dim [\d/]+: mixers .*stem", described(smallest))
    assert _files(out) == kept  # epoch 1 intact, no temporary file left
    rerun = _train(few_digits, out, epochs=2, batch_size=8)  # the fix the line names
    assert rerun.epochs_run == 1 and np.isfinite(rerun.last_loss)  # epoch 2 only: epoch 1 was resumed
    assert torch.load(out / "last.pth", weights_only=True)["epoch"] == 1


def test_supernet_out_of_memory_before_any_epoch_writes_nothing(few_digits, tmp_path):
    out = tmp_path / "supernet"
    with out_of_memory_in(Supernet, lambda n: n == 1), pytest.raises(OutOfMemory) as error:
        _train(few_digits, out, epochs=1, batch_size=1)
    assert re.fullmatch(r"CUDA out of memory in the supernet training \(epoch 1 step 1\) on the largest arch of the "
                        r"band \(.*\) at --batch-size 1 \(tried to allocate 2\.00 GiB\); the batch size is already 1: use "
                        r"a device with more memory, or a smaller --budget or image size; no epoch was completed yet",
                        _one_line(error))
    assert _files(out) == {}


def test_the_command_ends_in_one_line_with_status_2_and_the_rerun_resumes(tmp_path, capsys):
    """``run_search.py --phase supernet`` runs out in epoch 2, right after epoch 1's checkpoint is written."""
    results = tmp_path / "results"
    argv = ["--space", "tiny", "--budget", "1M", "--dataset", "digits", "--device", "cpu", "--seed", "0",
            "--supernet-epochs", "2", "--phase", "supernet", "--batch-size", "256", "--results-dir", str(results)]
    checkpoint = results / "tiny-digits-1M" / "supernet" / "last.pth"
    with out_of_memory_in(Supernet, lambda n: checkpoint.exists()):
        assert search_main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]  # progress bars come first
    errors = [line for line in lines if line.startswith("run_search.py: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    assert errors[0].startswith("run_search.py: error: CUDA out of memory in the supernet training (epoch 2 step 1) "
                                "on the largest arch of the band ("), err
    assert ") at --batch-size 256 (tried to allocate 2.00 GiB); rerun with --batch-size 128; the completed epochs " \
           f"stay in {checkpoint} and the rerun resumes from them" in errors[0], err
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 0
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["last.pth"]  # nothing half-written
    assert search_main(argv) == 0  # the same command, with the memory there: epoch 2 only
    err = capsys.readouterr().err
    assert "supernet epoch 1/2" not in err and torch.load(checkpoint, weights_only=True)["epoch"] == 1


# ------------------------------------------------------------------------------------------- selection
def test_a_selection_candidate_out_of_memory_is_one_line_and_the_rerun_resumes(few_digits, tmp_path):
    space = SearchSpace.load("tiny").for_classes(few_digits.num_classes)
    supernet = Supernet(space, img_size=16)
    arch = space.sample_in_band(random.Random(0), BAND.lo, BAND.hi)
    candidate = Candidate("7", arch, 7)

    def trainer(batch_size: int) -> RungTrainer:
        return RungTrainer(supernet, few_digits, SelectionConfig(epochs=2, schedule_epochs=2, batch_size=batch_size),
                           lambda trial: tmp_path / f"trial_{trial}", device="cpu")

    first = trainer(16)(3, candidate, 1)  # rung 1
    folder = tmp_path / "trial_7"
    kept = _files(folder)
    assert "last.pth" in kept
    with out_of_memory_in(LocalityViT, lambda n: n == 2), pytest.raises(OutOfMemory) as error:
        trainer(16)(3, candidate, 2)  # rung 2: epoch 2 runs out at its 2nd step
    assert _one_line(error) == (
        f"CUDA out of memory training selection candidate search trial 7 ({described(supernet.at_resolution(arch))}) "
        f"at --batch-size 16 (tried to allocate 2.00 GiB); rerun with --batch-size 8; the rungs already scored and the "
        f"epochs trained (in {folder}) are kept, and the rerun resumes from them")
    assert _files(folder) == kept
    with pytest.warns(UserWarning, match="resuming with changed settings; the checkpoint was made with batch_size=16"):
        second = trainer(8)(3, candidate, 2)
    assert second.first(1) == first and len(second.train_loss) == 2  # epoch 1 resumed, not trained again
