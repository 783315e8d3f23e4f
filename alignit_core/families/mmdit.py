"""AlignIT on MMDiT pipelines (SD3 / SD3.5, Flux): a side stream supplies the concept's keys and values.

    model = MMDiTModel.from_pipeline(pipe)                   # installs the processors once
    gen = generate_mmdit(model, "a photo of a dog", [MMDiTSwap((5,), "* * * * cat")], MMDiTSettings(seed=3))
    gen.images["baseline"], gen.images["swapped"], gen.maps["swapped"]  # (tokens, side, side)

Rows: "baseline" (the base model on p) and, when swaps are given, "swapped" (the same with the
side streams' rows written), one batch from one seed's initial latent. Each swap names positions of
p (the primary token table: CLIP for SD3, T5 for Flux), the source prompt p' whose rows at the same
positions replace them, and optionally a customized text branch (a transformer whose context
weights differ, and/or customized text encoders) that encodes and carries p'. The swap acts in the
conditional CFG half only (Flux-dev is guidance-distilled: no unconditional half); the side stream
is modulated by the main row's timestep embedding (its pooled text is the main row's, p's).
`generate_rows` runs any rows (`MMDiTRow`): a textual-inversion concept's "customized" row encodes
its prompt with the concept's vectors written in (`MMDiTRow.vectors`), and AlignIT's side stream
carries p' through the text branch that writes them (`TextBranch.vectors`).

The denoising loops (mmdit_loop.py) are written out (not `pipe(...)`): a pipeline object keeps
per-call state. They follow each pipeline's latents, scheduler and guidance op for op. The engine's
`load_model` / `generate_swap` reach this through `MMDiTFamily` (mmdit_family.py).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from PIL import Image

from ..errors import ConceptError, PromptError, SettingsError
from ..prompts import MAX_PROMPT_CHARS
from ..settings import MAX_GUIDANCE, MAX_SEED, MAX_STEPS, SWAP_KV
from ..weights import Edit, overlay
from .mmdit_attention import MapSums, MMDiTState, SideStream, install
from .mmdit_loop import decode, denoise_flux, denoise_sd3
from .mmdit_text import (CLIP_ROWS, ConceptVectors, TokenTable, clip_table, encode_flux, encode_sd3, t5_table,
                         word_pairs)

FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
MAX_TEXT_TOKENS = 512  # T5 rows: the pipelines' own limit (Flux reads 512, SD3 256 by default)
DEFAULT_STEPS = 28  # the pipelines' own defaults
DEFAULT_GUIDANCE = {"sd3": 7.0, "flux": 3.5}
DEFAULT_TEXT_TOKENS = {"sd3": 256, "flux": 512}


@dataclass(frozen=True)
class TextBranch:
    """A customized text branch: what the side stream runs p' through. None fields: the model's own."""

    transformer: object | None = None  # same architecture; its context_embedder and per-block text weights are used
    text_encoders: tuple | None = None  # in the pipeline's order (SD3: CLIP-L, CLIP-G, T5; Flux: CLIP, T5); None = own
    vectors: ConceptVectors | None = None  # a textual-inversion concept's vectors, written where p' holds its token


@dataclass(frozen=True)
class MMDiTSwap:
    """Rows of p at `positions` (primary token table) taken from p' = `source` at `source_positions`
    (None: the same positions; else one per position, in order: Flux's T5 words need not line up)."""

    positions: tuple[int, ...]
    source: str
    branch: TextBranch | None = None
    source_positions: tuple[int, ...] | None = None


@dataclass(frozen=True)
class MMDiTRow:
    """One image of the batch: `text` through the model's text encoders (a concept's `vectors`
    written in where it holds the concept's token), its rows written by the side streams of `swaps`,
    the transformer's layers named in `edits` computed with those weights on this row alone (a LoRA
    concept's customized row: both branches), `text_encoders` (pipeline order, None: the model's own)
    encoding its prompt and, on SD3, its unconditional half's empty prompt."""

    name: str
    text: str
    vectors: ConceptVectors | None = None
    swaps: tuple[MMDiTSwap, ...] = ()
    edits: dict[str, Edit] = field(default_factory=dict)  # transformer layer -> its customized weights
    text_encoders: tuple | None = None

    @property
    def branch(self) -> TextBranch | None:
        """What encodes this row's own text (None: the model's text encoders)."""
        if self.vectors is None and self.text_encoders is None:
            return None
        return TextBranch(text_encoders=self.text_encoders, vectors=self.vectors)


@dataclass(frozen=True)
class MMDiTSettings:
    """How to sample and swap. None means the pipeline's default."""

    seed: int = 0
    steps: int | None = None  # 28
    guidance: float | None = None  # SD3 7.0 (CFG), Flux 3.5 (distilled guidance)
    size: int | None = None  # the transformer's native size
    text_tokens: int | None = None  # T5 rows: SD3 256, Flux 512
    swap_blocks: tuple[int, ...] | None = None  # blocks (joint, then Flux single) that swap; None = all
    swap_start: float = 0.0  # fraction of the steps in which the swap is applied
    swap_end: float = 1.0
    swap_kv: str = "kv"  # keys and values | k | v
    swap_t5: bool = True  # SD3: also swap the T5 rows of the swapped words (when the pipeline has T5)
    record_maps: bool = True
    map_blocks: tuple[int, ...] | None = None  # blocks whose attention is averaged into the maps; None = all
    map_start: float = 0.0
    map_end: float = 1.0


@dataclass
class MMDiTGeneration:
    """What one request produced."""

    images: dict[str, Image.Image]
    maps: dict[str, np.ndarray]  # row -> (tokens of `tokens`, side, side): the primary segment's maps
    t5_maps: dict[str, np.ndarray]  # SD3 with T5: row -> (tokens of `t5_tokens`, side, side); else {}
    text_maps: dict[str, np.ndarray]  # row -> (every text row, side, side): sums to 1 per pixel
    tokens: tuple  # p's primary Token table
    t5_tokens: tuple  # SD3 with T5: p's T5 Token table; else ()
    swapped: dict[str, dict[str, tuple[int, ...]]]  # row -> {"clip"/"t5": positions of p written}
    settings: dict = field(default_factory=dict)
    latents: dict[str, torch.Tensor] = field(default_factory=dict)  # row -> final latent (CPU), as the pipeline has it
    main_tokens: int = 0  # tokens the main batch puts through each block (image + text, all rows)
    side_tokens: int = 0  # extra text tokens the side streams put through each block


class MMDiTModel:
    """An SD3 or Flux pipeline with AlignIT's processors installed (once; the pipeline itself still
    generates as before: without a request state the processors compute what diffusers' do)."""

    def __init__(self, pipe, family: str):
        self.pipe, self.family = pipe, family
        self.blocks = install(pipe.transformer, family)
        self.text_rows = DEFAULT_TEXT_TOKENS[family]  # T5 rows a request reads unless its settings say
        self._uncond: dict = {}  # text_tokens -> the empty prompt's (hidden, pooled), SD3's CFG

    @classmethod
    def from_pipeline(cls, pipe) -> MMDiTModel:
        family = FAMILIES.get(type(getattr(pipe, "transformer", None)).__name__)
        if family is None:
            raise SettingsError(f"{type(pipe).__name__} is not an SD3 or Flux pipeline")
        return cls(pipe, family)

    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def joint_blocks(self) -> int:
        return len(self.transformer.transformer_blocks)

    @property
    def text_encoders(self) -> tuple:
        p = self.pipe
        return (p.text_encoder, p.text_encoder_2, p.text_encoder_3) if self.family == "sd3" else (
            p.text_encoder, p.text_encoder_2)

    @property
    def has_t5_rows(self) -> bool:
        """SD3's T5 rows carry the prompt (a pipeline without T5 feeds zeros there)."""
        return self.family == "flux" or self.pipe.text_encoder_3 is not None

    @property
    def size_step(self) -> int:
        vae = self.pipe.vae_scale_factor
        return vae * (self.transformer.config.patch_size if self.family == "sd3" else 2)

    @property
    def native_size(self) -> int:
        if self.family == "sd3":
            return self.transformer.config.sample_size * self.pipe.vae_scale_factor
        return self.pipe.default_sample_size * self.pipe.vae_scale_factor

    @property
    def largest_size(self) -> int:
        """4x the native size; SD3's position embeddings also cap the image tokens per side."""
        largest = 4 * self.native_size
        cap = self.transformer.config.get("pos_embed_max_size") if self.family == "sd3" else None
        return min(largest, cap * self.size_step) if cap else largest

    def check_branch(self, branch: TextBranch) -> None:
        """Raises ConceptError when a customized text branch does not fit this model."""
        t = branch.transformer
        if t is not None and (type(t) is not type(self.transformer) or len(t.transformer_blocks) != self.joint_blocks
                              or len(getattr(t, "single_transformer_blocks", ())) != self.blocks - self.joint_blocks
                              or t.config.get("joint_attention_dim") != self.transformer.config.joint_attention_dim):
            raise ConceptError(f"the customized text branch's transformer ({type(t).__name__}) has another "
                               f"architecture than this model's {type(self.transformer).__name__}")
        encoders = branch.text_encoders
        if encoders is not None and len(encoders) != len(self.text_encoders):
            raise ConceptError(f"give the customized text encoders as {len(self.text_encoders)} entries in the "
                               f"pipeline's order (None for the model's own), got {len(encoders)}")
        present = [e for e in self.text_encoders if e is not None]
        if branch.vectors is not None and len(branch.vectors.vectors) != len(present):
            raise ConceptError(f"give a concept's vectors for each of the {len(present)} text encoders in the "
                               f"pipeline's order, got {len(branch.vectors.vectors)}")

    def encode(self, text: str, text_rows: int, branch: TextBranch | None = None):
        own = self.text_encoders
        custom = branch.text_encoders if branch is not None and branch.text_encoders else (None,) * len(own)
        encoders = tuple(c if c is not None else o for c, o in zip(custom, own))
        vectors = branch.vectors if branch is not None else None
        return (encode_sd3 if self.family == "sd3" else encode_flux)(self.pipe, text, encoders, text_rows, vectors)

    def uncond(self, text_rows: int):
        if text_rows not in self._uncond:
            self._uncond[text_rows] = self.encode("", text_rows)
        return self._uncond[text_rows]


def _check_prompt(text, what: str = "the prompt") -> str:
    if not isinstance(text, str) or not text.strip():
        raise PromptError(f"{what} is empty; type what the image should show" if what == "the prompt" else
                          f"{what} is empty; give the prompt whose rows are swapped in (e.g. '* * * * cat')")
    if len(text) > MAX_PROMPT_CHARS:
        raise PromptError(f"{what} is {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
    return " ".join(text.split())


def _whole(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _blocks(model: MMDiTModel, chosen, what: str) -> frozenset[int]:
    if chosen is None:
        return frozenset(range(model.blocks))
    if isinstance(chosen, (str, int)) or not all(_whole(b) and 0 <= b < model.blocks for b in chosen):
        raise SettingsError(f"{what} must be block numbers from 0 to {model.blocks - 1}, got {chosen!r}")
    return frozenset(chosen)


def resolve(model: MMDiTModel, s: MMDiTSettings) -> MMDiTSettings:
    """Defaults filled in and every setting checked. Raises SettingsError."""
    steps = DEFAULT_STEPS if s.steps is None else s.steps
    guidance = DEFAULT_GUIDANCE[model.family] if s.guidance is None else s.guidance
    size = model.native_size if s.size is None else s.size
    rows = model.text_rows if s.text_tokens is None else s.text_tokens
    if not _whole(s.seed) or not 0 <= s.seed <= MAX_SEED:
        raise SettingsError(f"seed must be a whole number from 0 to {MAX_SEED}")
    if not _whole(steps) or not 1 <= steps <= MAX_STEPS:
        raise SettingsError(f"steps must be a whole number from 1 to {MAX_STEPS}")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) \
            or not 0 <= guidance <= MAX_GUIDANCE:
        raise SettingsError(f"guidance must be a finite number from 0 to {MAX_GUIDANCE:g}")
    step, largest = model.size_step, model.largest_size
    if not _whole(size) or size % step or not step <= size <= largest:
        raise SettingsError(f"size must be a multiple of {step} pixels from {step} to {largest}")
    if not _whole(rows) or not 1 <= rows <= MAX_TEXT_TOKENS:
        raise SettingsError(f"text tokens (T5 rows) must be a whole number from 1 to {MAX_TEXT_TOKENS}")
    if s.swap_kv not in SWAP_KV:
        raise SettingsError(f"swap {s.swap_kv!r} is not one of {', '.join(SWAP_KV)} (keys and values, keys only, "
                            f"values only)")
    for name, (a, b) in (("swap", (s.swap_start, s.swap_end)), ("heat-map", (s.map_start, s.map_end))):
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b)) or not 0 <= a < b <= 1:
            raise SettingsError(f"the {name} step range must satisfy 0 <= start < end <= 1")
    if s.record_maps and round(s.map_start * steps) == round(s.map_end * steps):
        raise SettingsError(f"the heat-map step range {s.map_start:g}..{s.map_end:g} holds none of the {steps} "
                            f"steps; widen it")
    _blocks(model, s.swap_blocks, "swap blocks")
    if s.record_maps and not _blocks(model, s.map_blocks, "heat-map blocks"):
        raise SettingsError("choose at least one heat-map block")
    return replace(s, steps=steps, guidance=float(guidance), size=size, text_tokens=rows)


@dataclass(frozen=True)
class _Plan:
    """One swap resolved to joint-text rows: the main row's `targets` get p''s `sources`."""

    swap: MMDiTSwap
    targets: tuple[int, ...]
    sources: tuple[int, ...]
    positions: dict  # segment -> positions of p written


def tables(model: MMDiTModel, text: str, rows: int, concept: ConceptVectors | None = None
           ) -> tuple[TokenTable, TokenTable | None]:
    """(primary table, SD3's T5 table or None); a concept's token read as its vectors' positions."""
    if model.family == "flux":
        return t5_table(model.pipe.tokenizer_2, text, rows, concept), None
    t5 = t5_table(model.pipe.tokenizer_3, text, rows, concept) if model.pipe.text_encoder_3 is not None else None
    return clip_table(model.pipe.tokenizer, text, concept), t5


def _plan(model: MMDiTModel, p: tuple, swap: MMDiTSwap, s: MMDiTSettings) -> _Plan:
    source = _check_prompt(swap.source, "the source prompt p'")
    positions = _positions(swap.positions)
    read = positions if swap.source_positions is None else _positions(swap.source_positions)
    if len(read) != len(positions):
        raise PromptError(f"give one source position per swapped position: {len(positions)} positions, "
                          f"{len(read)} source positions")
    if swap.branch is not None:
        model.check_branch(swap.branch)
    primary, t5 = p
    src_primary, src_t5 = tables(model, source, s.text_tokens, swap.branch.vectors if swap.branch else None)
    for pos, src in zip(positions, read):
        for table, what, q in ((primary, "p", pos), (src_primary, "p'", src)):
            if q not in table.content:
                c = table.content
                raise PromptError(f"position {q} is not a token of {what} ({table.text!r} has its tokens at "
                                  f"{c[0]}..{c[-1]}" + (f"; {c[0] - 1} is the start token" if c[0] else "") + ")")
    name = "t5" if model.family == "flux" else "clip"
    targets, sources, written = list(positions), list(read), {name: tuple(sorted(set(positions)))}
    if t5 is not None and s.swap_t5:
        words = sorted({(primary.tokens[pos].word_index, src_primary.tokens[src].word_index)
                        for pos, src in zip(positions, read)})
        pairs = word_pairs(t5, src_t5, words)
        targets += [CLIP_ROWS + a for a, _ in pairs]
        sources += [CLIP_ROWS + b for _, b in pairs]
        written["t5"] = tuple(a for a, _ in pairs)
    return _Plan(swap, tuple(targets), tuple(sources), written)


def _positions(given) -> tuple[int, ...]:
    positions = tuple(given) if isinstance(given, (tuple, list)) else None
    if not positions or not all(_whole(x) for x in positions):
        raise PromptError(f"name the positions to swap as whole numbers, e.g. (5,); got {given!r}")
    return positions


def _fractions(start: float, end: float, steps: int) -> tuple[int, int]:
    return round(start * steps), round(end * steps)


def generate_mmdit(model: MMDiTModel, text: str, swaps: list[MMDiTSwap] = (), settings: MMDiTSettings = MMDiTSettings(),
                   include_baseline: bool = True, on_kv=None, progress=None) -> MMDiTGeneration:
    """Baseline | swapped, one batch (no swaps: the baseline alone; `include_baseline=False`: the
    swapped row alone). `on_kv(KVRecord)` sees every block's keys and values at every step before
    and after the swap (read-only; tests); `progress(done, total)` is called after each step. Raises PromptError, SettingsError, ConceptError (a
    customized branch that does not fit the model)."""
    rows = [MMDiTRow("baseline", text)] if include_baseline or not swaps else []
    rows += [MMDiTRow("swapped", text, swaps=tuple(swaps))] if swaps else []
    return generate_rows(model, rows, settings, on_kv, progress)


@torch.no_grad()
def generate_rows(model: MMDiTModel, rows: list[MMDiTRow], settings: MMDiTSettings = MMDiTSettings(), on_kv=None,
                  progress=None) -> MMDiTGeneration:
    """Any rows in one batch from one seed's initial latent (e.g. a concept's: the customized row,
    AlignIT's, the base model's); each distinct (text, vectors) is encoded once. Raises as generate_mmdit."""
    names = [row.name for row in rows]
    if not rows or len(set(names)) != len(names):
        raise SettingsError(f"give one or more rows with distinct names, got {names}")
    texts = [_check_prompt(row.text) for row in rows]
    s = resolve(model, settings)
    tabs = [tables(model, t, s.text_tokens, row.vectors) for t, row in zip(texts, rows)]
    plans = [[_plan(model, tab, swap, s) for swap in row.swaps] for tab, row in zip(tabs, rows)]
    r, sd3 = len(rows), model.family == "sd3"
    cfg = sd3 and s.guidance > 1  # SD3's pipeline guides only above 1
    encoded: dict = {}
    keys = [(t, id(row.vectors), id(row.text_encoders)) for t, row in zip(texts, rows)]
    for key, t, row in zip(keys, texts, rows):
        if row.text_encoders is not None:
            model.check_branch(row.branch)
        if key not in encoded:
            encoded[key] = model.encode(t, s.text_tokens, row.branch)
    hidden = torch.cat([encoded[key][0] for key in keys])
    pooled = torch.cat([encoded[key][1] for key in keys])
    if cfg:  # the empty prompt through each row's text encoders (a LoRA's, where it trains them)
        uncond = [model.uncond(s.text_tokens) if row.text_encoders is None else
                  model.encode("", s.text_tokens, TextBranch(text_encoders=row.text_encoders)) for row in rows]
        hidden = torch.cat([u[0] for u in uncond] + [hidden])
        pooled = torch.cat([u[1] for u in uncond] + [pooled])
    first_cond = r if cfg else 0

    device = hidden.device
    state = MMDiTState(swap_blocks=_blocks(model, s.swap_blocks, "swap blocks"),
                       swap_steps=_fractions(s.swap_start, s.swap_end, s.steps), swap_kv=s.swap_kv, on_kv=on_kv,
                       text_tokens=hidden.shape[1])
    for k, row_plans in enumerate(plans):
        for plan in row_plans:
            branch = plan.swap.branch
            transformer = branch.transformer if branch is not None and branch.transformer is not None \
                else model.transformer
            source_hidden, _ = model.encode(plan.swap.source, s.text_tokens, branch)
            state.sides.append(SideStream(
                row=first_cond + k, start=transformer.context_embedder(source_hidden),
                targets=torch.tensor(plan.targets, device=device), sources=torch.tensor(plan.sources, device=device),
                joint=list(transformer.transformer_blocks),
                single=list(getattr(transformer, "single_transformer_blocks", []))))
    grid = s.size // model.size_step  # image tokens per side
    if s.record_maps:
        state.maps = MapSums(tuple(range(first_cond, first_cond + r)),
                             torch.zeros(r, grid * grid, hidden.shape[1], device=device, dtype=torch.float32),
                             _blocks(model, s.map_blocks, "heat-map blocks"),
                             _fractions(s.map_start, s.map_end, s.steps))
    edits: dict[str, list] = {}  # the request's view of the transformer: each row's own weights on its rows
    for k, row in enumerate(rows):
        own = torch.tensor([k, r + k] if cfg else [k], device=device)
        for name, edit in row.edits.items():
            edits.setdefault(name, []).append((own, edit))
    run = denoise_sd3 if sd3 else denoise_flux
    latents = run(model, overlay(model.transformer, edits), state, hidden, pooled, r, cfg, s, progress)
    images = [decode(model, latents[k: k + 1], s.size) for k in range(r)]

    maps, t5_maps, text_maps = {}, {}, {}
    if state.maps is not None:
        every = state.maps.maps().reshape(r, hidden.shape[1], grid, grid).cpu().numpy().astype(np.float32)
        for k, name in enumerate(names):
            primary, t5 = tabs[k]
            text_maps[name] = every[k]
            maps[name] = every[k, : len(primary.ids)]
            if t5 is not None:
                t5_maps[name] = every[k, CLIP_ROWS: CLIP_ROWS + len(t5.ids)]
    swapped = {name: {seg: tuple(sorted({q for plan in row_plans for q in plan.positions.get(seg, ())}))
                      for seg in ("clip", "t5") if any(seg in plan.positions for plan in row_plans)}
               for name, row_plans in zip(names, plans)}
    main = next((k for k, row_plans in enumerate(plans) if row_plans), 0)  # the row of p (swapped), else the first
    primary, t5 = tabs[main]
    every_plan = [plan for row_plans in plans for plan in row_plans]
    batch = hidden.shape[0]
    return MMDiTGeneration(
        dict(zip(names, images)), maps, t5_maps, text_maps, primary.tokens, t5.tokens if t5 is not None else (),
        swapped, _described(model, texts[main], every_plan, s),
        {n: latents[k].float().cpu() for k, n in enumerate(names)},
        main_tokens=batch * (grid * grid + hidden.shape[1]), side_tokens=len(every_plan) * hidden.shape[1])


def _described(model: MMDiTModel, text: str, plans: list[_Plan], s: MMDiTSettings) -> dict:
    return {"family": model.family, "prompt": text, **{k: v for k, v in asdict(s).items()},
            "swaps": [{"positions": list(plan.swap.positions), "source": plan.swap.source,
                       "customized": plan.swap.branch is not None,
                       "written": {k: list(v) for k, v in plan.positions.items()}}
                      for plan in plans]}
