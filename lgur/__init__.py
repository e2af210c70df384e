"""LGUR Explorer: text-based person search with LGUR (ACM MM 2022), explained."""

from pathlib import Path

from .config import LGURConfig, cpu_preset, paper_preset, preset
from .model import LGUR, ImageExplanation, TextExplanation

__version__ = "0.1.0"
__all__ = ["LGUR", "LGURConfig", "ImageExplanation", "TextExplanation", "cpu_preset", "paper_preset", "preset"]


def _shipped(relative: str) -> Path:
    """A file the repository ships: next to the package in a checkout, else under the current folder."""
    checkout = Path(__file__).resolve().parents[1] / relative
    return checkout if checkout.exists() else Path(relative)


# The shipped model and gallery: the defaults of the app and of every command.
DEFAULT_CHECKPOINT = _shipped("assets/lgur_cpu.safetensors")
DEFAULT_GALLERY = _shipped("gallery")
