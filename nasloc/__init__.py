"""nasloc: neural architecture search over the locality design space of vision transformers.

Where is what. A run goes supernet -> search -> report -> selection -> retrain -> export; the tree follows it,
each folder importing only the folders above it in this list (``tests/test_layout.py`` holds it):

    errors, units, fileio, console   the base: one-line errors, FLOPs units, atomic writes, console lines
    arch            the architecture description, the one value every part passes on
    space/          search spaces (genes, choosers), the analytic FLOPs counter, MACs bands, seed designs
    models/         the LocalityViT family: one file per locality mechanism, the skeleton's parts by role,
                    all slicing in ``elastic``; the published presets and their timm registry
    run             a run's options, record and folder
    storage/        Optuna storages: SQLite, journal files, PostgreSQL; heartbeats, reconnection
    training/       data sets, loaders, checkpoints, the retraining recipe and loop, devices and DDP
    supernet/       the weight-sharing supernet, its sandwich training, the proxy evaluator, the ranking check
    search/         the Optuna study, objective, budget-aware sampler, the search loop, Ray Tune
    deploy/         export as a timm model, ONNX, latency tables, MACs by fvcore, a run's trials as models
    selection/      successive halving: candidates, rungs and ties, the candidates' trainer, worker pool, Ray
    report/         tables, the Pareto plot, summary.md, the dashboard
    phases/         what each phase of a run reads from and writes to the run folder
    pipeline        the phases in order
    cli/            the command line: parsers and entry points (torch-free), one module per command

Everything up to ``run`` (but ``models``) imports no torch: ``--help`` and bad input answer at once.

``import nasloc`` registers the LocalityViT family with timm (presets and the generic ``nasloc_vit`` entry
that rebuilds exported archs) without importing torch or timm itself: the registration
(:mod:`nasloc.models.registry`) runs right after timm is imported, or at once if it already is. So
``import nasloc, timm; timm.create_model("nasloc_deit_tiny")`` works. The public names below load on first use.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Any

__version__ = "0.1.0"
_LAZY = {  # public name -> module
    "Arch": ".arch", "ArchError": ".arch", "Block": ".arch", "Shortcut": ".arch", "Stage": ".arch",
    "parse_budget": ".units", "format_macs": ".units",
    "SearchSpace": ".space.search_space", "reference_archs": ".space.seed_designs",
    "RunOptions": ".run", "run_pipeline": ".pipeline", "export_trial": ".deploy.export",
    "LocalityViT": ".models", "Supernet": ".supernet.supernet",
}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


class _TimmRegistration(importlib.abc.MetaPathFinder):
    """Imports :mod:`nasloc.models.registry` (the timm registration) once timm is loaded and no nasloc module is
    in the middle of its import (the registry imports nasloc.models, which may be what imported timm first).

    It finds timm and nasloc's modules as the other finders do and only wraps their loaders, to see
    each import end; it leaves ``sys.meta_path`` when it has registered.
    """

    def __init__(self) -> None:
        self.looking = False
        self.loading = 0  # nasloc modules (and timm) being imported, nested

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if self.looking or not (name == "timm" or name.startswith(f"{__name__}.")):
            return None
        self.looking = True  # the lookup below must not come back here
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.looking = False
        if spec is not None and spec.loader is not None:
            spec.loader = _Watched(spec.loader, self)
        return spec

    def imported(self) -> None:
        if self.loading == 0 and "timm" in sys.modules and self in sys.meta_path:
            sys.meta_path.remove(self)
            importlib.import_module(".models.registry", __name__)


class _Watched(importlib.abc.Loader):
    """A module's own loader, telling the registration when the module's import has ended."""

    def __init__(self, loader: Any, registration: _TimmRegistration):
        self.loader, self.registration = loader, registration

    def __getattr__(self, name: str) -> Any:  # get_code, get_source, ...: what runpy and tracebacks ask for
        return getattr(self.loader, name)

    def create_module(self, spec: Any) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # the module keeps its own loader
        self.registration.loading += 1
        try:
            self.loader.exec_module(module)
        finally:
            self.registration.loading -= 1
        self.registration.imported()


if "timm" in sys.modules:
    importlib.import_module(".models.registry", __name__)
else:
    sys.meta_path.insert(0, _TimmRegistration())
