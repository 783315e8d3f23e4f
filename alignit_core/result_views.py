"""What the demo shows of a generation, computed without gradio: the heat-map rows under the images,
the tile a click lands on and the large map, the before/after pair, the score table with its
per-token MI rows, the download names and the line that reproduces the run from the command line.

`app.py` puts these into its components; the inputs' side (token view, swaps box, concepts) is `views`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from visualize import heatmap_row, large_map, tile_at

from .maps import entries, entry_maps
from .models import draws_shapes_world
from .record import CAPTIONS, Generation, command
from .scores import MI_SAMPLES, AlignmentReport
from .views import GPU_MAX_S, GPU_SETUP_S, GPU_UNET_S, plain

MAX_TOKEN_ROWS = 16  # per-token MI rows in the score table; a longer prompt shows those that differ most
TILES_PER_LINE = {2: 5, 3: 4}  # heat-map tiles per line by number of columns, so that a row fits its column


def tiles_per_line(gen: Generation, tokens: int) -> int:
    """Heat-map tiles a line: as many as fit a column, more for a long prompt (at most 10 lines)."""
    return max(TILES_PER_LINE[len(gen.rows)], -(-tokens // 10))


@dataclass(frozen=True)
class MapView:
    """How the heat maps are shown: overlay or raw, by words or positions, start/end tokens or not."""

    mode: str = "overlay"
    by: str = "words"
    special: bool = False

    def entries(self, gen: Generation, row: str):
        return entries(gen.tokens[row], self.by, self.special)


def _per_line(gen: Generation, view: MapView) -> int:
    return tiles_per_line(gen, max(len(view.entries(gen, row)) for row in gen.rows))


def heatmap_rows(gen: Generation, view: MapView) -> list:
    """One heat-map row per image: a tile per word (or position), swapped ones framed."""
    per_line = _per_line(gen, view)
    rows = []
    for row in gen.rows:
        chosen = view.entries(gen, row)
        marked = {i for i, e in enumerate(chosen) if set(e.positions) & set(gen.swapped[row])}
        rows.append(heatmap_row(gen.images[row], entry_maps(gen.maps[row], chosen), [e.label for e in chosen],
                                marked=marked, mode=view.mode, per_line=per_line))
    return rows


def clicked_map(gen: Generation | None, view: MapView, column: int, x: float, y: float) -> str | None:
    """The label of the tile under (x, y) of column `column`'s heat-map row, or None."""
    if gen is None or column >= len(gen.rows):
        return None
    chosen = view.entries(gen, gen.rows[column])
    i = tile_at(x, y, len(chosen), per_line=_per_line(gen, view))
    return None if i is None else chosen[i].label


def large_map_pick(gen: Generation, view: MapView, row=None, label=None) -> tuple[str, list[str], str | None]:
    """(image, the labels of its maps, label) of the large map: `row` kept if `gen` has it, else its AlignIT or
    swapped image; `label` kept if that image has it, else its first swapped word (else its first word)."""
    if row not in gen.rows:
        row = next((r for r in ("alignit", "swapped") if r in gen.rows), gen.rows[0])
    chosen = view.entries(gen, row)
    labels = [e.label for e in chosen]
    if label not in labels:
        swapped = [e.label for e in chosen if set(e.positions) & set(gen.swapped[row])]
        label = (swapped or labels or [None])[0]
    return row, labels, label


def big_map(gen: Generation, view: MapView, row: str, label: str):
    """The large map of `label` (a word or token of the view) over image `row`, or None."""
    chosen = {e.label: e for e in view.entries(gen, row)}
    if row not in gen.maps or label not in chosen:
        return None
    return large_map(gen.images[row], entry_maps(gen.maps[row], [chosen[label]])[0],
                     f"“{label}” in {CAPTIONS[row]}", view.mode)


def before_after(gen: Generation, shown: list[str]):
    """The before/after slider's pair: the first image (the baseline) and the AlignIT or swapped one."""
    after = next((r for r in ("alignit", "swapped") if r in gen.rows), None)
    if after is None or gen.rows[0] == after:
        return None
    return shown[0], shown[gen.rows.index(after)]


def caption(gen: Generation, row: str) -> str:
    """The image box's name for `row`; on a model of the shapes world, with what its classifier, Table 1's
    judge, sees in the picture: a shipped concept's token where the picture is its instance (`AlignIT:
    <holed-star> on yellow`), else the world's words (`red star with a hole on yellow`)."""
    if not draws_shapes_world(gen.model.get("name")):
        return CAPTIONS[row]
    from .toy.evaluate import fidelity  # the shapes world, only for its own models
    from .toy.instances import INSTANCES
    from .toy.shapes import classify
    j = classify(np.asarray(gen.images[row].convert("RGB")))
    for c in gen.request.concepts:
        known = INSTANCES.get(c.token.strip("<>"))
        if known and fidelity(j, known["scene"]):
            return f"{CAPTIONS[row]}: {c.token} on {j.background}"
    return f"{CAPTIONS[row]}: {j.words}"


def download_prefix(gen: Generation) -> str:
    """What a downloaded file's name starts with: the concept(s) or "swap", and the seed, so that
    files of different runs neither collide nor look alike (`striped-ball-seed0-alignit.png`)."""
    what = "-".join(c.token.strip("<>") for c in gen.request.concepts) or "swap"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{what}-seed{gen.settings.seed}-")


def cli_command(gen: Generation, uploaded) -> str:
    """The `python -m alignit_core generate` line that reproduces `gen`; `uploaded`: the concepts
    that came from a visitor's file (named by that file)."""
    concepts = gen.request.concepts
    names = [f"{c.name}.safetensors" if c in uploaded else c.name for c in concepts]
    extra = ["--token", concepts[0].token, "--class-word", concepts[0].class_word] \
        if len(concepts) == 1 and concepts[0] in uploaded else []
    return command(gen, names, extra)


def mi_rows(gen: Generation, report: AlignmentReport, mode: str) -> list:
    """Per image, a heat-map row of its per-token MI maps (tokens of the scored text, start and end left out)."""
    per_line = tiles_per_line(gen, len(report.token_positions))
    marked = {i for i, pos in enumerate(report.token_positions) if pos in report.positions}
    return [heatmap_row(gen.images[row], report.mi[row].token_maps, labels=list(report.mi[row].tokens),
                        marked=marked, mode=mode, per_line=per_line) for row in gen.rows]


def scores_markdown(report: AlignmentReport) -> str:
    """The scores as a table: one column per image, the difference to the first image, per-token MI."""
    rows = list(report.mi)
    head = "| | " + " | ".join(CAPTIONS[r] for r in rows) + " |\n|---|" + "---|" * len(rows)
    lines = [f"Every image scored against **`{report.text}`** with the base model's own denoiser; "
             f"all images share the same {len(report.mi[rows[0]].samples)} noise samples.", "", head]
    if "customized" in rows or "alignit" in rows:
        lines[0] += (" In AlignIT mode that text is *p*: the concept is its class word, so the concept's own "
                     "look (its stripes, its hole) counts against an image, not for it.")
    lines.append("| MI score (nats) | " + " | ".join(f"{report.mi[r].value:.2f} ± {report.mi[r].stderr:.2f}"
                                                    for r in rows) + " |")
    lines.append(f"| vs {CAPTIONS[report.reference]} | | " + " | ".join(
        f"**{d:+.2f}** ± {se:.2f}" for d, se in (report.differences[r] for r in rows[1:])) + " |")
    for label, values in (("CLIP text alignment", report.clip_text), ("CLIP image alignment", report.clip_image)):
        if values:
            lines.append(f"| {label} | " + " | ".join(f"{values[r]:.3f}" for r in rows) + " |")
    tokens = report.mi[rows[0]].tokens
    shown = range(len(tokens))
    if len(tokens) > MAX_TOKEN_ROWS:  # a long prompt: the swapped tokens and those the images disagree on most
        values = np.stack([report.mi[r].token_values for r in rows])
        spread = values.max(0) - values.min(0) if len(rows) > 1 else np.abs(values[0])
        swapped = [k for k, pos in enumerate(report.token_positions) if pos in report.positions]
        rest = [k for k in np.argsort(-spread) if k not in swapped][:MAX_TOKEN_ROWS - len(swapped)]
        shown = sorted(swapped + [int(k) for k in rest])
    at = report.token_positions or tuple(range(1, len(tokens) + 1))
    for k in shown:
        lines.append(f"| MI of *{plain(tokens[k])}* ({at[k]}) | " +
                     " | ".join(f"{report.mi[r].token_values[k]:.2f}" for r in rows) + " |")
    if len(shown) < len(tokens):
        lines += ["", f"{len(tokens) - len(shown)} more tokens (those the images differ least on) are in the "
                      f"heat-map rows."]
    if report.clip_note:
        lines += ["", f"{plain(report.clip_note)}; showing the MI score only."]
    lines += ["", "Under each image: where each word of the text helps the denoiser "
                  "(per-token MI; where a word contradicts the image the map is negative and shows as 0)."]
    return "\n".join(lines)


def score_seconds(gen: Generation, *args, **kwargs) -> int:
    """How long scoring may hold a ZeroGPU GPU: per image, MI sample and text condition (the prompt,
    the empty prompt and each token left out), one denoiser evaluation."""
    size = gen.settings.size
    conditions = 2 + max(len(t) for t in gen.tokens.values())
    evaluations = len(gen.rows) * MI_SAMPLES * conditions * (size / 512) ** 2
    return min(GPU_MAX_S, round(GPU_SETUP_S + GPU_UNET_S * evaluations))
