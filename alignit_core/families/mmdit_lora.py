"""A LoRA concept on SD3 / Flux: the customized text branch that AlignIT's side stream runs p' through.

On a UNet the concept's keys and values are one projection of the text; on an MMDiT every block
updates the text tokens, so the customized text branch is every layer that computes them: the text
embedder (`context_embedder`), and in each joint block the text's modulation (`norm1_context`), its
query/key/value projections (`attn.add_q_proj`, `add_k_proj`, `add_v_proj`), its output projection
(`attn.to_add_out`) and feed-forward (`ff_context`); in Flux's single-stream blocks, whose weights
text and image tokens share, all of them (the side stream applies them to its text rows only). The
image branch's updates (`attn.to_q/k/v`, `to_out`, `ff`, `norm1`, SD3.5's `attn2`) and those of the
time, pooled-text and latent embedders act in the customized row alone.

The branch is a view (weights.overlay): the LoRA's updates computed beside the shared weights,
W·x + scale·B(A·x), on every row the side stream runs. Nothing is merged into or copied from the
model: on Flux-dev the single blocks alone hold 5 billion weights, a merged copy of a LoRA over them
would double that, while the updates cost rank × width each.
"""
from __future__ import annotations

import re

from ..weights import Edit, overlay

TEXT_BRANCH = re.compile(r"context_embedder|transformer_blocks\.\d+\.(attn\.(add_[qkv]_proj|to_add_out)|"
                         r"(ff_context|norm1_context)\..+)|single_transformer_blocks\.\d+\..+")


def text_branch(edits: dict[str, Edit]) -> dict[str, Edit]:
    """The updates among `edits` (transformer layer -> its update) that the text tokens go through."""
    return {name: edit for name, edit in edits.items() if TEXT_BRANCH.fullmatch(name)}


def text_branch_view(transformer, edits: dict[str, Edit]):
    """`transformer` whose text-branch layers carry their `edits` on every row (the side stream's
    customized branch); the transformer itself is unchanged."""
    return overlay(transformer, {name: [(None, edit)] for name, edit in text_branch(edits).items()})
