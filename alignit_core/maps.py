"""Cross-attention maps as data: word-level maps, and `maps.safetensors` for researchers.

A generation's maps are per position (one per token of the row's prompt, start and end tokens
included). People read words, so a word split into sub-word tokens (`hydrangea` -> `hydr`, `angea`)
gets one map, the sum of its tokens' maps (the attention the whole word receives), and a word that
occurs twice gets two maps, told apart by a number (`red #1`, `red #2`).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAPS_FILE = "maps.safetensors"


@dataclass(frozen=True)
class MapEntry:
    """One map of a heat-map row: its label and the prompt positions it sums."""

    label: str
    positions: tuple[int, ...]


def entries(tokens, by: str = "words", special: bool = False) -> list[MapEntry]:
    """The maps of a row: `by` "words" (sub-word tokens merged, repeated words numbered) or
    "positions" (one per token); start and end tokens (every segment's start token of a long
    prompt) only when `special`. Raises ValueError for another `by`."""
    if by not in ("words", "positions"):
        raise ValueError(f"maps are shown by 'words' or 'positions', not {by!r}")
    kept = [t for t in tokens if special or t.word_index >= 0]
    if by == "positions":
        return [MapEntry(t.text, (t.position,)) for t in kept]
    groups: dict = {}
    for t in kept:
        key = ("word", t.word_index) if t.word_index >= 0 else ("special", t.position)
        groups.setdefault(key, [t.word or t.text, []])[1].append(t.position)
    seen = Counter(label for label, _ in groups.values())
    numbered: Counter = Counter()
    out = []
    for label, positions in groups.values():
        if seen[label] > 1:
            numbered[label] += 1
            label = f"{label} #{numbered[label]}"
        out.append(MapEntry(label, tuple(positions)))
    return out


def entry_maps(maps: np.ndarray, chosen: list[MapEntry]) -> np.ndarray:
    """(entries, h, w): each entry's map, the sum of its positions' maps in `maps` (tokens, h, w)."""
    return np.stack([maps[list(e.positions)].sum(0) for e in chosen]) if chosen else maps[:0]


def save_maps(gen, path: Path) -> Path:
    """Write `gen`'s maps to `path` (safetensors): one (tokens, h, w) fp32 tensor per row, named by
    the row, unscaled (attention probabilities averaged over the recording layers, steps and heads);
    the metadata holds, per row, the token texts, positions and words (JSON), and the settings."""
    from safetensors.numpy import save_file

    rows = [row for row in gen.rows if row in gen.maps]
    meta = {"tokens": {r: [t.text for t in gen.tokens[r]] for r in rows},
            "positions": {r: [t.position for t in gen.tokens[r]] for r in rows},
            "words": {r: [t.word for t in gen.tokens[r]] for r in rows}}
    save_file({r: np.ascontiguousarray(gen.maps[r], dtype=np.float32) for r in rows}, str(path),
              metadata={**{k: json.dumps(v, ensure_ascii=False) for k, v in meta.items()},
                        "settings": json.dumps(gen.record(), ensure_ascii=False)})
    return path
