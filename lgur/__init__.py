"""LGUR Explorer: text-based person search with LGUR (ACM MM 2022), explained."""

from .config import LGURConfig, cpu_preset, paper_preset, preset
from .model import LGUR, ImageExplanation, TextExplanation

__version__ = "0.1.0"
__all__ = ["LGUR", "LGURConfig", "ImageExplanation", "TextExplanation", "cpu_preset", "paper_preset", "preset"]
