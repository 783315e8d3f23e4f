"""Fonts, line wrapping and text drawing shared by the heat-map rows and the comparison grid."""
from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from itertools import islice

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


def _longest_prefix(text: str, f: Font, width: int, suffix: str = "") -> int:
    """How many leading characters of `text`, followed by `suffix`, fit in `width` px (0 if none do).

    Found by doubling a prefix until it is too wide, then halving the gap: O(log k) measurements
    of strings at most 2k characters long for the k that fit, however long `text` is (a label of
    100,000 characters costs what one of 100 does). A longer prefix is taken to be no narrower.
    """
    def fits(n: int) -> bool:
        return text_width(text[:n] + suffix, f) <= width

    too_wide = 1
    while too_wide <= len(text) and fits(too_wide):
        too_wide *= 2
    fitting, too_wide = too_wide // 2, min(too_wide, len(text) + 1)
    while too_wide - fitting > 1:
        middle = (fitting + too_wide) // 2
        if fits(middle):
            fitting = middle
        else:
            too_wide = middle
    return fitting


def fit(text: str, f: Font, width: int) -> str:
    """`text` shortened with "…" so that it is at most `width` px wide."""
    if _longest_prefix(text, f, width) == len(text):
        return text
    return text[: _longest_prefix(text, f, width, ELLIPSIS)] + ELLIPSIS


def _lines(paragraph: str, f: Font, width: int) -> Iterator[str]:
    """The lines of `paragraph` at most `width` px wide, broken between words, and between the
    characters of a word wider than `width` (a model id, a path). Lazy: a caller that stops
    early never measures the rest."""
    line = ""
    for word in paragraph.split(" "):
        candidate = f"{line} {word}" if line else word
        if _longest_prefix(candidate, f, width) == len(candidate):
            line = candidate
            continue
        if line:
            yield line
        while True:
            head = max(1, _longest_prefix(word, f, width))  # at least one character a line
            if head == len(word):
                line = word
                break
            yield word[:head]
            word = word[head:]
    yield line


def wrap(text: str, f: Font, width: int, max_lines: int) -> list[str]:
    """`text` split into lines at most `width` px wide, at most `max_lines` per paragraph.

    Explicit newlines start paragraphs; see `_lines` for where lines break. A paragraph that needs
    more lines keeps its first `max_lines`, the last one ending in "…", so the work and the height
    drawn do not grow with the length of the text.
    """
    lines: list[str] = []
    for paragraph in text.split("\n"):
        kept = list(islice(_lines(paragraph, f, width), max_lines + 1))
        if len(kept) > max_lines:
            last = kept[max_lines - 1]
            kept = kept[: max_lines - 1] + [last[: _longest_prefix(last, f, width, ELLIPSIS)] + ELLIPSIS]
        lines += kept
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
