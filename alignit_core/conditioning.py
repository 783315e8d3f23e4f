"""Text conditioning of a request: every row's prompt and every swap's p' encoded (each distinct
one once, one batch per text stack), the unconditional half, long prompts padded to one length,
and what the attention layers need for the whole batch (its conditioning, the K/V writes, the
map store) and the denoiser's view with each customized row's own weights.

    cond = condition(model, rows, resolved_settings)
    cond.hidden  # (2 * rows, tokens, dim): the unconditional half, then the conditional one

What differs between model families (which encoders, pooled embeddings, added conditions) is the
family's (families/); this module is the same for all.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import CallState, MapStore
from .concepts import Concept
from .kv import RowWrite, request_kv
from .prompts import Prompt, SwapPlan
from .settings import Settings
from .weights import LowRank, overlay


@dataclass
class Row:
    """One image of the batch."""

    name: str
    prompt: Prompt  # the tokens the row generates from
    concept: Concept | None = None  # customization applied to this whole row (the baseline)
    swap: SwapPlan | None = None  # rows of `prompt` replaced by rows of swap.source
    swap_concept: Concept | None = None  # the customized stack that encodes/projects swap.source
    more_swaps: tuple[tuple[SwapPlan, Concept | None], ...] = ()  # further concepts, each from its own model

    @property
    def sources(self) -> list[tuple[SwapPlan, Concept | None]]:
        """Every (plan, concept) whose p' rows this row takes."""
        return ([(self.swap, self.swap_concept)] if self.swap is not None else []) + list(self.more_swaps)

    @property
    def swapped(self) -> tuple[int, ...]:
        return tuple(sorted({pos for plan, _ in self.sources for pos in plan.positions}))


@torch.no_grad()
def encode_prompts(model, prompts: list[Prompt], concept: Concept | None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(encoder states (tokens, dim), pooled embedding or None) of each prompt through `concept`'s
    text stack (the model's own for None), all segments as one batch per text encoder. A segmented
    prompt gives each segment's start and content rows, in order (no padding); its pooled
    embedding is the first segment's."""
    simple = [part for p in prompts for part in (p.parts or (p,))]
    hidden, pooled = model.family.encode(simple, concept)  # (segments, tokens, dim), per segment
    results, j = [], 0
    for p in prompts:
        if p.parts:
            results.append((torch.cat([hidden[j + k, : len(part.ids) - 1] for k, part in enumerate(p.parts)]),
                            pooled[j]))
            j += len(p.parts)
        else:
            results.append((hidden[j], pooled[j]))
            j += 1
    return results


def encode_prompt(model, prompt: Prompt, concept: Concept | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`encode_prompts` of one prompt."""
    return encode_prompts(model, [prompt], concept)[0]


def empty_prompt(model, concept: Concept | None = None):
    """(hidden, pooled, padding vector) of the unconditional branch through `concept`'s text stack;
    the family encodes it once per stack and keeps it."""
    return model.family.empty(concept)


def pad_segmented(model, hidden: list[torch.Tensor], pads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Encodings of one request to one length when a prompt is segmented: the next multiple of the
    tokenizer's length (77) above the longest, filled with each one's padding vector."""
    width = model.tokenizer.model_max_length
    length = width * -(-max(h.shape[0] for h in hidden) // width)
    return [torch.cat([h, pad.to(h.dtype).expand(length - h.shape[0], -1)]) for h, pad in zip(hidden, pads)]


def _encoding_key(prompt: Prompt, concept: Concept | None):
    return prompt.ids, tuple(sorted(prompt.vectors.items())), id(concept) if concept else None


def encode_all(model, needed: list[tuple[Prompt, Concept | None]]) -> dict:
    """Encode each distinct (prompt, concept) once, one batch per text stack: prompts without
    concept vectors join any batch of their stack."""
    groups: dict = {}  # (stack, vector concept or None) -> [concept, {key: prompt}]
    seen = set()
    for prompt, concept in sorted(needed, key=lambda pc: not pc[0].vectors):  # concept vectors first
        key = _encoding_key(prompt, concept)
        if key in seen:
            continue
        seen.add(key)
        stack = tuple(map(id, model.family.stack(concept)))
        if prompt.vectors:
            group = groups.setdefault((stack, id(concept)), [concept, {}])
        else:
            group = next((g for (s, _), g in groups.items() if s == stack), None) or \
                groups.setdefault((stack, None), [concept, {}])
        group[1][key] = prompt
    out = {}
    for concept, prompts in groups.values():
        out.update(zip(prompts, encode_prompts(model, list(prompts.values()), concept)))
    return out


@dataclass
class Conditioning:
    """Everything a request's denoising loop passes to the denoiser besides the latents."""

    hidden: torch.Tensor  # (2r, tokens, dim): unconditional rows, then conditional rows
    added: dict | None  # the family's added conditions (SDXL: pooled text, size), or None
    state: CallState  # what the attention layers do for this request
    denoiser: torch.nn.Module  # the request's view of the denoiser (customized rows' own weights)


@torch.no_grad()
def condition(model, rows: list[Row], settings: Settings, on_kv=None) -> Conditioning:
    """Everything a request does before its first denoising step, for resolved `settings`: the
    text encodings, the batch's conditioning, the family's added conditions, the attention
    layers' CallState and the request's view of the denoiser (a customized row's own weights on
    its rows). `on_kv(layer, step, key, value)`, if given, sees every layer's keys and values."""
    r = len(rows)
    needed = [(row.prompt, row.concept) for row in rows] + [(plan.source, concept) for row in rows
                                                             for plan, concept in row.sources]
    encoded = encode_all(model, needed)

    def enc(prompt, concept):
        return encoded[_encoding_key(prompt, concept)]

    conds = [enc(row.prompt, row.concept) for row in rows]
    # the empty prompt, once per text stack (rows mostly share the model's own)
    stacks = [row.concept if row.concept and row.concept.text_encoders else None for row in rows]
    by_stack = {id(s): empty_prompt(model, s) for s in {id(s): s for s in stacks}.values()}
    unconds = [by_stack[id(s)] for s in stacks]
    hidden = [u[0] for u in unconds] + [c[0] for c in conds]
    if any(row.prompt.parts for row in rows):  # segmented: every row and both halves to one length
        hidden = pad_segmented(model, hidden, [u[2] for u in unconds] * 2)
    hidden = torch.stack(hidden)  # (2r, tokens, dim)
    edits: dict[str, list] = {}
    swaps = []
    for i, row in enumerate(rows):
        both = torch.tensor([i, r + i], device=model.device)
        if row.concept is not None:  # a customized baseline: its own weights on its rows, every step
            for name, edit in row.concept.unet.items():
                edits.setdefault(name, []).append((both, edit))
        for name, edit in _lora_rest(row, settings.lora_rest):
            edits.setdefault(name, []).append((both, edit))
        for plan, concept in row.sources:
            src, _ = enc(plan.source, concept)
            edits_kv = concept.key_value_edits if concept is not None and concept.key_value_edits else None
            batch = (r + i, i) if settings.swap_uncond else (r + i,)
            swaps.append(RowWrite(batch, plan.positions, src, edits_kv))
    steps, strength = settings.steps, settings.swap_strength
    state = CallState(request=request_kv(hidden, swaps, (strength if "k" in settings.swap_kv else 0.0,
                                                    strength if "v" in settings.swap_kv else 0.0)),
                      swap_steps=(round(settings.swap_start * steps), round(settings.swap_end * steps)),
                      on_kv=on_kv)
    if settings.record_maps:
        n_tok = max(len(row.prompt.ids) for row in rows)
        state.maps = MapStore.create(range(r, 2 * r), settings.map_resolution, n_tok, model.device,
                                     model.family.maps.layers(settings.map_resolution, settings.size, settings.map_blocks),
                                     (round(settings.map_start * steps), round(settings.map_end * steps)))
    added = model.family.added_conditions([u[1] for u in unconds] + [c[1] for c in conds], settings.size,
                                          hidden.dtype)
    return Conditioning(hidden, added, state, overlay(model.unet, edits))


def _lora_rest(row: Row, rest: float) -> list[tuple[str, LowRank]]:
    """AlignIT on a LoRA: the LoRA's updates beyond the concept's cross-attention keys and values
    (self-attention, queries, outputs, feed-forward, convolutions), scaled by `rest`, on the whole row."""
    if rest == 0:
        return []
    out = []
    for _, concept in row.sources:
        if concept is not None and concept.kind == "lora":
            keys_values = {f"{layer}.to_{x}" for layer in concept.key_value_edits for x in "kv"}
            out += [(name, edit.scaled(rest)) for name, edit in concept.unet.items() if name not in keys_values]
    return out


