"""Pictures of attention: heat maps, comparison grids and token chips.

Pure functions of numpy arrays and PIL images that return PIL images (or HTML); nothing here
imports torch, diffusers, transformers or gradio, and matplotlib is used for its colormaps only.
"""
from .grid import comparison_grid
from .heatmaps import MARK_COLOUR, SCALE_NOTE, colorize, colour_bar, heatmap_row, large_map, overlay, tile_at
from .tokens import swap_diagram, token_chips

__all__ = ["MARK_COLOUR", "SCALE_NOTE", "colorize", "colour_bar", "comparison_grid", "heatmap_row", "large_map",
           "overlay", "swap_diagram", "tile_at", "token_chips"]
