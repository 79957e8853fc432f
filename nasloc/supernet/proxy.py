"""Proxy accuracy of an arch with supernet weights (latency is predicted by :mod:`nasloc.deploy.latency`).

The proxy evaluation extracts the arch's standalone model from the supernet (its logits equal the
subnet's), re-estimates its BatchNorm statistics on a few training batches when it has BatchNorm
(the supernet's statistics are shared by all subnets, so they fit none of them), and measures
top-1 on the validation split.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from ..arch import Arch
from ..models import LocalityViT
from ..run import RunRecord
from ..space.search_space import SearchSpace
from ..training.data import DataSplits, halve_val, load_dataset
from ..training.distributed import resolve_device
from ..training.loader import DeviceLoader, make_loader
from ..training.retrain import evaluate
from .supernet import Supernet, recalibrate_batchnorm
from .train import load_supernet


class ProxyEvaluator:
    def __init__(self, supernet: Supernet, val_loader: DeviceLoader, calib_loader: DeviceLoader, calib_batches: int = 4):
        self.supernet = supernet.eval()
        self.val_loader, self.calib_loader, self.calib_batches = val_loader, calib_loader, calib_batches
        self.device = next(supernet.parameters()).device

    def model(self, arch: Arch) -> LocalityViT:
        """The arch's standalone model with supernet weights and its own BatchNorm statistics."""
        model = self.supernet.extract(arch)
        batches = (x for x, _ in islice(self.calib_loader, self.calib_batches))
        recalibrate_batchnorm(model, model, batches)
        return model.eval()

    def __call__(self, arch: Arch) -> float:
        return evaluate(self.model(arch), self.val_loader, self.device)


@dataclass(frozen=True)
class EvaluatorSpec:
    """Everything a fresh process (a Ray worker, a ``--workers`` process) needs to rebuild the proxy evaluator."""

    space: str
    checkpoint: str
    img_size: int
    dataset: str
    data_dir: str | None
    seed: int
    batch_size: int = 256
    device: str = "auto"
    search_half: bool = False  # score on the search's half of the validation split (see halve_val), as runs do

    @classmethod
    def for_run(cls, record: RunRecord, checkpoint: Path, device: str) -> "EvaluatorSpec":
        """The evaluator of a run: its space, data and proxy resolution, with the supernet weights of ``checkpoint``."""
        options = record.options
        return cls(str(options.space), str(checkpoint), options.proxy_img_size, options.dataset,
                   None if options.data_dir is None else str(options.data_dir), options.seed, device=device,
                   search_half=True)

    def load(self) -> tuple[Supernet, DataSplits]:
        """The trained supernet (on the device) and the whole data splits."""
        splits = load_dataset(self.dataset, self.data_dir, self.img_size, seed=self.seed)
        space = SearchSpace.load(self.space).for_classes(splits.num_classes)
        return load_supernet(Path(self.checkpoint), Supernet(space, self.img_size), resolve_device(self.device)), splits

    def __call__(self) -> ProxyEvaluator:
        supernet, splits = self.load()
        if self.search_half:
            splits, _ = halve_val(splits, self.seed)
        return make_evaluator(supernet, splits, self.batch_size, self.seed)


def make_evaluator(supernet: Supernet, splits: DataSplits, batch_size: int = 256, seed: int = 0) -> ProxyEvaluator:
    device = next(supernet.parameters()).device
    common = dict(img_size=supernet.img_size, mean=splits.mean, std=splits.std, seed=seed, device=device)
    val = make_loader(splits.val, batch_size, train=False, **common)
    calib = make_loader(splits.train, min(batch_size, len(splits.train)), train=True, augment="none", **common)
    return ProxyEvaluator(supernet, val, calib)
