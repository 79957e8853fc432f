"""``nasloc check-ranking``: does a run's supernet rank the archs of its band as standalone training does?"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..deploy.trials import member_record
from ..phases.inputs import load_inputs
from ..phases.supernet import require_trained_supernet
from ..run import RunDir, RunOptions
from ..space.search_space import SearchSpace
from ..supernet.proxy import ProxyEvaluator, make_evaluator
from ..supernet.ranking_check import FolderTrainer, RankedArch, RankingCheck, RankingError, check_ranking, sample_band
from ..supernet.supernet import Supernet
from ..supernet.train import load_supernet
from ..training.data import DataSplits, halve_val
from ..training.distributed import resolve_device

# The default band of a run's check: the upper quarter of the budget, where the search's picks lie.
BAND_LOW = 0.75


def check_run_ranking(run_dir: Path, *, archs: int, epochs: int, seed: int = 0, band: tuple[float, float] | None = None,
                      budget: str = "", on_arch: Callable[[RankedArch], None] | None = None) -> RankingCheck:
    """The ranking check of a run: ``archs`` archs of ``band`` (default [0.75 budget, budget]) scored by the
    run's supernet proxy and by ``epochs`` of standalone training at the run's proxy resolution on its data
    set, in ``<run>/check-ranking/arch_<i>/`` (a family's ``<run>/<budget>/check-ranking/``, ``budget`` as on
    its command line), resumed by a rerun with the same settings.

    Raises :class:`nasloc.errors.NaslocError` (one line) for a folder that is not a run, a run whose
    supernet is not trained, or a band the space cannot reach.
    """
    run = RunDir(Path(run_dir))
    record = member_record(run.read_record(), budget)
    run, options = run.member_dir(record.member), record.options
    if not run.supernet_checkpoint.is_file():
        raise RankingError(f"{run.root} has no trained supernet ({run.relative(run.supernet_checkpoint)} is missing); "
                           "run its search first")
    require_trained_supernet(run, options.supernet_epochs)
    lo, hi = band or (BAND_LOW * options.budget, options.budget)
    space, splits, _ = load_inputs(options)
    sample = sample_band(space, lo, hi, archs, seed)
    if len(sample) < 3:
        raise RankingError(f"the band [{lo:.4g}, {hi:.4g}] MACs holds only {len(sample)} distinct archs; widen it")
    device = resolve_device(options.device)
    proxy = search_proxy(run, options, space, splits, device)
    trainer = FolderTrainer(run.check_ranking_dir, splits, epochs=epochs, img_size=options.proxy_img_size,
                            seed=seed, band=(lo, hi), device=str(device))
    trainer.claim(sample)
    return check_ranking(sample, proxy, trainer, on_arch)


def search_proxy(run: RunDir, options: RunOptions, space: SearchSpace, splits: DataSplits,
                 device: torch.device) -> ProxyEvaluator:
    """The proxy the run's search scored archs by: its trained supernet on the search's half of the validation
    split (``splits`` and ``space`` as :func:`~nasloc.phases.inputs.load_inputs` gives them for ``options``)."""
    supernet = load_supernet(run.supernet_checkpoint, Supernet(space, options.proxy_img_size), device)
    return make_evaluator(supernet, halve_val(splits, options.seed)[0], seed=options.seed)
