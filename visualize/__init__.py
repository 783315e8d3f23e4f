"""Pictures of attention: heat maps, comparison grids and token chips.

Pure functions of numpy arrays and PIL images that return PIL images (or HTML); nothing here
imports torch, diffusers, transformers or gradio, and matplotlib is used for its colormaps only.
"""
from .grid import comparison_grid
from .heatmaps import MARK_COLOUR, colorize, heatmap_row, overlay
from .tokens import token_chips

__all__ = ["MARK_COLOUR", "colorize", "comparison_grid", "heatmap_row", "overlay", "token_chips"]
