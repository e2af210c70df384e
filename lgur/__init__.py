"""LGUR Explorer: text-based person search with LGUR (ACM MM 2022), explained."""

from .files import DEFAULT_CHECKPOINT, DEFAULT_GALLERY
from .model.config import LGURConfig, cpu_preset, paper_preset, preset
from .model.lgur import LGUR, ImageExplanation, TextExplanation

__version__ = "0.1.0"
__all__ = [
    "DEFAULT_CHECKPOINT",
    "DEFAULT_GALLERY",
    "LGUR",
    "LGURConfig",
    "ImageExplanation",
    "TextExplanation",
    "cpu_preset",
    "paper_preset",
    "preset",
]
