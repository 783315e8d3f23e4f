"""Attention maps as pictures: colour a map, lay it over an image, one tile per token, one large map.

Every map is scaled from its own minimum to its own maximum (SCALE_NOTE), and every picture that
shows maps carries a colour bar that says so: raw attention maps differ in range by orders of
magnitude, and a scale fixed at 0 would paint most of them in the warm half.
"""
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
BAR_HEIGHT = 12  # the colour bar's ramp
SCALE_NOTE = "each map from its own min to its own max"
TITLE_LINES = 2  # a large map's title (a word and an image's name) at most


def _map2d(map2d: np.ndarray) -> np.ndarray:
    """`map2d` as float64 with every non-finite value replaced by the map's lowest finite value
    (0 when it has none); ValueError if not 2-D."""
    m = np.asarray(map2d, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"an attention map must be 2-D (h, w), got shape {m.shape}")
    finite = np.isfinite(m)
    return np.where(finite, m, m[finite].min() if finite.any() else 0.0)


def _colormap(name: str):
    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise ValueError(f"unknown colormap {name!r}; use a matplotlib name such as 'jet'") from None


def colorize(map2d: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """Colour a (h, w) map: uint8 (h, w, 3) RGB.

    The map is scaled from its own minimum to its own maximum, so its lowest pixel gets the
    colormap's bottom colour and its highest the top one, whatever the map's range (negative
    values included); a flat map is the bottom colour everywhere. Non-finite values count as the
    map's lowest finite value (never NaN).
    Raises ValueError for a map that is not 2-D or an unknown colormap name.
    """
    m = _map2d(map2d)
    low, high = (m.min(), m.max()) if m.size else (0.0, 0.0)
    unit = (m - low) / (high - low) if high > low else np.zeros_like(m)
    return _colormap(cmap)(unit, bytes=True)[..., :3]


def colour_bar(width: int, cmap: str = "jet", note: str = SCALE_NOTE) -> Image.Image:
    """A legend `width` px wide: "min", the colormap from bottom to top colour, "max", and `note` on
    one line under it (shortened with "…" where it does not fit), so its height does not depend on
    `width`. Raises ValueError for an unknown colormap or a width under 80 px."""
    if width < 80:
        raise ValueError(f"a colour bar needs at least 80 px, got {width}")
    font = text.font(12)
    left, right = text.text_width("min", font) + 6, text.text_width("max", font) + 6
    bar = width - left - right
    ramp = _colormap(cmap)(np.linspace(0.0, 1.0, bar), bytes=True)[None, :, :3]
    notes = [text.fit(note, font, width)] if note else []
    legend = Image.new("RGB", (width, BAR_HEIGHT + 4 + len(notes) * text.line_height(font)), BACKGROUND)
    legend.paste(Image.fromarray(np.repeat(ramp, BAR_HEIGHT, axis=0)), (left, 0))
    draw = ImageDraw.Draw(legend)
    draw.text((0, -1), "min", font=font, fill=(0, 0, 0))
    draw.text((left + bar + 6, -1), "max", font=font, fill=(0, 0, 0))
    text.draw_lines(draw, notes, font, (0, BAR_HEIGHT + 4, width))
    return legend


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


def _picture(image: Image.Image, map2d: np.ndarray, mode: str) -> Image.Image:
    """The map over `image` (overlay), or the map alone at the image's size (raw)."""
    if mode == "overlay":
        return overlay(image, map2d)
    # Enlarged without smoothing, so the resolution at which the map was recorded shows.
    return Image.fromarray(colorize(map2d)).resize(image.size, Image.Resampling.NEAREST)


def _tile(small: Image.Image, map2d: np.ndarray, mode: str, tile: int) -> Image.Image:
    """One token's picture, centred on a `tile`-px white square."""
    picture = _picture(small, map2d, mode)
    square = Image.new("RGB", (tile, tile), BACKGROUND)
    square.paste(picture, ((tile - picture.width) // 2, (tile - picture.height) // 2))
    return square


def _label_height(tile: int) -> int:
    return 2 + text.line_height(text.font(max(10, tile // 7))) + BORDER


def heatmap_row(
    image: Image.Image,
    maps: np.ndarray,
    labels: list[str],
    marked: Set[int] = frozenset(),
    mode: str = "overlay",
    tile: int = 96,
    per_line: int = 8,
) -> Image.Image:
    """One `tile`-px square per token map, its label under it, `per_line` tiles to a line, and a
    colour bar under them all.

    `maps` is (tokens, h, w). Mode "overlay" lays each map over `image` (see `overlay`); mode
    "raw" shows the colorized map alone. Each map is scaled from its own min to its own max, as
    the colour bar says. A non-square image keeps its aspect ratio inside the square. Tiles whose
    index is in `marked` get a MARK_COLOUR frame that runs on under the tile as the background of
    its label. The row is RGB on white and `2 * MARGIN + n * tile + (n - 1) * GAP` px wide for
    n = min(tokens, per_line) (at least wide enough for the colour bar); `tile_at` finds the
    tile under a point of it.
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
    label_height = _label_height(tile)
    cols = min(count, per_line)
    lines = -(-count // per_line)
    width = 2 * MARGIN + cols * tile + (cols - 1) * GAP
    tiles_bottom = MARGIN + lines * (tile + label_height) + (lines - 1) * GAP
    legend = colour_bar(max(width - 2 * MARGIN, 80))
    row = Image.new(
        "RGB",
        (max(width, legend.width + 2 * MARGIN), tiles_bottom + GAP + legend.height + MARGIN),
        BACKGROUND,
    )
    row.paste(legend, (MARGIN, tiles_bottom + GAP))
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


def tile_at(x: float, y: float, count: int, tile: int = 96, per_line: int = 8) -> int | None:
    """Index of the tile (or its label) under the point (x, y) of a `heatmap_row` of `count` maps
    drawn with the same `tile` and `per_line`; None between tiles, on the colour bar or outside."""
    step_x, step_y = tile + GAP, tile + _label_height(tile) + GAP
    col, dx = divmod(x - MARGIN, step_x)
    line, dy = divmod(y - MARGIN, step_y)
    if col < 0 or line < 0 or col >= per_line or dx >= tile or dy >= step_y - GAP:
        return None
    i = int(line) * per_line + int(col)
    return i if i < count else None


def large_map(image: Image.Image, map2d: np.ndarray, title: str, mode: str = "overlay",
              size: int = 512) -> Image.Image:
    """One map at `size` px (the image enlarged to fit, aspect kept) under `title`, with its
    colour bar: the map over the image (overlay) or alone (raw). Raises ValueError as `heatmap_row`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    base = ImageOps.contain(image.convert("RGB"), (size, size), Image.Resampling.LANCZOS)
    picture = _picture(base, map2d, mode)
    font = text.font(18)
    titles = text.wrap(title, font, size, TITLE_LINES)
    legend = colour_bar(size)
    top = MARGIN + len(titles) * text.line_height(font)
    out = Image.new("RGB", (size + 2 * MARGIN, top + picture.height + GAP + legend.height + MARGIN), BACKGROUND)
    text.draw_lines(ImageDraw.Draw(out), titles, font, (MARGIN, MARGIN, size))
    out.paste(picture, (MARGIN + (size - picture.width) // 2, top))
    out.paste(legend, (MARGIN, top + picture.height + GAP))
    return out
