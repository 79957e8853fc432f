"""What a run reads before any phase: the search space (checked against the budget), the data splits, the
image sizes, and the run's record."""
from __future__ import annotations

from dataclasses import replace

from ..arch import total_stride
from ..errors import NaslocError
from ..run import RunOptions, RunRecord
from ..space.search_space import SearchSpace
from ..training.data import DataSplits, load_dataset
from ..training.loader import check_batch_size
from ..units import format_macs


class BudgetError(NaslocError):
    """The budget lies outside what the search space can build."""


def load_inputs(options: RunOptions) -> tuple[SearchSpace, DataSplits, RunRecord]:
    """The search space (for the data set's classes), the data splits and the run's record.

    The budget is checked against the space before the data is loaded (cheap, and the common
    mistake) and again for the data set's number of classes (the classifier head counts too).
    """
    space = SearchSpace.load(options.space)
    check_budget(space, options.budget)
    proxy_size = options.proxy_img_size or default_proxy_size(space)
    splits = load_dataset(options.dataset, options.data_dir, proxy_size, seed=options.seed)
    check_batch_size(options.batch_size, len(splits.train))  # under torchrun the loader checks each rank's shard
    space = space.for_classes(splits.num_classes)
    check_budget(space, options.budget)
    retrain_size = options.retrain_img_size or default_retrain_size(space, options.dataset, proxy_size)
    chosen = replace(options, proxy_img_size=proxy_size, retrain_img_size=retrain_size)
    return space, splits, RunRecord(chosen, splits.num_classes, splits.mean, splits.std)


def check_budget(space: SearchSpace, budget: float) -> None:
    lo, hi = space.macs_range()
    if not lo <= budget <= hi:
        raise BudgetError(
            f"budget {format_macs(budget)} is outside the space {space.name}: its archs span "
            f"{format_macs(lo)} to {format_macs(hi)} at {space.img_size} px"
        )


def default_proxy_size(space: SearchSpace) -> int:
    """The smallest size >= 32 px at which every arch of the space is valid (and at most the
    deploy size): a multiple of the total stride of stem and downsampling."""
    stride = total_stride(int(space.skeleton.get("patch_size", 16)), len(space.stages))
    size = stride * max(1, -(-32 // stride))
    return min(size, space.img_size)


def default_retrain_size(space: SearchSpace, dataset: str, proxy_size: int) -> int:
    """The deploy resolution, except for the embedded 8x8 digits: upsampling them to 224 px would
    cost CPU hours for nothing, so they retrain at the proxy resolution."""
    return proxy_size if dataset == "digits" else space.img_size
