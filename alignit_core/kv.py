"""The keys and values of a request's cross-attention layers, projected once per request.

Text conditioning does not change across timesteps, so each cross-attention layer projects a
request's conditioning once and reuses its keys and values at every step. A swap writes the dummy
prompt's encoder rows `enc'(p')` into a copy of the conditioning at the swapped (row, position)
cells; each layer's own projection of that copy gives `K' = W_k · enc'(p')` there, in the same
matmul as every other row. A concept that changes the key/value weights (Custom Diffusion's
`W_k/W_v`, a LoRA's updates) projects its own cells with them while the swap is on; the UNet's
weights are never touched (a customized baseline's whole rows are weights.py's work).

The paper's knobs act on the swapped cells only: keys only or values only (the other keeps the
row's own projection), and a strength that moves them part of the way from the row's own
projection (0: exactly the row without a swap; 1: exactly the swap).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class RowWrite:
    """Replace the conditioning of batch rows `batch` at `positions` by the rows of `hidden`
    (projected with a concept's key/value weights where given, else with each layer's own)."""

    batch: tuple[int, ...]  # batch indices (either CFG half)
    positions: tuple[int, ...]  # token positions
    hidden: torch.Tensor  # (tokens, dim) encoder states the rows come from
    edits: dict | None = None  # {layer: (key edit, value edit)}, an edit None for the layer's own weights


@dataclass(frozen=True)
class CustomCells:
    """(batch, token) cells projected with a concept's own key/value weights."""

    batch: torch.Tensor  # (n,) long
    token: torch.Tensor  # (n,) long
    edits: dict  # {layer: (key edit | None, value edit | None)}


@dataclass
class RequestKV:
    """What a request's cross-attention layers project: its conditioning, the swapped copy, the
    cells a concept projects with its own weights, and how strongly the swap acts on keys and values."""

    context: torch.Tensor  # (batch, tokens, dim): the conditioning the UNet is called with
    swapped: torch.Tensor | None = None  # the same with the swap rows written; None: no swap
    custom: list[CustomCells] = field(default_factory=list)
    cells: tuple[torch.Tensor, torch.Tensor] | None = None  # (batch, token) of every swapped cell
    strength: tuple[float, float] = (1.0, 1.0)  # (keys, values): 0 = the row's own, 1 = the swap


def _cells(batch: tuple[int, ...], positions: tuple[int, ...], device) -> tuple[torch.Tensor, torch.Tensor]:
    b = torch.tensor(batch, device=device).repeat_interleave(len(positions))
    t = torch.tensor(positions, device=device).repeat(len(batch))
    return b, t


@torch.no_grad()
def request_kv(context: torch.Tensor, swaps: list[RowWrite], strength: tuple[float, float] = (1.0, 1.0)) -> RequestKV:
    """`swaps`: rows written while the swap is on; later writes win."""
    plan = RequestKV(context, strength=strength)
    if swaps:
        plan.swapped = context.clone()
        every = [], []
        for w in swaps:
            b, t = _cells(w.batch, w.positions, context.device)
            plan.swapped[b, t] = w.hidden.to(context.dtype)[t]
            every[0].append(b)
            every[1].append(t)
            if w.edits:
                plan.custom.append(CustomCells(b, t, w.edits))
        plan.cells = torch.cat(every[0]), torch.cat(every[1])
    return plan


def project(attn, layer: str, x: torch.Tensor, custom: list[CustomCells]):
    """One layer's (keys, values) of the conditioning `x`, a concept's own cells included."""
    if attn.norm_cross:
        x = attn.norm_encoder_hidden_states(x)
    key, value = attn.to_k(x), attn.to_v(x)  # (batch, tokens, inner)
    for c in custom:
        if layer in c.edits:
            edit_k, edit_v = c.edits[layer]
            rows = x[c.batch, c.token]
            if edit_k is not None:
                key[c.batch, c.token] = edit_k(attn.to_k, rows).to(key.dtype)
            if edit_v is not None:
                value[c.batch, c.token] = edit_v(attn.to_v, rows).to(value.dtype)
    return key, value


def blend(own: torch.Tensor, swapped: torch.Tensor, cells: tuple[torch.Tensor, torch.Tensor],
          strength: float) -> torch.Tensor:
    """The swapped cells moved `strength` of the way from the row's own projection `own`;
    0 and 1 return `own` and `swapped` themselves, bit for bit."""
    if strength == 1:
        return swapped
    if strength == 0:
        return own
    out = own.clone()
    b, t = cells
    out[b, t] = torch.lerp(own[b, t], swapped[b, t], strength)
    return out
