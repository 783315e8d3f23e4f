"""The keys and values of a request's cross-attention layers, projected once per request.

Text conditioning does not change across timesteps, so each cross-attention layer projects a
request's conditioning once and reuses its keys and values at every step. A swap writes the dummy
prompt's encoder rows `enc'(p')` into a copy of the conditioning at the swapped (row, position)
cells; each layer's own projection of that copy gives `K' = W_k · enc'(p')` there, in the same
matmul as every other row. Custom Diffusion's `W_k/W_v` are concept tensors (the UNet's weights
are never touched), applied to the cells that ask for them: the customized baseline's whole rows
at every step, AlignIT's swapped cells while the swap is on.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RowWrite:
    """Replace the conditioning of batch rows `batch` at `positions` by the rows of `hidden`
    (projected with Custom Diffusion's `kv` where given, else with each layer's own weights)."""

    batch: tuple[int, ...]  # batch indices (either CFG half)
    positions: tuple[int, ...]  # token positions
    hidden: torch.Tensor  # (tokens, dim) encoder states the rows come from
    kv: dict | None = None  # Custom Diffusion {layer: (W_k, W_v)}; None: the layer's own weights


@dataclass(frozen=True)
class CustomCells:
    """(batch, token) cells whose keys/values come from Custom Diffusion's W_k/W_v."""

    batch: torch.Tensor  # (n,) long
    token: torch.Tensor  # (n,) long
    kv: dict  # {layer: (W_k, W_v)}
    swap: bool  # True: only while the swap is on (AlignIT's cells); False: every step


@dataclass
class RequestKV:
    """What a request's cross-attention layers project: its conditioning, the swapped copy, and
    the Custom Diffusion cells."""

    context: torch.Tensor  # (batch, tokens, dim): the conditioning the UNet is called with
    swapped: torch.Tensor | None = None  # the same with the swap rows written; None: no swap
    custom: list[CustomCells] = field(default_factory=list)


def _cells(batch: tuple[int, ...], positions: tuple[int, ...], device) -> tuple[torch.Tensor, torch.Tensor]:
    b = torch.tensor(batch, device=device).repeat_interleave(len(positions))
    t = torch.tensor(positions, device=device).repeat(len(batch))
    return b, t


@torch.no_grad()
def request_kv(context: torch.Tensor, custom_rows: list[tuple[tuple[int, ...], dict]],
               swaps: list[RowWrite]) -> RequestKV:
    """`custom_rows`: (batch rows, Custom Diffusion kv) projected whole at every step; `swaps`: rows
    written while the swap is on; later writes win."""
    plan = RequestKV(context)
    everything = tuple(range(context.shape[1]))
    for batch, kv in custom_rows:
        plan.custom.append(CustomCells(*_cells(batch, everything, context.device), kv, swap=False))
    if swaps:
        plan.swapped = context.clone()
        for w in swaps:
            b, t = _cells(w.batch, w.positions, context.device)
            plan.swapped[b, t] = w.hidden.to(context.dtype)[t]
            if w.kv:
                plan.custom.append(CustomCells(b, t, w.kv, swap=True))
    return plan


def project(attn, layer: str, x: torch.Tensor, custom: list[CustomCells], swapping: bool):
    """One layer's (keys, values) of the conditioning `x`, Custom Diffusion cells included."""
    if attn.norm_cross:
        x = attn.norm_encoder_hidden_states(x)
    key, value = attn.to_k(x), attn.to_v(x)  # (batch, tokens, inner)
    for c in custom:
        if layer in c.kv and (swapping or not c.swap):
            wk, wv = c.kv[layer]
            rows = x[c.batch, c.token]
            key[c.batch, c.token] = F.linear(rows, wk, attn.to_k.bias)
            value[c.batch, c.token] = F.linear(rows, wv, attn.to_v.bias)
    return key, value
