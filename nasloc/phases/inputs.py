"""What a run reads and checks before any phase: the storage, the search space against the budget, the image
sizes, the device, the dashboard's port, the data splits and the batch size; then the run's record.

Every check runs before anything is written or trained (:func:`load_inputs` writes nothing), so a refused
command leaves no run folder behind and a corrected rerun starts cleanly. Each refusal is one line that names
the option and how to mend it.
"""
from __future__ import annotations

import os
import socket
from dataclasses import replace
from pathlib import Path

from ..console import say
from ..errors import NaslocError
from ..run import RunDir, RunOptions, RunRecord
from ..space.locality import locality_size, lost_genes
from ..space.search_space import SearchSpace
from ..storage.factory import check_storage
from ..training.data import DataSplits, load_dataset
from ..training.distributed import resolve_device
from ..training.loader import check_batch_size
from ..units import format_macs


class BudgetError(NaslocError):
    """The budget lies outside what the search space can build."""


class SizeError(NaslocError):
    """An image size that the search space's archs cannot take."""


class PortError(NaslocError):
    """The dashboard's port is taken."""


class ResultsDirError(NaslocError):
    """A results folder that cannot hold run folders."""


def check_resources(options: RunOptions) -> None:
    """What the run uses besides its inputs: the results folder, the storage (opened, or connected to, without
    creating anything), the device and the dashboard's port."""
    check_results_dir(options.results_dir)
    check_storage(options.storage)
    resolve_device(options.device)
    if options.dashboard:
        check_port_free(options.dashboard_port)


def load_inputs(options: RunOptions) -> tuple[SearchSpace, DataSplits, RunRecord]:
    """The search space (for the data set's classes), the data splits and the run's record, every input checked.

    The cheap checks come first (budget, image sizes), then the data is loaded and the batch size and the budget
    (the classifier head counts too) are checked against it.
    """
    space = SearchSpace.load(options.space)
    check_budgets(space, options)
    proxy_size = options.proxy_img_size or default_proxy_size(space, options.dataset)
    check_img_size(space, proxy_size, "--proxy-img-size")
    lost = lost_genes(space, proxy_size)
    if options.proxy_img_size and lost:
        say(f"[nasloc] warning: --proxy-img-size {proxy_size} is below the locality rule's "
            f"{locality_size(space)} px; these genes lose their meaning there: {'; '.join(lost)}")
    if options.retrain_img_size is not None:
        check_img_size(space, options.retrain_img_size, "--retrain-img-size")
    splits = load_dataset(options.dataset, options.data_dir, proxy_size, seed=options.seed)
    check_batch_size(options.batch_size, len(splits.train))  # under torchrun the loader checks each rank's shard
    space = space.for_classes(splits.num_classes)
    check_budgets(space, options)
    retrain_size = options.retrain_img_size or default_retrain_size(space, options.dataset, proxy_size)
    chosen = replace(options, proxy_img_size=proxy_size, retrain_img_size=retrain_size,
                     select_epochs=options.select_epochs or chosen_select_epochs(options))
    return space, splits, RunRecord(chosen, splits.num_classes, splits.mean, splits.std)


def check_budgets(space: SearchSpace, options: RunOptions) -> None:
    """The run's budget, or each budget of its family, within what the space can build."""
    for label, member in options.members():
        check_budget(space, member.budget, label)


def check_budget(space: SearchSpace, budget: float, label: str = "") -> None:
    lo, hi = space.macs_range()
    if not lo <= budget <= hi:
        named = f"{label} ({format_macs(budget)})" if label else format_macs(budget)
        raise BudgetError(f"--budget {named}: outside the space {space.name}, whose archs span "
                          f"{format_macs(lo)} to {format_macs(hi)} at {space.img_size} px; give a budget in that "
                          "range or another --space")


def check_img_size(space: SearchSpace, size: int, option: str) -> None:
    """``size`` must be a multiple of the space's stride from image to last map (stem, then 2 per stage)."""
    stride = space.stride
    if size % stride:
        below, above = size // stride * stride, (size // stride + 1) * stride
        fix = f"{below} or {above}" if below else str(above)
        raise SizeError(f"{option} {size}: the archs of the space {space.name} need a multiple of {stride} px "
                        f"(stem stride x 2 per downsampling); use {fix}")


def check_results_dir(results_dir: Path) -> None:
    """The folder must be one (made when the run starts) that this process can write in."""
    existing = next(p for p in (results_dir, *results_dir.parents) if p.exists())
    if not existing.is_dir():
        raise ResultsDirError(f"--results-dir {results_dir}: {existing} is a file, not a folder; give a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ResultsDirError(f"--results-dir {results_dir}: {existing} is not writable here; give a folder you "
                              "can write in")


def check_port_free(port: int) -> None:
    """Refuse a taken ``--dashboard-port`` now, not after the supernet has trained."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as e:
            raise PortError(f"--dashboard-port {port}: cannot serve there ({e.strerror}); pick a free port") from None


def chosen_select_epochs(options: RunOptions) -> int:
    """The selection's last rung when ``--select-epochs`` is not given: what the run chose when it started (a
    rerun may lengthen the retrain, not move the selection's rungs), else :func:`default_select_epochs`."""
    run = RunDir(options.run_dir)
    stored = run.read_record().options.select_epochs if run.record_file.is_file() else None
    return stored or default_select_epochs(options.retrain_epochs)


def default_select_epochs(retrain_epochs: int) -> int:
    """A quarter of the retrain, at least 4 epochs (rungs of 1, 2, 4 halve a dozen candidates to three), at most
    the retrain: the candidates train on its schedule."""
    return min(retrain_epochs, max(4, retrain_epochs // 4))


def default_proxy_size(space: SearchSpace, dataset: str) -> int:
    """On real data the smallest size that keeps every locality gene meaningful (:func:`locality_size`: every
    stage's map at least as wide as its widest locality operation, capped at the deploy size). The embedded 8x8
    digits keep the fast demo: the smallest multiple of the space's stride of at least 32 px."""
    if dataset != "digits":
        return locality_size(space)
    stride = space.stride
    return min(stride * max(1, -(-32 // stride)), space.img_size)


def default_retrain_size(space: SearchSpace, dataset: str, proxy_size: int) -> int:
    """The deploy resolution, except for the embedded 8x8 digits: upsampling them to 224 px would
    cost CPU hours for nothing, so they retrain at the proxy resolution."""
    return proxy_size if dataset == "digits" else space.img_size
