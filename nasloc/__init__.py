"""nasloc: neural architecture search over the locality design space of vision transformers.

``import nasloc`` registers the LocalityViT family with timm (presets and the generic
``nasloc_vit`` entry that rebuilds exported archs).
"""
from .arch import Arch, ArchError, Block, Shortcut, Stage
from . import seeds  # noqa: F401  (registers the timm entry points)
from .models import LocalityViT

__version__ = "0.1.0"
__all__ = ["Arch", "ArchError", "Block", "LocalityViT", "Shortcut", "Stage", "__version__"]
