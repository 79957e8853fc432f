"""nasloc.training.retrain on the embedded digits with tiny real models: learning, checkpoint/resume, DDP on gloo."""
from __future__ import annotations

import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

from nasloc.errors import NaslocError, TrainingDiverged
from nasloc.training.data import DataSplits, load_dataset
from nasloc.training.distributed import cleanup_distributed, resolve_device
from nasloc.training.loader import make_loader
from nasloc.training.recipe import RetrainConfig
from nasloc.training.retrain import evaluate, retrain

# The short-run setting: no mixup/RandAugment (they slow learning over 2 epochs), no warm-up.
PLAIN = dict(batch_size=64, lr=4e-2, warmup_epochs=0, min_lr=1e-4, mixup=0.0, cutmix=0.0, randaugment="",
             num_workers=0)


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return load_dataset("digits", None, img_size=16)


@pytest.fixture(scope="module")
def few_digits(digits) -> DataSplits:
    """5 steps of 64 per epoch: enough to exercise every code path, cheap enough for 2 cores."""
    return replace(digits, train=digits.train.subset(np.arange(320)), val=digits.val.subset(np.arange(100)))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 64), nn.ReLU(), nn.Linear(64, 10))


def _vit(drop_path: float = 0.0) -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=1,
                             num_heads=2, num_classes=10, drop_path_rate=drop_path)


class Preempted(Exception):
    pass


class CrashAfter(nn.Module):
    """Wraps a model and raises after `steps` training forwards: a job killed mid-epoch."""

    def __init__(self, inner: nn.Module, steps: int):
        super().__init__()
        self.inner, self.steps, self.calls = inner, steps, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls > self.steps:
                raise Preempted
        return self.inner(x)


def test_retrain_learns_digits(digits, tmp_path):
    torch.manual_seed(0)
    result = retrain(_mlp(), digits, RetrainConfig(epochs=2, **PLAIN), tmp_path, progress=True)
    losses = [h["train_loss"] for h in result.history]
    assert losses[1] < losses[0] < 2.3
    assert result.val_top1 > 60  # chance is 10
    assert result.test_top1 is None and result.epochs_run == 2 and result.start_epoch == 0
    assert result.checkpoint == tmp_path / "last.pth" and result.checkpoint.exists()
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left nothing behind


@pytest.mark.parametrize("seed", [1, 2**31])
def test_any_seed_trains(digits, tmp_path, seed):
    """Each epoch draws from a seed of its own, about 1e10 times --seed: NumPy (timm's Mixup) takes 32 bits."""
    result = retrain(_mlp(), digits, RetrainConfig(epochs=1, seed=seed, **PLAIN), tmp_path, progress=False)
    assert result.epochs_run == 1 and np.isfinite(result.history[0]["train_loss"])


def test_full_recipe_checkpoints_and_resumes(few_digits, tmp_path):
    # The default DeiT recipe (mixup, cutmix, RandAugment, smoothing) plus EMA, on a timm ViT.
    cfg = RetrainConfig(epochs=1, batch_size=64, warmup_epochs=1, ema_decay=0.9, num_workers=0)
    torch.manual_seed(0)
    first = retrain(_vit(), few_digits, cfg, tmp_path, progress=False)
    assert first.ema_val_top1 is not None and np.isfinite(first.history[0]["train_loss"])
    saved = torch.load(first.checkpoint, weights_only=True)
    assert saved["epoch"] == 1 and saved["ema"] is not None and saved["num_updates"] == len(few_digits.train) // 64

    cfg.epochs = 2
    torch.manual_seed(1)  # a different init: the weights must come from the checkpoint
    model = _vit()
    second = retrain(model, few_digits, cfg, tmp_path, progress=False)
    assert (second.start_epoch, second.epochs_run, len(second.history)) == (1, 1, 2)
    assert second.history[0] == first.history[0]
    resumed = torch.load(second.checkpoint, weights_only=True)
    assert resumed["epoch"] == 2 and resumed["num_updates"] == 2 * saved["num_updates"]
    assert not torch.equal(resumed["model"]["head.weight"], saved["model"]["head.weight"])

    third = retrain(model, few_digits, cfg, tmp_path, progress=False)  # nothing left to train: evaluate only
    assert third.epochs_run == 0 and third.val_top1 == second.val_top1


@pytest.mark.parametrize("recipe", ["plain", "full"])
def test_killed_run_resumes_to_the_same_weights(few_digits, tmp_path, recipe):
    """Full: mixup, cutmix, RandAugment and drop path draw from the global random streams, which each epoch
    seeds anew: a resumed epoch draws what the uninterrupted one drew (not the first epoch's draws again)."""
    settings = PLAIN if recipe == "plain" else dict(batch_size=64, warmup_epochs=0, num_workers=0)
    cfg = RetrainConfig(epochs=2, **settings)
    steps_per_epoch = len(few_digits.train) // cfg.batch_size
    drop_path = 0.0 if recipe == "plain" else 0.2

    torch.manual_seed(0)
    straight = CrashAfter(_vit(drop_path), steps=10**9)
    retrain(straight, few_digits, cfg, tmp_path / "straight", progress=False)

    torch.manual_seed(0)
    with pytest.raises(Preempted):
        retrain(CrashAfter(_vit(drop_path), steps=steps_per_epoch + 2), few_digits, cfg, tmp_path / "killed",
                progress=False)
    assert torch.load(tmp_path / "killed" / "last.pth", weights_only=True)["epoch"] == 1

    torch.manual_seed(0)
    resumed_model = CrashAfter(_vit(drop_path), steps=10**9)
    result = retrain(resumed_model, few_digits, cfg, tmp_path / "killed", progress=False)
    assert result.start_epoch == 1
    for (name, a), b in zip(straight.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name  # optimizer, schedule, shuffle and augmentation all resumed exactly


def _truncate(path: Path) -> None:
    """What a full disk or an interrupted copy leaves: the first half of the file."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("stop_epoch", [None, 2], ids=["retrain", "selection-rung"])
def test_truncated_checkpoint_resumes_from_the_previous_epoch(few_digits, tmp_path, caplog, stop_epoch):
    # stop_epoch: a rung of successive halving (nasloc.selection.trainer.RungTrainer) ends its call after 2 of 3 epochs.
    cfg = RetrainConfig(epochs=2 if stop_epoch is None else 3, **PLAIN)
    torch.manual_seed(0)
    straight = _mlp()
    retrain(straight, few_digits, cfg, tmp_path, progress=False, stop_epoch=stop_epoch)
    previous = (tmp_path / "previous.pth").read_bytes()
    assert torch.load(tmp_path / "previous.pth", weights_only=True)["epoch"] == 1
    _truncate(tmp_path / "last.pth")

    torch.manual_seed(1)  # another init: the weights must come from previous.pth
    model = _mlp()
    result = retrain(model, few_digits, cfg, tmp_path, progress=False, stop_epoch=stop_epoch)
    assert (result.start_epoch, result.epochs_run, len(result.history)) == (1, 1, 2)
    for (name, a), b in zip(straight.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(f"{tmp_path / 'last.pth'}: unreadable checkpoint (") and "\n" not in warning
    assert warning.endswith(f"resuming from {tmp_path / 'previous.pth'}")
    assert torch.load(tmp_path / "last.pth", weights_only=True)["epoch"] == 2
    assert (tmp_path / "previous.pth").read_bytes() == previous


def test_truncated_checkpoint_without_a_previous_one_starts_again_in_one_line(few_digits, tmp_path, caplog):
    cfg = RetrainConfig(epochs=1, **PLAIN)
    retrain(_mlp(), few_digits, cfg, tmp_path, progress=False)
    assert not (tmp_path / "previous.pth").exists()
    _truncate(tmp_path / "last.pth")
    result = retrain(_mlp(), few_digits, cfg, tmp_path, progress=False)
    assert (result.start_epoch, result.epochs_run) == (0, 1)
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(f"{tmp_path / 'last.pth'}: unreadable checkpoint (") and "\n" not in warning
    assert warning.endswith(f"no earlier checkpoint: starting this training again in {tmp_path}")


def test_randaugment_survives_posterize_at_full_magnitude(few_digits, tmp_path):
    # At magnitude 10 timm's PosterizeIncreasing asks Pillow for 0 bits; Pillow 13 raises on that. With 15
    # ops per image nearly every image meets it, so an unguarded RandAugment fails on the first batch.
    cfg = RetrainConfig(epochs=1, **dict(PLAIN, randaugment="rand-m10-n15-inc1"))
    result = retrain(_mlp(), few_digits, cfg, tmp_path, progress=False)
    assert np.isfinite(result.history[0]["train_loss"])


def test_nan_loss_raises_a_one_line_error(few_digits, tmp_path):
    broken = _mlp()
    nn.init.constant_(broken[1].weight, float("nan"))
    with pytest.raises(TrainingDiverged, match="training loss is nan in epoch 1") as error:
        retrain(broken, few_digits, RetrainConfig(epochs=1, **PLAIN), tmp_path, progress=False)
    assert isinstance(error.value, NaslocError) and "\n" not in str(error.value)  # the CLI prints one line
    assert not (tmp_path / "last.pth").exists()


def test_evaluate_counts_top1(digits):
    always_zero = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
    nn.init.zeros_(always_zero[1].weight)
    with torch.no_grad():
        always_zero[1].bias.copy_(torch.eye(10)[0])
    loader = make_loader(digits.val, 50, False, 16, digits.mean, digits.std)
    expected = 100.0 * (digits.val.labels == 0).sum().item() / len(digits.val)
    assert evaluate(always_zero, loader, "cpu") == pytest.approx(expected)


def test_lazy_image_datasets_train_through_timm_transforms(tmp_path):
    for c in range(2):
        for i in range(6):
            path = tmp_path / f"class{c}" / f"{i}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(np.full((80, 96, 3), 200 * c, dtype=np.uint8)).save(path)
    splits = load_dataset("imagefolder", tmp_path, img_size=16, val_fraction=0.34)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2))
    cfg = RetrainConfig(epochs=1, batch_size=4, warmup_epochs=0, num_workers=0)
    result = retrain(model, splits, cfg, tmp_path / "run", progress=False)
    assert 0 <= result.val_top1 <= 100 and np.isfinite(result.history[0]["train_loss"])


def test_config_errors_are_one_line(digits, tmp_path):
    with pytest.raises(ValueError, match="even batch_size"):
        retrain(_mlp(), digits, RetrainConfig(epochs=1, batch_size=63, num_workers=0), tmp_path, progress=False)
    assert resolve_device("auto") == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(NaslocError, match="^--device cuda: CUDA is not available on this machine; use --device cpu"):
            resolve_device("cuda")
        with pytest.raises(ValueError, match="amp=True needs a CUDA device"):
            retrain(_mlp(), digits, RetrainConfig(epochs=1, amp=True, **PLAIN), tmp_path, progress=False)


def _ddp_worker(rank: int, port: int, splits: DataSplits, out: Path) -> None:
    # What torchrun would set; setup_distributed() inside retrain() reads it.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)  # a forked child can't reuse the parent's OpenMP pool (DataLoader does the same)
    torch.manual_seed(100 + rank)  # a different init per rank: DDP must broadcast rank 0's weights
    model = _mlp()
    result = retrain(model, splits, RetrainConfig(epochs=1, **dict(PLAIN, batch_size=32)), out, progress=False)
    torch.save(model.state_dict(), out / f"rank{rank}.pt")
    history = [{k: v for k, v in h.items() if k != "seconds"} for h in result.history]
    (out / f"rank{rank}.json").write_text(json.dumps(dict(val=result.val_top1, history=history)))
    cleanup_distributed()


@pytest.mark.timeout(180)  # a rendezvous that never completes must fail the test, not hang CI
def test_ddp_two_cpu_processes_agree(digits, tmp_path):
    # fork, not spawn: the children inherit the imported torch/timm/nasloc instead of paying ~10 s each.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.start_processes(_ddp_worker, args=(port, digits, tmp_path), nprocs=2, daemon=True,
                                          start_method="fork")
    weights = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1]  # val accuracy and train loss are reduced over both ranks
    assert results[0]["val"] > 40  # chance is 10; one epoch of 25 steps of 2 x 32 images
    ckpt = torch.load(tmp_path / "last.pth", weights_only=True)
    assert ckpt["num_updates"] == len(digits.train) // 64  # each rank saw half of every global batch
    assert all(torch.equal(ckpt["model"][k], v) for k, v in weights[0].items())


def test_a_short_run_warms_up_then_decays():
    """5 warm-up epochs of a 5-epoch run would leave the lr rising to the end: warm-up is at most a tenth."""
    from nasloc.training.retrain import _Optimization

    cfg = RetrainConfig(epochs=5, batch_size=512, lr=1e-3, warmup_epochs=5)
    opt = _Optimization(nn.Linear(4, 2), cfg, steps_per_epoch=20, world_size=1, device=torch.device("cpu"))
    lrs = []
    for update in range(1, 5 * 20 + 1):
        opt.scheduler.step_update(update)
        lrs.append(opt.optimizer.param_groups[0]["lr"])
    peak = max(lrs)
    assert lrs.index(peak) < 20  # within the first epoch
    assert peak == pytest.approx(1e-3, rel=0.05)
    assert lrs[-1] < 0.1 * peak and all(a >= b for a, b in zip(lrs[lrs.index(peak):], lrs[lrs.index(peak) + 1:]))


def test_the_recipe_fits_the_length_of_the_training():
    """DeiT's recipe pays off over hundreds of epochs; a shorter training takes the short recipe."""
    from nasloc.training.recipe import SHORT_RUN_EPOCHS, RetrainConfig, fitted_recipe

    assert fitted_recipe(300) == RetrainConfig(epochs=300) and fitted_recipe(SHORT_RUN_EPOCHS).mixup == 0.8
    short = fitted_recipe(30)
    assert (short.epochs, short.lr, short.warmup_epochs, short.mixup, short.cutmix, short.randaugment,
            short.ema_decay, short.drop_path) == (30, 4e-3, 1, 0.0, 0.0, "", 0.0, 0.0)
    assert short.label_smoothing == 0.1 and short.weight_decay == 0.05 and short.grad_clip == 5.0
    part = fitted_recipe(30, epochs=4, batch_size=64, lr=1e-3)  # a rung of the 30-epoch retrain, lr given
    assert (part.epochs, part.batch_size, part.lr, part.randaugment) == (4, 64, 1e-3, "")


def test_a_finished_training_cut_down_is_read_back_and_lengthened_with_a_fresh_optimizer(digits, tmp_path, caplog):
    from nasloc.training.checkpoint import finish_checkpoint
    from nasloc.training.retrain import RESUMED

    cfg = RetrainConfig(epochs=1, **PLAIN)
    done = retrain(_mlp(), digits, cfg, tmp_path, progress=False)
    finish_checkpoint(done.checkpoint, keep=RESUMED)
    assert set(torch.load(done.checkpoint, weights_only=True)) == set(RESUMED)
    assert not (tmp_path / "previous.pth").exists()
    stamp = done.checkpoint.stat().st_mtime_ns
    finish_checkpoint(done.checkpoint, keep=RESUMED)  # once only
    assert done.checkpoint.stat().st_mtime_ns == stamp
    again = retrain(_mlp(), digits, cfg, tmp_path, progress=False)  # read back, nothing trained
    assert again.epochs_run == 0 and again.val_top1 == done.val_top1
    with caplog.at_level("WARNING"):
        longer = retrain(_mlp(), digits, RetrainConfig(epochs=2, **PLAIN), tmp_path, progress=False)
    assert longer.epochs_run == 1 and "epochs 2-2 start a fresh optimizer" in caplog.text
