"""Attention maps as pictures: colour a map, lay it over an image, one tile per token."""
from __future__ import annotations

from collections.abc import Set

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageOps

from . import text

# Swapped tokens are framed and labelled in this colour; token_chips highlights them in it too,
# so a position picked in the token table and its tile in a heat-map row look alike.
MARK_COLOUR = (255, 140, 0)
BACKGROUND = (255, 255, 255)
BORDER = 4  # width of a marked tile's frame
MARGIN = 8  # around the whole row; wider than BORDER so the outer tiles' frames fit
GAP = 12  # between tiles; wider than 2 * BORDER so two marked neighbours' frames stay apart
MODES = ("overlay", "raw")


def _map2d(map2d: np.ndarray) -> np.ndarray:
    """`map2d` as float64 with every non-finite value replaced by 0; ValueError if not 2-D."""
    m = np.asarray(map2d, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"an attention map must be 2-D (h, w), got shape {m.shape}")
    return np.where(np.isfinite(m), m, 0.0)


def _colormap(name: str):
    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise ValueError(f"unknown colormap {name!r}; use a matplotlib name such as 'jet'") from None


def colorize(map2d: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """Colour a (h, w) map: uint8 (h, w, 3) RGB.

    The map is scaled by its own maximum, so its hottest pixel gets the colormap's top colour
    and 0 the bottom one; negative values count as 0. Non-finite values count as 0, and a map
    with no positive value comes out as the bottom colour everywhere (never NaN).
    Raises ValueError for a map that is not 2-D or an unknown colormap name.
    """
    m = _map2d(map2d)
    peak = m.max(initial=0.0)
    unit = np.clip(m / peak, 0.0, 1.0) if peak > 0 else np.zeros_like(m)
    return _colormap(cmap)(unit, bytes=True)[..., :3]


def overlay(
    image: Image.Image, map2d: np.ndarray, alpha: float = 0.5, cmap: str = "jet"
) -> Image.Image:
    """`image` blended with the colorized map: RGB, the image's size.

    The (h, w) map is upsampled bilinearly to the image size; each output pixel is
    `(1 - alpha) * image + alpha * colour`, so alpha 0 gives the image back and alpha 1 the
    colorized map. Raises ValueError for alpha outside [0, 1] and as `colorize` does.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    base = image.convert("RGB")
    big = Image.fromarray(_map2d(map2d).astype(np.float32)).resize(
        base.size, Image.Resampling.BILINEAR
    )
    heat = Image.fromarray(colorize(np.asarray(big), cmap))
    return Image.blend(base, heat, alpha)


def _tile(small: Image.Image, map2d: np.ndarray, mode: str, tile: int) -> Image.Image:
    """One token's picture, centred on a `tile`-px white square."""
    if mode == "overlay":
        picture = overlay(small, map2d)
    else:
        # Enlarged without smoothing, so the resolution at which the map was recorded shows.
        picture = Image.fromarray(colorize(map2d)).resize(small.size, Image.Resampling.NEAREST)
    square = Image.new("RGB", (tile, tile), BACKGROUND)
    square.paste(picture, ((tile - picture.width) // 2, (tile - picture.height) // 2))
    return square


def heatmap_row(
    image: Image.Image,
    maps: np.ndarray,
    labels: list[str],
    marked: Set[int] = frozenset(),
    mode: str = "overlay",
    tile: int = 96,
    per_line: int = 8,
) -> Image.Image:
    """One `tile`-px square per token map, its label under it, `per_line` tiles to a line.

    `maps` is (tokens, h, w). Mode "overlay" lays each map over `image` (see `overlay`); mode
    "raw" shows the colorized map alone. Each map is scaled by its own maximum. A non-square
    image keeps its aspect ratio inside the square. Tiles whose index is in `marked` get a
    MARK_COLOUR frame that runs on under the tile as the background of its label.
    The row is RGB on white and `2 * MARGIN + n * tile + (n - 1) * GAP` px wide for
    n = min(tokens, per_line).
    Raises ValueError when the labels do not match the maps one to one, a marked index is not a
    tile, or mode, tile or per_line is invalid.
    """
    maps = np.asarray(maps)
    if maps.ndim != 3 or maps.shape[0] == 0:
        raise ValueError(f"maps must be (tokens, h, w) with at least one token, got {maps.shape}")
    count = maps.shape[0]
    if len(labels) != count:
        raise ValueError(f"{len(labels)} labels for {count} token maps; give one label per map")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if tile < 1 or per_line < 1:
        raise ValueError(f"tile and per_line must be at least 1, got {tile} and {per_line}")
    missing = sorted(i for i in marked if not 0 <= i < count)
    if missing:
        raise ValueError(f"marked tiles {missing} do not exist; the maps have {count} tokens")

    font = text.font(max(10, tile // 7))
    label_height = 2 + text.line_height(font) + BORDER
    cols = min(count, per_line)
    lines = -(-count // per_line)
    row = Image.new(
        "RGB",
        (
            2 * MARGIN + cols * tile + (cols - 1) * GAP,
            2 * MARGIN + lines * (tile + label_height) + (lines - 1) * GAP,
        ),
        BACKGROUND,
    )
    draw = ImageDraw.Draw(row)
    # Shrunk once: every tile overlays the same small picture instead of the full-size one.
    small = ImageOps.contain(image.convert("RGB"), (tile, tile))
    for i, (map2d, label) in enumerate(zip(maps, labels)):
        x = MARGIN + (i % per_line) * (tile + GAP)
        y = MARGIN + (i // per_line) * (tile + label_height + GAP)
        if i in marked:
            draw.rectangle(
                (x - BORDER, y - BORDER, x + tile + BORDER - 1, y + tile + label_height - 1),
                fill=MARK_COLOUR,
            )
        row.paste(_tile(small, map2d, mode, tile), (x, y))
        text.draw_lines(draw, [text.fit(label, font, tile)], font, (x, y + tile + 2, tile))
    return row
