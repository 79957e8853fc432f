"""Phase 1: the supernet of a run, trained (resumably) or loaded."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..console import say
from ..errors import NaslocError
from ..run import RunDir, RunOptions
from ..space.band import supernet_bands
from ..space.search_space import SearchSpace
from ..supernet.supernet import Supernet
from ..supernet.train import FINISHED, SupernetConfig, fingerprint, load_supernet, train_supernet
from ..training.checkpoint import finish_checkpoint, load_checkpoint, save_checkpoint
from ..training.data import DataSplits
from ..units import format_macs


class PhaseError(NaslocError):
    """A phase was asked for before the one it needs."""


def train_phase(supernet: Supernet, splits: DataSplits, space: SearchSpace, options: RunOptions, run: RunDir,
                device: torch.device) -> Path:
    band, buckets = supernet_bands(space, [member.budget for _, member in options.members()])
    cfg = SupernetConfig(epochs=options.supernet_epochs, batch_size=options.batch_size, seed=options.seed)
    say(f"[nasloc] 1/6 supernet: {cfg.epochs} epochs, sandwich rule in the band {format_macs(band.lo)} - "
        f"{format_macs(band.hi)}" + (f", its random archs shared by the {len(buckets)} budgets" if options.family else ""))
    result = train_supernet(supernet, splits, band, cfg, run.supernet_dir, device=str(device),
                            buckets=buckets if options.family else ())
    if cfg.epochs == 0 and not result.checkpoint.exists():
        return save_untrained(supernet, run)
    if options.keep_checkpoints == "needed" and int(os.environ.get("RANK", "0")) == 0:
        finish_checkpoint(result.checkpoint, keep=FINISHED)  # the search and selection read only its weights
    return result.checkpoint


def require_trained_supernet(run: RunDir, epochs: int) -> None:
    """For --phase search: refuse (before anything is written) a run whose supernet is not trained."""
    path = run.supernet_checkpoint
    done = load_checkpoint(path, keys=("epoch",))["epoch"] + 1 if path.exists() else 0
    if done < epochs:
        raise PhaseError(f"the supernet of {run.root} has {done}/{epochs} epochs; train it first with --phase supernet (same options)")


def trained_checkpoint(supernet: Supernet, run: RunDir, device: torch.device) -> Path:
    """The finished supernet checkpoint of the run, loaded into ``supernet`` (for --phase search, after
    :func:`require_trained_supernet` has checked it)."""
    path = run.supernet_checkpoint
    if not path.exists():  # --supernet-epochs 0: the seeded initial weights
        path = run.untrained_checkpoint
        if not path.exists():
            return save_untrained(supernet, run)
    load_supernet(path, supernet, device)
    return path


def save_untrained(supernet: Supernet, run: RunDir) -> Path:
    """With --supernet-epochs 0 nothing is trained and train_supernet saves nothing, but worker
    processes (--workers, Ray) load the supernet from a file: save the initial weights in the format
    :func:`load_supernet` reads."""
    path = run.untrained_checkpoint
    save_checkpoint(path, {"model": supernet.state_dict(), "fingerprint": fingerprint(supernet), "img_size": supernet.img_size, "epoch": -1},
                    keep_previous=False)
    return path
