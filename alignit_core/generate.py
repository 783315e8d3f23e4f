"""Baseline, AlignIT and base rows as ONE batched denoising call.

    gen = generate_concept(model, "a <striped-ball> on a green background", concept, Settings(seed=3))
    gen.images["customized"], gen.images["alignit"], gen.maps["alignit"]  # (tokens, 16, 16)

Each row of the batch has its own text conditioning and its own K/V writes; all rows start from
the seed's one initial latent. The loop is written out here (not `pipe(...)`) because a diffusers
pipeline object and its scheduler keep per-call state, and a demo serves several people at once.
"""
from __future__ import annotations

import json
import math
import weakref
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from PIL import Image

from . import __version__
from .attention import CallState, MapStore
from .concepts import Concept, one_model
from .encoding import encode
from .errors import ConceptError, ModelError, PromptError, SettingsError
from .kv import RowWrite, request_kv
from .models import MAP_BLOCKS
from .prompts import (LONG_MODES, Prompt, SwapPlan, check_positions, concept_plan, max_tokens, padded,
                      positions_plan, several_concepts_plan, tokenize, word_swap_plan)
from .weights import LowRank, overlay

SCHEDULERS = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
              "dpm++": "DPMSolverMultistepScheduler"}
MAX_STEPS = 150
MAX_GUIDANCE = 30.0
MAX_SEED = 2**32 - 1
# Segment mode reads at most 308 positions, about 1,200 characters of English; a prompt past this
# is refused before it is tokenized, in every long-prompt mode (truncate would read 75 tokens of it).
MAX_PROMPT_CHARS = 4000
SWAP_KV = ("kv", "k", "v")  # swap keys and values, keys only, values only
# What each row of a generation is called wherever people see it (the demo's columns, the grid)
CAPTIONS = {"customized": "customized baseline", "alignit": "AlignIT", "base": "base model on p",
            "baseline": "baseline", "swapped": "swapped"}


@dataclass(frozen=True)
class Settings:
    """How to sample. None means the model's default."""

    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    size: int | None = None
    scheduler: str | None = None
    swap_uncond: bool = False  # also write K'/V' into the unconditional CFG half
    swap_start: float = 0.0  # fraction of the steps in which the swap is applied
    swap_end: float = 1.0
    map_resolution: int | None = None
    record_maps: bool = True
    map_start: float = 0.0  # fraction of the steps from which attention maps are recorded
    map_end: float = 1.0  # ... until which
    map_blocks: tuple[str, ...] = MAP_BLOCKS  # the UNet's parts whose layers (at map_resolution) record
    long_prompt: str = "segments"  # over 75 tokens: segments (LongAlign) | truncate | refuse
    swap_kv: str = "kv"  # which swapped rows: keys and values | k (keys only) | v (values only)
    swap_strength: float = 1.0  # 0: the row's own keys/values (no swap) .. 1: the swapped ones
    lora_rest: float = 0.0  # AlignIT on a LoRA: how much of the LoRA beyond the concept's keys/values (0: none)


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


@dataclass
class Generation:
    """What one request produced, and everything needed to reproduce it."""

    images: dict[str, Image.Image]
    maps: dict[str, np.ndarray]  # row -> (tokens, side, side) attention probabilities, mean over layers, steps, heads
    tokens: dict[str, tuple]  # row -> its Token table
    swapped: dict[str, tuple[int, ...]]  # row -> swapped positions
    settings: dict = field(default_factory=dict)
    map_store_bytes: int = 0  # size of the running attention sums (constant in the number of steps)
    latents: dict[str, torch.Tensor] = field(default_factory=dict)  # row -> final latent z0 (C, h, w), CPU
    warnings: list[str] = field(default_factory=list)  # e.g. tokens dropped by truncation

    @property
    def rows(self) -> list[str]:
        return list(self.images)

    def settings_json(self) -> str:
        return json.dumps(self.settings, indent=2, ensure_ascii=False)


def scheduler_names() -> list[str]:
    return list(SCHEDULERS)


def resolve(model, s: Settings) -> Settings:
    """Fill defaults from the model and validate. Raises SettingsError."""
    embedded = model.is_embedded
    steps = 20 if s.steps is None and embedded else (30 if s.steps is None else s.steps)
    guidance = (10.0 if embedded else 7.5) if s.guidance is None else s.guidance  # README: measured best
    size = model.native_size if s.size is None else s.size
    if isinstance(s.seed, bool) or not isinstance(s.seed, int) or not 0 <= s.seed <= MAX_SEED:
        raise SettingsError(f"seed must be a whole number from 0 to {MAX_SEED}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise SettingsError(f"steps must be a whole number from 1 to {MAX_STEPS}")
    if not isinstance(guidance, (int, float)) or not math.isfinite(guidance) or not 0 <= guidance <= MAX_GUIDANCE:
        raise SettingsError(f"guidance must be a finite number from 0 to {MAX_GUIDANCE:g}")
    cap = 2 * model.native_size
    if isinstance(size, bool) or not isinstance(size, int) or size % 8 or not 64 <= size <= cap:
        raise SettingsError(f"size must be a multiple of 8 from 64 to {cap} pixels")
    if size % model.size_step:
        raise SettingsError(f"size must be a multiple of {model.size_step} for this model")
    scheduler = s.scheduler or next((k for k, v in SCHEDULERS.items() if v == model.scheduler_name), "ddim")
    if scheduler not in SCHEDULERS:
        raise SettingsError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if not (0 <= s.swap_start < s.swap_end <= 1):
        raise SettingsError("the swap step range must satisfy 0 <= start < end <= 1")
    res = s.map_resolution or model.default_map_resolution(size)
    if res not in model.attention_resolutions(size):
        raise SettingsError(f"no cross-attention layer works at {res}x{res}; "
                            f"available: {', '.join(map(str, model.attention_resolutions(size)))}")
    blocks = tuple(b for b in MAP_BLOCKS if b in (s.map_blocks or ()))
    if isinstance(s.map_blocks, str) or not blocks or len(blocks) != len(s.map_blocks):
        raise SettingsError(f"heat-map layers must be some of {', '.join(MAP_BLOCKS)}, got {s.map_blocks!r}")
    if s.record_maps and not model.map_layers(res, size, blocks):
        there = sorted({b for b in MAP_BLOCKS if model.map_layers(res, size, (b,))}, key=MAP_BLOCKS.index)
        raise SettingsError(f"no cross-attention layer of the {' or '.join(blocks)} block(s) works at {res}x{res}; "
                            f"at that resolution choose {', '.join(there)}")
    if not (0 <= s.map_start < s.map_end <= 1):
        raise SettingsError("the heat-map step range must satisfy 0 <= start < end <= 1")
    if round(s.map_start * steps) == round(s.map_end * steps):
        raise SettingsError(f"the heat-map step range {s.map_start:g}..{s.map_end:g} holds none of the {steps} steps; "
                            f"widen it")
    if s.long_prompt not in LONG_MODES:
        raise SettingsError(f"unknown long-prompt mode {s.long_prompt!r}; choose one of {', '.join(LONG_MODES)}")
    if s.swap_kv not in SWAP_KV:
        raise SettingsError(f"swap {s.swap_kv!r} is not one of {', '.join(SWAP_KV)} (keys and values, keys only, "
                            f"values only)")
    if isinstance(s.swap_strength, bool) or not isinstance(s.swap_strength, (int, float)) \
            or not 0 <= s.swap_strength <= 1:
        raise SettingsError("the swap strength must be a number from 0 (no swap) to 1 (the full swap)")
    if isinstance(s.lora_rest, bool) or not isinstance(s.lora_rest, (int, float)) or not 0 <= s.lora_rest <= 1:
        raise SettingsError("the rest of the LoRA must be a number from 0 (the paper's AlignIT) to 1 (all of the "
                            "LoRA but the other tokens' keys and values)")
    return replace(s, steps=steps, guidance=float(guidance), size=size, scheduler=scheduler, map_resolution=res,
                   swap_strength=float(s.swap_strength), lora_rest=float(s.lora_rest), map_blocks=blocks)


# ------------------------------------------------------------------------------ text conditioning

def _stack(model, concept: Concept | None):
    """The text encoders a row's prompt goes through: a fine-tune's own copies, else the model's."""
    return list(concept.text_encoders) if concept is not None and concept.text_encoders else model.text_encoders


@torch.no_grad()
def encode_prompts(model, prompts: list[Prompt], concept: Concept | None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """`encode_prompt` of several prompts through one text stack, as one batch per text encoder
    (a segmented prompt's segments are rows of the same batch). `concept` gives the stack and
    the vectors of prompts that hold concept tokens."""
    simple = [part for p in prompts for part in (p.parts or (p,))]
    hidden, pooled = [], None
    for i, (tok, te) in enumerate(zip(model.tokenizers, _stack(model, concept))):
        ids = torch.tensor([padded(p, tok) for p in simple], device=model.device)
        vectors = mask = None
        if any(p.vectors for p in simple):
            if concept is None or not concept.vectors:
                raise PromptError("the prompt holds concept vectors but no concept was given")
            vec = concept.vectors[i]
            vectors = torch.zeros(*ids.shape, vec.shape[1], device=model.device, dtype=vec.dtype)
            mask = torch.zeros(ids.shape, dtype=torch.bool, device=model.device)
            for j, p in enumerate(simple):
                for pos, k in p.vectors.items():
                    vectors[j, pos] = vec[k]
                    mask[j, pos] = True
        out = encode(te, ids, vectors, mask, penultimate=model.is_xl)
        hidden.append(out.hidden)
        if model.is_xl and i == 1:
            pooled, projection = out.pooled, te.text_projection
    hidden = torch.cat(hidden, dim=-1)  # (segments, tokens, dim)
    results, j = [], 0
    for p in prompts:
        # SDXL's pooled embedding, projected one prompt at a time (a batched matmul rounds differently)
        first = projection(pooled[j: j + 1])[0] if pooled is not None else None
        if p.parts:  # each segment's start + content rows, in order (no padding); pooled: the first's
            results.append((torch.cat([hidden[j + k, : len(part.ids) - 1] for k, part in enumerate(p.parts)]), first))
            j += len(p.parts)
        else:
            results.append((hidden[j], first))
            j += 1
    return results


def encode_prompt(model, prompt: Prompt, concept: Concept | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(tokens, dim) encoder states and, for SDXL, the pooled (dim,) embedding of one prompt.
    A segmented prompt gives each segment's start and content rows, in order (no padding); its
    pooled embedding is the first segment's."""
    return encode_prompts(model, [prompt], concept)[0]


def _uncond(model, concept: Concept | None):
    """(hidden, pooled) of the unconditional branch."""
    return _uncond_and_pad(model, concept)[:2]


def _uncond_and_pad(model, concept: Concept | None):
    """(hidden, pooled) of the unconditional branch, and the shared padding vector of long prompts:
    the mean of the empty prompt's padding states. Encoded once per text stack, device and dtype,
    then kept on the model (the encoders are read-only after loading)."""
    stack = _stack(model, concept)
    first = next(stack[0].parameters())
    key = (tuple(map(id, stack)), first.device, first.dtype)
    kept = model.empty_encodings.get(key)
    if kept is not None and kept[0]() is stack[0]:  # the same encoder, not a new one at a reused id
        return kept[1]
    empty = tokenize(model.tokenizer, "")
    hidden, pooled = encode_prompt(model, empty, concept)
    pad = hidden[len(empty.ids):].mean(0)
    if model.is_xl and model.force_zeros_for_empty_prompt:
        hidden, pooled = torch.zeros_like(hidden), torch.zeros_like(pooled)
    for k in [k for k, v in model.empty_encodings.items() if v[0]() is None]:  # encoders gone with their concept
        del model.empty_encodings[k]
    model.empty_encodings[key] = (weakref.ref(stack[0]), (hidden, pooled, pad))
    return hidden, pooled, pad


def pad_segmented(model, hidden: list[torch.Tensor], pads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Encodings of one request to one length when a prompt is segmented: the next multiple of the
    tokenizer's length (77) above the longest, filled with each one's padding vector."""
    width = model.tokenizer.model_max_length
    length = width * -(-max(h.shape[0] for h in hidden) // width)
    return [torch.cat([h, pad.to(h.dtype).expand(length - h.shape[0], -1)]) for h, pad in zip(hidden, pads)]


# ------------------------------------------------------------------------------ the batched call

def _scheduler(model, name: str):
    import diffusers

    return getattr(diffusers, SCHEDULERS[name]).from_config(model.scheduler_config)


def run_rows(model, rows: list[Row], settings: Settings, progress=None, on_kv=None):
    """Denoise all rows in one batch. Returns (PIL images, {row: (tokens, side, side) maps},
    bytes held by the map store, final latents (rows, C, h, w) on the CPU). A run that fails
    (an exception in a callback, out of memory) hands its GPU memory back before raising, so the
    model serves the next request; running out of GPU memory raises ModelError."""
    try:
        return _denoise(model, rows, settings, progress, on_kv)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        raise ModelError("out of GPU memory; try a smaller size or fewer steps") from None
    except BaseException:
        torch.cuda.empty_cache()  # a no-op unless CUDA is in use
        raise


def _encoding_key(prompt: Prompt, concept: Concept | None):
    return prompt.ids, tuple(sorted(prompt.vectors.items())), id(concept) if concept else None


def _encode_all(model, needed: list[tuple[Prompt, Concept | None]]) -> dict:
    """Encode each distinct (prompt, concept) once, one batch per text stack: prompts without
    concept vectors join any batch of their stack."""
    groups: dict = {}  # (stack, vector concept or None) -> [concept, {key: prompt}]
    seen = set()
    for prompt, concept in sorted(needed, key=lambda pc: not pc[0].vectors):  # concept vectors first
        key = _encoding_key(prompt, concept)
        if key in seen:
            continue
        seen.add(key)
        stack = tuple(map(id, _stack(model, concept)))
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


@torch.no_grad()
def _condition(model, rows: list[Row], settings: Settings, on_kv=None):
    """Everything a request does before its first UNet step: the text encodings, the batch's
    conditioning (2r, tokens, dim), SDXL's added conditions, the attention layers' CallState and
    the request's view of the UNet (a customized row's own weights on its rows)."""
    r = len(rows)
    needed = [(row.prompt, row.concept) for row in rows] + [(plan.source, concept) for row in rows
                                                             for plan, concept in row.sources]
    encoded = _encode_all(model, needed)

    def enc(prompt, concept):
        return encoded[_encoding_key(prompt, concept)]

    conds = [enc(row.prompt, row.concept) for row in rows]
    # the empty prompt, once per text stack (rows mostly share the model's own)
    stacks = [row.concept if row.concept and row.concept.text_encoders else None for row in rows]
    by_stack = {id(s): _uncond_and_pad(model, s) for s in {id(s): s for s in stacks}.values()}
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
            kv = concept.kv if concept is not None and concept.kv else None
            batch = (r + i, i) if settings.swap_uncond else (r + i,)
            swaps.append(RowWrite(batch, plan.positions, src, kv))
    steps, strength = settings.steps, settings.swap_strength
    state = CallState(kv=request_kv(hidden, swaps, (strength if "k" in settings.swap_kv else 0.0,
                                                    strength if "v" in settings.swap_kv else 0.0)),
                      swap_steps=(round(settings.swap_start * steps), round(settings.swap_end * steps)),
                      on_kv=on_kv)
    if settings.record_maps:
        n_tok = max(len(row.prompt.ids) for row in rows)
        state.maps = MapStore.create(range(r, 2 * r), settings.map_resolution, n_tok, model.device,
                                     model.map_layers(settings.map_resolution, settings.size, settings.map_blocks),
                                     (round(settings.map_start * steps), round(settings.map_end * steps)))
    added = None
    if model.is_xl:
        pooled = torch.stack([u[1] for u in unconds] + [c[1] for c in conds])
        size = settings.size
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=model.device, dtype=hidden.dtype)
        added = {"text_embeds": pooled, "time_ids": time_ids.repeat(2 * r, 1)}
    return hidden, added, state, overlay(model.unet, edits)


def _lora_rest(row: Row, rest: float) -> list[tuple[str, LowRank]]:
    """AlignIT on a LoRA: the LoRA's updates beyond the concept's cross-attention keys and values
    (self-attention, queries, outputs, feed-forward, convolutions), scaled by `rest`, on the whole row."""
    if rest == 0:
        return []
    out = []
    for _, concept in row.sources:
        if concept is not None and concept.kind == "lora":
            keys_values = {f"{layer}.to_{x}" for layer in concept.kv for x in "kv"}
            out += [(name, edit.scaled(rest)) for name, edit in concept.unet.items() if name not in keys_values]
    return out


@torch.no_grad()
def _denoise(model, rows: list[Row], settings: Settings, progress=None, on_kv=None):
    r, steps = len(rows), settings.steps
    hidden, added, state, unet = _condition(model, rows, settings, on_kv)
    sched = _scheduler(model, settings.scheduler)
    sched.set_timesteps(steps, device=model.device)
    side = settings.size // model.vae_scale
    g = torch.Generator("cpu").manual_seed(settings.seed)
    latent = torch.randn((1, model.unet.config.in_channels, side, side), generator=g)
    latents = latent.to(model.device, model.dtype).repeat(r, 1, 1, 1) * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        state.step = i
        x = sched.scale_model_input(torch.cat([latents, latents]), t)
        eps = unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added,
                         cross_attention_kwargs={"alignit": state}).sample
        uncond, cond = eps.chunk(2)
        latents = sched.step(uncond + settings.guidance * (cond - uncond), t, latents).prev_sample
        if progress is not None:
            progress(i + 1, steps)
    images = _decode(model, latents)
    maps = {}
    if state.maps is not None:
        all_maps = state.maps.maps().cpu().numpy()  # (r, tokens, side, side)
        for k, row in enumerate(rows):
            maps[row.name] = all_maps[k, : len(row.prompt.ids)].astype(np.float32)
    store_bytes = state.maps.total.nbytes if state.maps is not None else 0
    return images, maps, store_bytes, latents.float().cpu()


def _decode(model, latents) -> list[Image.Image]:
    vae = model.vae
    z = latents.to(vae.dtype) / vae.config.scaling_factor
    x = vae.decode(z).sample.float()
    x = ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in x]


# ------------------------------------------------------------------------------ the two modes

def _versions() -> dict:
    import diffusers
    import transformers

    return {"alignit": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def _table(prompt: Prompt) -> list[dict]:
    return [asdict(t) for t in prompt.tokens]


def _finish(model, rows, settings, result, warnings, extra) -> Generation:
    images, maps, store_bytes, latents = result
    s = {"model": model.source, "model_name": model.name, "mode": extra.pop("mode"), **extra, "seed": settings.seed,
         "steps": settings.steps, "guidance": settings.guidance, "size": settings.size,
         "scheduler": settings.scheduler, "swap_uncond": settings.swap_uncond, "long_prompt": settings.long_prompt,
         "warnings": warnings,
         "swap_steps": [settings.swap_start, settings.swap_end], "swap_kv": settings.swap_kv,
         "swap_strength": settings.swap_strength, "lora_rest": settings.lora_rest,
         "map_resolution": settings.map_resolution, "map_steps": [settings.map_start, settings.map_end],
         "map_blocks": list(settings.map_blocks),
         "rows": [row.name for row in rows], "accelerations": list(model.accelerations),
         "token_tables": {row.name: _table(row.prompt) for row in rows}, "versions": _versions()}
    return Generation(dict(zip([row.name for row in rows], images)), maps,
                      {row.name: row.prompt.tokens for row in rows},
                      {row.name: row.swapped for row in rows}, s, store_bytes,
                      {row.name: z for row, z in zip(rows, latents)}, warnings)


def size_warning(model, size: int) -> str:
    """Why a size far from the one the model was trained at will likely look wrong ("" when it is
    near it: within a quarter). The embedded model, trained at 128 px, draws four objects at 256 px
    and noise at 64 px; SD 1.5 repeats subjects well above 512 px."""
    native = model.native_size
    if 0.75 * native <= size <= 1.25 * native:
        return ""
    what = "repeated or tiled objects" if size > native else "noise or broken shapes"
    return (f"{model.name} was trained on {native}×{native} px images; at {size} px expect {what} "
            f"(use about {native} px)")


def check_prompt(text: str) -> str:
    """`text` with its whitespace collapsed; PromptError when it is empty or over MAX_PROMPT_CHARS."""
    if not isinstance(text, str) or not text.strip():
        raise PromptError("the prompt is empty; type what the image should show")
    if len(text) > MAX_PROMPT_CHARS:
        raise PromptError(f"the prompt is {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
    return " ".join(text.split())


def _size_warnings(model, settings: Settings) -> list[str]:
    warning = size_warning(model, settings.size)
    return [warning] if warning else []


def _long_notes(model, prompt: Prompt) -> tuple[dict, list[str]]:
    """What settings record about a long prompt, and the warning for dropped words."""
    if prompt.parts:
        return {"segments": [part.text for part in prompt.parts]}, []
    if prompt.dropped:
        return {"dropped": prompt.dropped}, [
            f"the prompt is longer than the {max_tokens(model.tokenizer)} tokens this model reads; these words "
            f"were dropped: {prompt.dropped!r} (long-prompt mode 'segments' keeps them)"]
    return {}, []


def generate_concept(model, text: str, concept: Concept | list[Concept], settings: Settings = Settings(),
                     positions: list[int] | None = None, include_base: bool = False,
                     include_customized: bool = True, progress=None, on_kv=None) -> Generation:
    """Customized baseline | AlignIT (| base model on p), one batch. `positions` overrides the
    swapped positions of p (default: the class word's positions the concept covers).

    Several concepts in one prompt: AlignIT takes each concept's rows of p from its own customized
    model's p' (which holds only that concept); the customized baseline is the one model holding them
    all (concepts.one_model), left out with a warning where none does; `positions`, if given, must be
    among the concepts' own. Prompts of at most 75 tokens."""
    concepts = [concept] if isinstance(concept, Concept) else list(concept)
    if not concepts:
        raise ConceptError("choose a concept")
    text = check_prompt(text)
    settings = resolve(model, settings)
    warnings = [w for c in concepts for w in c.warnings]
    if len(concepts) == 1:
        cp = concept_plan(model.tokenizer, text, *concepts[0].words.fields, settings.long_prompt)
        customized, whole, plan = cp.customized, concepts[0], cp.plan
        pairs = [(positions_plan(plan.target, plan.source, positions) if positions is not None else plan, whole)]
    else:
        several = several_concepts_plan(model.tokenizer, text, [c.words for c in concepts])
        customized, pairs = several.customized, _chosen(list(zip(several.plans, concepts)), positions)
        try:
            whole = one_model(concepts)
        except ConceptError as e:
            whole = None
            warnings.append(str(e))
    p = pairs[0][0].target
    rows = [Row("customized", customized, concept=whole)] if include_customized and whole is not None else []
    alignit = Row("alignit", p, swap=pairs[0][0], swap_concept=pairs[0][1], more_swaps=tuple(pairs[1:]))
    rows.append(alignit)
    if include_base:
        rows.append(Row("base", p))
    result = run_rows(model, rows, settings, progress, on_kv)
    notes, long_warnings = _long_notes(model, p)
    return _finish(model, rows, settings, result, warnings + long_warnings + _size_warnings(model, settings), {
        "mode": "alignit", **notes, "prompt": text, "customized_prompt": customized.text, "p": p.text,
        "p_dummy": " | ".join(plan.source.text for plan, _ in pairs), "positions": list(alignit.swapped),
        "concept": _described(concepts[0]),
        "concepts": [{**_described(c), "p_dummy": plan.source.text, "positions": list(plan.positions)}
                     for plan, c in pairs]})


def _described(c: Concept) -> dict:
    return {"name": c.name, "token": c.token, "class_word": c.class_word, "kind": c.kind,
            **({"scale": c.scale} if c.kind == "lora" else {})}


def _chosen(pairs: list[tuple[SwapPlan, Concept]], positions) -> list[tuple[SwapPlan, Concept]]:
    """Each concept's plan narrowed to the chosen positions (None: all of them); a concept left
    with none is not swapped. Raises PromptError for a position that is no concept's."""
    if positions is None:
        return pairs
    chosen = set(check_positions(pairs[0][0].target, positions))
    outside = sorted(chosen - {pos for plan, _ in pairs for pos in plan.positions})
    if outside:
        raise PromptError(f"position(s) {outside} belong to no concept; with several concepts, swap only "
                          f"positions of theirs")
    return [(replace(plan, positions=tuple(pos for pos in plan.positions if pos in chosen)), c)
            for plan, c in pairs if chosen & set(plan.positions)]


def generate_swap(model, text: str, swaps: list[tuple[str | int, str]] | None = None,
                  settings: Settings = Settings(), plan: SwapPlan | None = None,
                  include_baseline: bool = True, progress=None, on_kv=None) -> Generation:
    """Token swap: baseline | swapped, one batch. `swaps` are (word or position, source word);
    or give a ready `plan` (e.g. `positions_plan(p, p, [3])` for an identity swap)."""
    text = check_prompt(text)
    settings = resolve(model, settings)
    plan = plan or word_swap_plan(model.tokenizer, text, swaps or [], settings.long_prompt)
    rows = ([Row("baseline", plan.target)] if include_baseline else []) + [Row("swapped", plan.target, swap=plan)]
    result = run_rows(model, rows, settings, progress, on_kv)
    notes, warnings = _long_notes(model, plan.target)
    return _finish(model, rows, settings, result, warnings + _size_warnings(model, settings), {
        "mode": "swap", **notes, "prompt": text, "p": plan.target.text, "p_dummy": plan.source.text,
        "positions": list(plan.positions), "swaps": [[t, s] for t, s in (swaps or [])]})
