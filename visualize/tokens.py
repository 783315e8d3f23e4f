"""The tokenized prompt as HTML chips "position · text", for the token table in the UI."""
from __future__ import annotations

import html
from collections.abc import Set

from .heatmaps import MARK_COLOUR

_CHIP = (
    "display:inline-block;margin:2px;padding:1px 8px;border-radius:999px;"
    "font-family:monospace;font-size:0.85em;white-space:nowrap;"
)
# Both colours are set on every chip so that it reads the same on a light or a dark theme.
_PLAIN = _CHIP + "background:#eeeeee;color:#222222;border:1px solid #cccccc;"
_SELECTED = _CHIP + (
    "background:#{:02x}{:02x}{:02x};color:#000000;border:1px solid #000000;font-weight:bold;"
).format(*MARK_COLOUR)


def token_chips(tokens: list[tuple[int, str]], selected: Set[int]) -> str:
    """HTML: one rounded chip "position · text" per (position, text), in the given order.

    Chips whose position is in `selected` have the heat-map rows' MARK_COLOUR background.
    Token text is HTML-escaped; the markup has inline styles only, no scripts or classes.
    """
    chips = "".join(
        f'<span style="{_SELECTED if position in selected else _PLAIN}">'
        f"{int(position)} · {html.escape(token)}</span>"
        for position, token in tokens
    )
    return f'<div style="line-height:1.9;">{chips}</div>'


def swap_diagram(p: list[tuple[int, str]], sources: list[tuple[str, list[str]]], swapped: Set[int]) -> str:
    """HTML: p's tokens over each p′'s tokens, column by position; the swapped columns carry an
    arrow and the MARK_COLOUR background: there the base model reads p′'s keys and values.
    `p` is (position, text) per token, `sources` (name, texts) per p′, each as long as p.
    Text is HTML-escaped; inline styles only."""
    cell = "padding:1px 6px;text-align:center;font-family:monospace;white-space:nowrap;"
    mark = "background:#{:02x}{:02x}{:02x};color:#000000;font-weight:bold;".format(*MARK_COLOUR)

    def row(label: str, texts: list[str]) -> str:
        cells = "".join(f'<td style="{cell}{mark if pos in swapped else ""}">{html.escape(t)}</td>'
                        for (pos, _), t in zip(p, texts))
        return f'<tr><th style="{cell}text-align:right;">{html.escape(label)}</th>{cells}</tr>'

    positions = row("position", [str(pos) for pos, _ in p])
    arrows = "".join(f'<td style="{cell}">{"↑ K/V" if pos in swapped else ""}</td>' for pos, _ in p)
    body = positions + row("p", [t for _, t in p])
    for name, texts in sources:
        body += f'<tr><th></th>{arrows}</tr>' + row(name, texts)
    return f'<div style="overflow-x:auto;"><table style="border-collapse:collapse;font-size:0.85em;">{body}</table></div>'
