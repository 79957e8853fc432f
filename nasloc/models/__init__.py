"""The nasloc model family; importing it registers every preset with timm."""
from .locality_vit import Capacity, LocalityViT
from .zoo import GENERIC, PRESETS, create

__all__ = ["Capacity", "GENERIC", "LocalityViT", "PRESETS", "create"]
