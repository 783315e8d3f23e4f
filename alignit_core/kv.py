"""K'/V' rows per cross-attention layer, computed once per request.

Text conditioning does not change across timesteps, so the rows the processor writes are
`W_k' · enc'(p')` (and `W_v' · ...`) for each cross-attention layer: a handful of small
matmuls before the first step. Custom Diffusion's `W_k/W_v` are concept tensors, used here for
the rows that ask for them; the UNet's own weights are never touched.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import LayerWrites


@dataclass(frozen=True)
class RowWrite:
    """Replace keys/values of batch rows `batch` at `positions` by projections of `hidden`."""

    batch: tuple[int, ...]  # batch indices (either CFG half)
    positions: tuple[int, ...]  # token positions
    hidden: torch.Tensor  # (tokens, dim) encoder states the rows are projected from
    kv: dict | None = None  # Custom Diffusion {layer: (W_k, W_v)}; None: the layer's own weights


def _project(attn, layer: str, hidden: torch.Tensor, kv: dict | None):
    x = hidden.unsqueeze(0)  # (1, tokens, dim): the same row layout as the UNet's own call
    if attn.norm_cross:
        x = attn.norm_encoder_hidden_states(x)
    if kv is not None and layer in kv:
        wk, wv = kv[layer]
        return F.linear(x, wk, attn.to_k.bias)[0], F.linear(x, wv, attn.to_v.bias)[0]
    return attn.to_k(x)[0], attn.to_v(x)[0]


@torch.no_grad()
def layer_writes(layers: dict, writes: list[RowWrite]) -> dict[str, LayerWrites]:
    """Per attn2 layer, the (batch, token) -> K/V rows of all `writes`; later writes win."""
    out = {}
    for name, attn in layers.items():
        cells: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for w in writes:
            k, v = _project(attn, name, w.hidden, w.kv)  # (tokens, inner)
            for b in w.batch:
                for pos in w.positions:
                    cells[(b, pos)] = (k[pos], v[pos])
        if not cells:
            continue
        device = next(iter(cells.values()))[0].device
        keys = list(cells)
        out[name] = LayerWrites(
            batch=torch.tensor([b for b, _ in keys], device=device),
            token=torch.tensor([t for _, t in keys], device=device),
            key=torch.stack([cells[c][0] for c in keys]),
            value=torch.stack([cells[c][1] for c in keys]),
        )
    return out
