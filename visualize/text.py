"""Fonts, line wrapping and text drawing shared by the heat-map rows and the comparison grid."""
from __future__ import annotations

from functools import lru_cache

from PIL import ImageDraw, ImageFont

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
ELLIPSIS = "…"


@lru_cache(maxsize=None)
def font(size: int) -> Font:
    """Pillow's bundled font at `size` px; the fixed-size bitmap font where that is unavailable.

    The bundled font ships with Pillow, so labels render the same on a laptop and on a Space.
    Pillow < 10.1 has no `size` argument (TypeError); Pillow built without FreeType cannot
    scale it (ImportError / OSError).
    """
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def line_height(f: Font) -> int:
    """Height in px of one line of text, descenders included, plus a little leading."""
    # Text is drawn from its ascender line, so the glyphs' bottom edge is the height they need.
    return int(f.getbbox("Ag|")[3]) + 3


def text_width(text: str, f: Font) -> int:
    return int(round(f.getlength(text)))


def fit(text: str, f: Font, width: int) -> str:
    """`text` shortened with "…" so that it is at most `width` px wide."""
    if text_width(text, f) <= width:
        return text
    while text and text_width(text + ELLIPSIS, f) > width:
        text = text[:-1]
    return text + ELLIPSIS


def wrap(text: str, f: Font, width: int) -> list[str]:
    """`text` split into lines at most `width` px wide.

    Explicit newlines are kept; lines break between words, and a single word wider than `width`
    (a model id, a path) is broken between characters rather than overflowing.
    """
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if text_width(candidate, f) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for char in word:
                if line and text_width(line + char, f) > width:
                    lines.append(line)
                    line = ""
                line += char
        lines.append(line)
    return lines


def draw_lines(
    draw: ImageDraw.ImageDraw,
    lines: list[str],
    f: Font,
    box: tuple[int, int, int],
    fill: tuple[int, int, int] = (0, 0, 0),
    centred: bool = True,
) -> int:
    """Draw `lines` in the column `box` = (left, top, width), centred or flush left.

    Returns the height used.
    """
    left, top, width = box
    step = line_height(f)
    for i, line in enumerate(lines):
        x = left + (width - text_width(line, f)) // 2 if centred else left
        draw.text((x, top + i * step), line, font=f, fill=fill)
    return step * len(lines)
