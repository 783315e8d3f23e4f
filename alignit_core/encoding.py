"""The text stack: token ids, with optional concept vectors at some positions, -> hidden states.

transformers' CLIP text models take only `input_ids`, but a textual-inversion or Custom Diffusion
token is a vector that is not in the vocabulary. Rather than growing the tokenizer and the
embedding table (a mutation every request would share), this runs the encoder from token
embeddings, with the concept's vectors written in at their positions. Without overrides the
result is bit-identical to `text_encoder(input_ids)` (tested).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.masking_utils import create_causal_mask

from .errors import PromptError


@dataclass
class Encoded:
    """Hidden states of one batch of prompts."""

    hidden: torch.Tensor  # (batch, tokens, dim): last layer after final norm, or penultimate layer
    pooled: torch.Tensor  # (batch, dim): final-normed state at each prompt's end token


def _text_model(text_encoder):
    # CLIPTextModelWithProjection wraps a CLIPTextModel; CLIPTextModel is the model itself.
    return getattr(text_encoder, "text_model", text_encoder)


def token_embeddings(text_encoder) -> torch.nn.Embedding:
    return _text_model(text_encoder).embeddings.token_embedding


def encode(text_encoder, input_ids: torch.Tensor, vectors: torch.Tensor | None = None,
           vector_mask: torch.Tensor | None = None, penultimate: bool = False) -> Encoded:
    """Encode `input_ids` (batch, tokens); where `vector_mask` (batch, tokens) is True the token
    embedding is replaced by `vectors` (batch, tokens, dim). `penultimate` returns the
    second-to-last layer's states un-normed, as SDXL conditions on them."""
    tm = _text_model(text_encoder)
    embeds = tm.embeddings.token_embedding(input_ids)
    if vector_mask is not None:
        embeds = torch.where(vector_mask.unsqueeze(-1), vectors.to(embeds.dtype), embeds)
    h = tm.embeddings(inputs_embeds=embeds)
    mask = create_causal_mask(config=tm.config, inputs_embeds=h, attention_mask=None,
                              past_key_values=None)
    before_last = h
    for layer in tm.encoder.layers:
        before_last = h
        h = layer(h, mask, is_causal=True)
    last = tm.final_layer_norm(h)
    if tm.config.eos_token_id == 2:  # legacy configs (SD 1.x): the end token has the highest id
        eos = input_ids.argmax(dim=-1)
    else:
        eos = (input_ids == tm.config.eos_token_id).int().argmax(dim=-1)
    pooled = last[torch.arange(last.shape[0], device=last.device), eos]
    return Encoded(before_last if penultimate else last, pooled)


def concept_vectors(ids: torch.Tensor, prompts: list, concept, encoder: int):
    """(vectors (batch, tokens, dim), mask (batch, tokens)) writing `concept`'s vectors for text
    encoder `encoder` at the positions each prompt (a prompts.Prompt) holds them; (None, None)
    when no prompt holds any. Raises PromptError when a prompt holds vectors and no concept is given."""
    if not any(p.vectors for p in prompts):
        return None, None
    if concept is None or not concept.vectors:
        raise PromptError("the prompt holds concept vectors but no concept was given")
    vec = concept.vectors[encoder]
    vectors = torch.zeros(*ids.shape, vec.shape[1], device=ids.device, dtype=vec.dtype)
    mask = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    for j, p in enumerate(prompts):
        for pos, k in p.vectors.items():
            vectors[j, pos] = vec[k]
            mask[j, pos] = True
    return vectors, mask
