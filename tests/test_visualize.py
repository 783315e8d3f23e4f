"""visualize: heat maps, heat-map rows, comparison grids and token chips."""
from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from visualize import (MARK_COLOUR, colorize, colour_bar, comparison_grid, heatmap_row, large_map, overlay,
                       swap_diagram, text, tile_at, token_chips)
from visualize.grid import TITLE_LINES
from visualize.heatmaps import BAR_HEIGHT, BORDER, GAP, MARGIN

REPO = Path(__file__).resolve().parents[1]
JET = matplotlib.colormaps["jet"]


def top_colour(cmap=JET):
    return tuple(int(c) for c in cmap(1.0, bytes=True)[:3])


def bottom_colour(cmap=JET):
    return tuple(int(c) for c in cmap(0.0, bytes=True)[:3])


def grey(size=(64, 64)):
    return Image.new("RGB", size, (128, 128, 128))


def pixels_of(image: Image.Image, colour) -> np.ndarray:
    """Boolean (h, w): where `image` is exactly `colour`."""
    return (np.asarray(image.convert("RGB")) == colour).all(axis=-1)


# colorize


def test_colorize_gives_uint8_rgb_of_the_map_shape():
    rgb = colorize(np.random.default_rng(0).random((7, 5)))
    assert rgb.dtype == np.uint8
    assert rgb.shape == (7, 5, 3)


@pytest.mark.parametrize("cmap", ["jet", "inferno"])
def test_colorize_maps_the_peak_to_the_top_colour_and_zero_to_the_bottom(cmap):
    one_hot = np.zeros((4, 4))
    one_hot[1, 2] = 0.03  # tiny: scaling is by the map's own maximum, not by 1
    rgb = colorize(one_hot, cmap)
    assert tuple(rgb[1, 2]) == top_colour(matplotlib.colormaps[cmap])
    assert tuple(rgb[0, 0]) == bottom_colour(matplotlib.colormaps[cmap])


def test_colorize_is_independent_of_the_maps_scale():
    m = np.random.default_rng(1).random((6, 6))
    np.testing.assert_array_equal(colorize(m), colorize(m * 1234.5))


def test_colorize_scales_each_map_from_its_own_minimum_to_its_maximum():
    """Maps were scaled by their maximum only: every tile showed the warm half of the scale."""
    m = np.array([[-5.0, 0.0], [1.0, 0.5]])
    rgb = colorize(m)
    assert tuple(rgb[0, 0]) == bottom_colour() and tuple(rgb[1, 0]) == top_colour()
    assert tuple(rgb[0, 1]) != bottom_colour()  # 0 is not the bottom when the map goes below it
    offset = np.array([[10.0, 10.2], [10.4, 11.0]])  # a narrow range far from 0 uses the whole scale
    np.testing.assert_array_equal(colorize(offset), colorize(offset - 10.0))
    assert tuple(colorize(offset)[0, 0]) == bottom_colour()


@pytest.mark.parametrize("value", [0.0, np.nan, np.inf, -np.inf])
def test_colorize_of_an_empty_or_non_finite_map_is_the_bottom_colour_without_warnings(value):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a 0/0 or inf/inf would warn before giving NaN
        rgb = colorize(np.full((3, 3), value))
    assert (rgb == bottom_colour()).all()


def test_colorize_ignores_nan_pixels_next_to_real_ones():
    m = np.array([[np.nan, 2.0], [0.0, 1.0]])
    rgb = colorize(m)
    assert tuple(rgb[0, 0]) == bottom_colour()
    assert tuple(rgb[0, 1]) == top_colour()


def test_colorize_refuses_a_map_that_is_not_2d():
    with pytest.raises(ValueError, match="2-D"):
        colorize(np.zeros((2, 3, 4)))


def test_colorize_names_an_unknown_colormap():
    with pytest.raises(ValueError, match="no-such-map"):
        colorize(np.zeros((2, 2)), "no-such-map")


# overlay


def test_overlay_has_the_images_size_and_is_rgb():
    out = overlay(Image.new("RGBA", (50, 30)), np.ones((4, 4)))
    assert out.mode == "RGB"
    assert out.size == (50, 30)


def test_overlay_with_alpha_0_is_the_image_and_with_alpha_1_is_the_map():
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (32, 32, 3), np.uint8))
    m = np.random.default_rng(3).random((8, 8))
    np.testing.assert_array_equal(np.asarray(overlay(image, m, alpha=0.0)), np.asarray(image))
    assert np.asarray(overlay(grey(), np.ones((8, 8)), alpha=1.0)).tolist() == (  # a flat map: the bottom colour
        np.broadcast_to(bottom_colour(), (64, 64, 3)).tolist()
    )


def test_overlay_colours_the_hot_corner_of_the_image():
    m = np.zeros((4, 4))
    m[0, 0] = 1.0  # hot top-left cell; the rest cold
    out = np.asarray(overlay(grey(), m, alpha=0.5)).astype(int)
    expected_hot = (np.array(top_colour()) + 128) // 2
    expected_cold = (np.array(bottom_colour()) + 128) // 2
    np.testing.assert_allclose(out[0, 0], expected_hot, atol=1)
    np.testing.assert_allclose(out[-1, -1], expected_cold, atol=1)


def test_overlay_refuses_alpha_outside_0_1():
    with pytest.raises(ValueError, match="alpha"):
        overlay(grey(), np.ones((2, 2)), alpha=1.5)


# heatmap_row


def row(count, **kwargs):
    return heatmap_row(grey(), np.zeros((count, 4, 4)), [f"t{i}" for i in range(count)], **kwargs)


def test_heatmap_row_grows_one_tile_wide_per_token():
    w1, w2, w3 = (row(n).width for n in (1, 2, 3))
    assert w3 - w2 == w2 - w1 > 96


def test_heatmap_row_tile_size_sets_the_tiles():
    small, large = row(3, tile=64), row(3, tile=128)
    assert large.width - small.width == 3 * 64
    assert large.height - small.height >= 64  # the label font grows with the tile too


def test_heatmap_row_wraps_after_per_line_tokens():
    one, full, wrapped, two = row(1), row(8), row(9), row(16)
    assert one.height == full.height
    assert wrapped.width == full.width == two.width
    assert wrapped.height == two.height > one.height + 96  # a second line of tiles
    assert row(9, per_line=3).height == row(7, per_line=3).height > wrapped.height


def test_heatmap_row_frames_the_marked_tiles_only():
    # Two tiles, the right one marked: its frame is all on the right half of the row.
    out = row(2, marked={1})
    mark = pixels_of(out, MARK_COLOUR)
    half = out.width // 2
    assert not mark[:, :half].any()
    ys, xs = np.nonzero(mark)
    top, left, right = ys.min(), xs.min(), xs.max()
    assert right - left + 1 == 96 + 2 * BORDER  # the frame surrounds the 96-px tile
    # Every pixel of the frame's top band and side bands (down to the tile's bottom) is marked.
    assert mark[top : top + BORDER, left : right + 1].all()
    assert mark[top : top + BORDER + 96, left : left + BORDER].all()
    assert mark[top : top + BORDER + 96, right - BORDER + 1 : right + 1].all()
    # The tile inside is the picture, not the frame colour.
    assert not mark[top + BORDER : top + BORDER + 96, left + BORDER : right - BORDER + 1].any()


def legend_height() -> int:
    return GAP + colour_bar(100).height + MARGIN


def test_heatmap_row_without_marks_has_no_frame_colour():
    out = row(3)
    assert not pixels_of(out, MARK_COLOUR)[: out.height - legend_height()].any()  # (jet passes the colour)


def test_heatmap_row_needs_one_label_per_map():
    with pytest.raises(ValueError, match="2 labels for 3 token maps"):
        heatmap_row(grey(), np.zeros((3, 4, 4)), ["a", "b"])


def test_heatmap_row_refuses_a_marked_tile_that_does_not_exist():
    with pytest.raises(ValueError, match=r"\[5\]"):
        row(3, marked={5})


def test_heatmap_row_raw_mode_shows_the_map_not_the_image():
    image = Image.new("RGB", (64, 64), (0, 255, 0))  # green: in neither jet end nor the blend
    maps = np.random.default_rng(4).random((2, 4, 4))
    raw = heatmap_row(image, maps, ["a", "b"], mode="raw")
    over = heatmap_row(image, maps, ["a", "b"], mode="overlay")
    assert raw.size == over.size
    assert not np.array_equal(np.asarray(raw), np.asarray(over))
    # The raw tile's top-left pixel is the colour of the map's top-left cell.
    corner = np.argwhere(~pixels_of(raw, (255, 255, 255)))[0]
    assert tuple(np.asarray(raw)[tuple(corner)]) == tuple(colorize(maps[0])[0, 0])


def test_heatmap_row_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        row(2, mode="contour")


def test_heatmap_row_carries_a_colour_bar_that_says_how_maps_are_scaled():
    out = np.asarray(row(3))
    legend, tiles = out[-legend_height():], out[: -legend_height()]
    assert (legend == top_colour()).all(axis=-1).any() and (legend == bottom_colour()).all(axis=-1).any()
    assert not (tiles == top_colour()).all(axis=-1).any()  # flat maps: no top colour in the tiles


def test_colour_bar_runs_from_the_bottom_to_the_top_colour():
    bar = np.asarray(colour_bar(300))
    ramp = bar[BAR_HEIGHT // 2]
    coloured = [tuple(c) for c in ramp if tuple(c) != (255, 255, 255) and len(set(c)) > 1]
    assert coloured[0] == bottom_colour() and coloured[-1] == top_colour()
    with pytest.raises(ValueError, match="80 px"):
        colour_bar(40)


@pytest.mark.parametrize("count, per_line", [(1, 8), (7, 5), (16, 4)])
def test_tile_at_finds_the_tile_under_every_tiles_centre(count, per_line):
    out = heatmap_row(grey(), np.random.default_rng(0).random((count, 4, 4)), [f"t{i}" for i in range(count)],
                      per_line=per_line, marked={count - 1})
    # the marked (last) tile's frame is where tile_at says the last tile is
    ys, xs = np.nonzero(pixels_of(out, MARK_COLOUR))
    assert tile_at(xs.min() + BORDER + 48, ys.min() + BORDER + 48, count, per_line=per_line) == count - 1
    assert tile_at(MARGIN + 48, MARGIN + 48, count, per_line=per_line) == 0
    assert tile_at(2, 2, count, per_line=per_line) is None  # the margin
    assert tile_at(MARGIN + 96 + GAP // 2, MARGIN + 48, count, per_line=per_line) is None  # between tiles
    assert tile_at(MARGIN + 48, out.height - 5, count, per_line=per_line) is None  # the colour bar


def test_large_map_is_one_map_over_the_enlarged_image_with_its_colour_bar():
    m = np.zeros((4, 4))
    m[0, 0] = 1.0
    big = large_map(grey((32, 32)), m, "red in swapped", size=256)
    assert big.width == 256 + 2 * MARGIN and big.height > 256
    pixels = np.asarray(big)
    hot = (np.array(top_colour()) + 128) // 2
    assert (np.abs(pixels.astype(int) - hot).max(-1) <= 2).sum() > 100  # the hot corner, enlarged
    with pytest.raises(ValueError, match="mode"):
        large_map(grey(), m, "x", mode="contour")


def test_swap_diagram_marks_the_swapped_columns_and_escapes_text():
    html = swap_diagram([(0, "<|startoftext|>"), (1, "a"), (2, "red")], [("p′", ["<|startoftext|>", "*", "yellow"])],
                        {2})
    assert html.count("↑ K/V") == 1 and "&lt;|startoftext|&gt;" in html and "<|startoftext|>" not in html
    assert html.count("#{:02x}{:02x}{:02x}".format(*MARK_COLOUR)) == 3  # position, p and p′ cells of column 2


# comparison_grid


def solid(colour, size):
    return Image.new("RGB", size, colour)


def test_comparison_grid_widens_with_each_column():
    a, b = solid((255, 0, 0), (40, 30)), solid((0, 0, 255), (50, 50))
    one = comparison_grid([("baseline", a, None)], "title")
    two = comparison_grid([("baseline", a, None), ("AlignIT", b, None)], "title")
    assert two.width > one.width
    assert two.width >= 40 + 50
    assert two.mode == "RGB"


def test_comparison_grid_pastes_every_image_and_row_whole_and_unscaled():
    red, blue = solid((255, 0, 0), (40, 30)), solid((0, 0, 255), (50, 50))
    green_row, magenta_row = solid((0, 255, 0), (120, 20)), solid((255, 0, 255), (90, 35))
    grid = comparison_grid(
        [("baseline", red, green_row), ("AlignIT", blue, magenta_row)],
        "a <striped-ball> in a garden",
        footer="seed 0\nsteps 30",
    )
    assert pixels_of(grid, (255, 0, 0)).sum() == 40 * 30
    assert pixels_of(grid, (0, 0, 255)).sum() == 50 * 50
    assert pixels_of(grid, (0, 255, 0)).sum() == 120 * 20
    assert pixels_of(grid, (255, 0, 255)).sum() == 90 * 35
    assert grid.width >= 120 + 90  # columns are as wide as their widest part


def test_comparison_grid_lines_up_the_images_and_the_rows():
    small, tall = solid((255, 0, 0), (40, 30)), solid((0, 0, 255), (40, 60))
    grid = comparison_grid(
        [("a", small, solid((0, 255, 0), (40, 10))), ("b", tall, solid((255, 0, 255), (40, 10)))],
        "title",
    )
    first_row = lambda colour: np.nonzero(pixels_of(grid, colour).any(axis=1))[0][0]  # noqa: E731
    assert first_row((255, 0, 0)) == first_row((0, 0, 255))
    assert first_row((0, 255, 0)) == first_row((255, 0, 255))


def test_comparison_grid_footer_and_long_title_make_it_taller():
    columns = [("baseline", solid((255, 0, 0), (64, 64)), None)]
    plain = comparison_grid(columns, "short")
    assert comparison_grid(columns, "short", footer="seed 0\nsteps 30").height > plain.height
    long_title = "a very long title that cannot fit in one line of a 64 px wide grid"
    grid = comparison_grid(columns, long_title)
    assert grid.height > plain.height
    assert grid.width == plain.width  # the title wraps instead of widening the grid


def test_comparison_grid_needs_a_column():
    with pytest.raises(ValueError, match="at least one column"):
        comparison_grid([], "title")


# text: fitting and wrapping labels of any length

HUGE = "x" * 100_000  # a 100,000-character concept token or prompt


@pytest.fixture
def measured(monkeypatch) -> list[int]:
    """The length of every string `visualize.text` measures; the test fails past 500 measurements
    (a label fitted one character at a time would take 100,000 of them)."""
    lengths: list[int] = []
    real = text.text_width

    def width(s, f):
        lengths.append(len(s))
        if len(lengths) > 500:
            pytest.fail("over 500 measurements: the work grows with the length of the text")
        return real(s, f)

    monkeypatch.setattr(text, "text_width", width)
    return lengths


@pytest.mark.parametrize("label", ["<striped-ball>", "a jumping dog over the fence", "WWWWiiiilll" * 9, "x"])
@pytest.mark.parametrize("width", [1, 20, 96])
def test_fit_keeps_the_longest_prefix_that_fits_before_its_ellipsis(label, width):
    f = text.font(13)
    fitted = text.fit(label, f, width)
    if text.text_width(label, f) <= width:
        assert fitted == label
        return
    kept = fitted.removesuffix(text.ELLIPSIS)
    assert fitted.endswith(text.ELLIPSIS) and label.startswith(kept)
    assert not kept or text.text_width(fitted, f) <= width
    assert text.text_width(label[: len(kept) + 1] + text.ELLIPSIS, f) > width  # one more would not fit


def test_fitting_a_100000_character_label_measures_a_few_short_strings(measured):
    f = text.font(13)
    fitted = text.fit(HUGE, f, 96)
    assert fitted == text.fit("x" * 200, f, 96)  # the same label as for a short one
    assert len(measured) < 40 and max(measured) < 200


def test_wrap_breaks_between_words_and_inside_words_wider_than_a_line():
    f = text.font(13)
    lines = text.wrap("a jumping dog " + "W" * 40 + " over the fence", f, 100, 20)
    assert all(text.text_width(line, f) <= 100 for line in lines)
    assert "".join(lines).replace(" ", "") == ("ajumpingdog" + "W" * 40 + "overthefence")
    assert text.wrap("seed 0\nsteps 30", f, 100, 20) == ["seed 0", "steps 30"]


@pytest.mark.parametrize("long_text", [HUGE, " ".join(["a jumping dog"] * 7_700)], ids=["one word", "many words"])
def test_a_100000_character_paragraph_wraps_to_max_lines_ending_in_an_ellipsis(long_text, measured):
    f = text.font(22)
    lines = text.wrap(long_text, f, 300, 3)
    assert len(lines) == 3 and lines[-1].endswith(text.ELLIPSIS)
    assert all(text.text_width(line, f) <= 300 for line in lines)
    assert len(measured) < 300 and max(measured) < 1_000


def test_a_grid_titled_with_a_100000_character_prompt_is_as_tall_as_one_with_a_long_sentence():
    columns = [("baseline", solid((255, 0, 0), (128, 128)), None), ("swapped", solid((0, 0, 255), (128, 128)), None)]
    sentence = " ".join(["a red circle on a blue background"] * 8)  # more than TITLE_LINES lines at this width
    assert len(text.wrap(sentence, text.font(22), 2 * 128 + 16, 100)) > TITLE_LINES
    huge = comparison_grid(columns, " ".join(["a red circle on a blue background"] * 3_000))
    assert huge.size == comparison_grid(columns, sentence).size


# token_chips


def test_token_chips_escape_the_token_text():
    html = token_chips([(2, "<striped-ball>")], set())
    assert "&lt;striped-ball&gt;" in html
    assert "<striped-ball>" not in html
    assert "2 · " in html


def test_token_chips_highlight_the_selected_positions():
    mark = "#{:02x}{:02x}{:02x}".format(*MARK_COLOUR)
    html = token_chips([(0, "<|startoftext|>"), (1, "a"), (2, "dog"), (3, "<|endoftext|>")], {2})
    chips = html.split("</span>")[:-1]
    assert len(chips) == 4
    assert [mark in chip for chip in chips] == [False, False, True, False]
    assert "<script" not in html


# the house rule


def test_visualize_imports_no_model_or_ui_library():
    code = (
        "import visualize, sys; "
        "heavy = {'torch', 'gradio', 'diffusers', 'transformers', 'matplotlib.pyplot'}; "
        "assert not heavy & set(sys.modules), heavy & set(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
