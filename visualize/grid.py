"""Side-by-side comparison of generations (baseline, AlignIT, base), each with its heat maps."""
from __future__ import annotations

from PIL import Image, ImageDraw

from . import text

BACKGROUND = (255, 255, 255)
MARGIN = 16
GAP = 16
TITLE_SIZE = 22
CAPTION_SIZE = 16
FOOTER_SIZE = 13
FOOTER_COLOUR = (70, 70, 70)
# Lines drawn at most per title, caption and footer paragraph; a longer text ends in "…" (the full
# text is in the settings), so a prompt of any length draws a grid of bounded size.
TITLE_LINES = 3
CAPTION_LINES = 2
FOOTER_LINES = 3


def comparison_grid(
    columns: list[tuple[str, Image.Image, Image.Image | None]],
    title: str,
    footer: str = "",
) -> Image.Image:
    """One column per (caption, image, heat-map row or None), side by side under `title`.

    Each column is its caption, the image, then the heat-map row, centred in a column as wide
    as the wider of the two; the images start on one line and the rows on another, so the
    columns' rows line up for comparison. Images are pasted at their own size, never rescaled.
    The title (centred) and the footer (flush left, newlines kept) wrap to the grid's width, at
    most TITLE_LINES for the title, FOOTER_LINES per footer paragraph and CAPTION_LINES per caption.
    Returns an RGB image on white. Raises ValueError when there are no columns.
    """
    if not columns:
        raise ValueError("comparison_grid needs at least one column")
    title_font = text.font(TITLE_SIZE)
    caption_font = text.font(CAPTION_SIZE)
    footer_font = text.font(FOOTER_SIZE)

    widths = [max(image.width, row.width if row is not None else 0) for _, image, row in columns]
    inner = sum(widths) + GAP * (len(columns) - 1)
    title_lines = text.wrap(title, title_font, inner, TITLE_LINES)
    footer_lines = text.wrap(footer, footer_font, inner, FOOTER_LINES) if footer else []
    captions = [text.wrap(caption, caption_font, w, CAPTION_LINES) for (caption, _, _), w in zip(columns, widths)]
    rows = [row for _, _, row in columns if row is not None]

    # Top to bottom: title, captions, images, heat-map rows, footer; a section's height is
    # that of its tallest member so that the columns line up.
    caption_top = MARGIN + len(title_lines) * text.line_height(title_font) + GAP
    image_top = caption_top + max(len(lines) for lines in captions) * text.line_height(caption_font)
    bottom = image_top + max(image.height for _, image, _ in columns)
    row_top = bottom + GAP
    if rows:
        bottom = row_top + max(row.height for row in rows)
    footer_top = bottom + GAP
    if footer_lines:
        bottom = footer_top + len(footer_lines) * text.line_height(footer_font)

    grid = Image.new("RGB", (2 * MARGIN + inner, bottom + MARGIN), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    text.draw_lines(draw, title_lines, title_font, (MARGIN, MARGIN, inner))
    left = MARGIN
    for (_, image, row), lines, width in zip(columns, captions, widths):
        text.draw_lines(draw, lines, caption_font, (left, caption_top, width))
        grid.paste(image.convert("RGB"), (left + (width - image.width) // 2, image_top))
        if row is not None:
            grid.paste(row.convert("RGB"), (left + (width - row.width) // 2, row_top))
        left += width + GAP
    text.draw_lines(
        draw, footer_lines, footer_font, (MARGIN, footer_top, inner), FOOTER_COLOUR, centred=False
    )
    return grid
