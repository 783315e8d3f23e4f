"""SD3 and Flux as a family of the engine: `load_model` finds them and `generate_swap` runs them.

The engine's own loop (generate.py) is one batched UNet call whose text conditioning is fixed per
request. An MMDiT's text stream changes in every block, so this family runs its own loop
(`own_loop`): the rows a request builds become `MMDiTRow`s for `generate_rows` (mmdit.py), and its
images, maps and latents go back to the engine, which makes the `Generation`.
Settings the side stream has no use for are refused (`check`); textual-inversion concepts run as a
customized row (the concept's vectors written into the text encoders' token embeddings) and an
AlignIT row whose side stream carries p' through them; LoRA concepts as a customized row whose
transformer layers carry the LoRA and an AlignIT row whose side stream runs the LoRA's text branch
(mmdit_lora.py); several concepts in one prompt as one side stream each (SD3: CLIP's plan, as on
SD 1.x; Flux: T5's, word by word); other concept kinds are not offered yet (`concept_kinds`,
`concept_refusal`). The MI score is RFMI (mmdit_score.py): `noising`, `encode`, `empty`, `token_rows`, `score_output`.

Token tables: SD3's primary table is CLIP's (the project's own word swaps apply as on SD 1.x);
Flux reads T5 rows only, so its table and word swaps are T5's (`model.tokenizer` is T5's there).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..concept_prompts import (ConceptPrompts, ConceptWords, SeveralConcepts, concept_plan, plan_several,
                               several_concepts_plan)
from ..errors import ConceptError, PromptError, SettingsError
from ..noising import RectifiedFlow
from ..prompts import Prompt, SwapPlan, check_swaps, positions_plan, tokenize, word_swap_plan
from ..settings import MAP_BLOCKS, Settings
from .mmdit import (DEFAULT_GUIDANCE, DEFAULT_STEPS, DEFAULT_TEXT_TOKENS, FAMILIES, MMDiTModel, MMDiTRow,
                    MMDiTSettings, MMDiTSwap, TextBranch, generate_rows)
from .mmdit_score import MMDiTScoring, on_grid
from .mmdit_lora import text_branch_view
from .mmdit_text import ConceptVectors, t5_concept_plan, t5_swap_plan, t5_table
from .sd_unet import Defaults

TITLES = {"sd3": "SD3", "flux": "Flux"}
SAMPLER = "euler"  # flow matching's Euler method: the one sampler of both pipelines


@dataclass(frozen=True)
class TokenSwapPlan(SwapPlan):
    """A swap plan whose p' rows are read at `source_positions` (one per position, in order) instead
    of at the same positions: Flux's T5 words line up word by word, not position by position."""

    source_positions: tuple[int, ...] = ()

    def narrowed(self, chosen: set[int]) -> TokenSwapPlan:
        """This plan writing only those of its positions that are `chosen` (each with its p' position)."""
        kept = [(a, b) for a, b in zip(self.positions, self.source_positions) if a in chosen]
        return TokenSwapPlan(self.target, self.source, tuple(a for a, _ in kept), tuple(b for _, b in kept))

    def unstarred(self) -> tuple[int, ...]:
        """Its own positions: p's rows pair with p''s word by word, so a longer concept has no row of p
        to spill into."""
        return self.positions


def as_prompt(table) -> Prompt:
    """A token table of mmdit_text as the engine's Prompt (ids, tokens and vector positions, no segments)."""
    return Prompt(table.text, table.ids, table.tokens, dict(table.vectors))


class ImageTokenMaps:
    """Where an MMDiT's heat maps come from: every block's image-query x text-key attention,
    renormalised over the text columns, on the image-token grid (one resolution per size)."""

    def __init__(self, transformer, size_step: int):
        blocks = list(transformer.transformer_blocks) + list(getattr(transformer, "single_transformer_blocks", []))
        names = [f"transformer_blocks.{i}.attn" for i in range(len(transformer.transformer_blocks))]
        names += [f"single_transformer_blocks.{i}.attn" for i in range(len(blocks) - len(names))]
        self.layers_by_name = {name: block.attn for name, block in zip(names, blocks)}
        self.size_step = size_step

    def resolutions(self, size: int) -> list[int]:
        return [size // self.size_step]

    def default_resolution(self, size: int) -> int:
        return size // self.size_step

    def layers(self, side: int, size: int, blocks=MAP_BLOCKS) -> list[str]:
        """Every block at the image-token grid (MMDiT has no down/mid/up parts), else none."""
        return list(self.layers_by_name) if side == size // self.size_step else []


# The embedded MMDiT model (scripts/train_mmdit.py): trained with one zero row where T5 would be, and
# sampled best at these (README, "The embedded MMDiT model").
EMBEDDED_MMDIT_DEFAULTS = Defaults(steps=20, guidance=5.0, text_rows=1)


class MMDiTFamily:
    """An SD3 / SD3.5 or Flux pipeline with side-stream AlignIT installed, answering what the engine
    asks (UNetFamily's docstrings are the contract). Text encoding, noise and decoding are the
    loop's own (mmdit.py), so `predict` and its kin are not offered; `encode` and `empty` serve the
    MI score only (the base model's text, no concept)."""

    name = "mmdit"
    own_loop = True  # generate.run_rows hands the rows to `denoise`
    concept_kinds = ("textual_inversion", "lora")  # the concept kinds it takes (None: all)
    concept_refusal = ("Custom Diffusion and text-encoder concepts on SD3/Flux are not supported yet; "
                       "textual inversion, DreamBooth-LoRA and token swaps are")
    several_concepts_refusal = ""  # it takes several concepts in one prompt
    schedulers = (SAMPLER,)

    @staticmethod
    def accepts(pipe) -> bool:
        return type(getattr(pipe, "transformer", None)).__name__ in FAMILIES

    def __init__(self, pipe, device: torch.device, defaults: Defaults | None = None):
        for part in pipe.components.values():
            if isinstance(part, torch.nn.Module):
                part.to(device).eval().requires_grad_(False)
        self.mmdit = MMDiTModel.from_pipeline(pipe)  # installs the processors once
        self.kind, self.device, self.pipe = self.mmdit.family, device, pipe
        self.title = TITLES[self.kind]
        self._defaults = defaults or Defaults(DEFAULT_STEPS, DEFAULT_GUIDANCE[self.kind])
        if self._defaults.text_rows is not None:
            self.mmdit.text_rows = self._defaults.text_rows
        self.scheduler_config = {k: v for k, v in pipe.scheduler.config.items() if k != "_use_default_values"}
        self.scheduler_name = type(pipe.scheduler).__name__
        self.maps = ImageTokenMaps(pipe.transformer, self.size_step)

    # ---------------------------------------------------------------- parts, sizes and defaults

    def _parts(self, kind: str) -> list:
        """The pipeline's tokenizers or text encoders (`kind`), the primary table's first: SD3 CLIP-L,
        CLIP-G (, T5 when it has one); Flux T5, then CLIP."""
        order = ("_2", "") if self.kind == "flux" else ("", "_2", "_3")
        return [getattr(self.pipe, kind + k) for k in order if getattr(self.pipe, "text_encoder" + k) is not None]

    tokenizers = property(lambda self: self._parts("tokenizer"))
    text_encoders = property(lambda self: self._parts("text_encoder"))
    # what a textual-inversion concept holds vectors for, in the pipeline's order (SD3: CLIP-L, CLIP-G
    # (, T5); Flux: CLIP (its pooled vector), T5)
    concept_encoders = property(lambda self: [e for e in self.mmdit.text_encoders if e is not None])
    # their entries in a textual-inversion file (SD3's `t5` only when it has T5: otherwise left unused)
    concept_keys = property(lambda self: ("clip_l", "t5") if self.kind == "flux" else
                            ("clip_l", "clip_g") + (("t5",) if self.pipe.text_encoder_3 is not None else ()))
    transformer = property(lambda self: self.pipe.transformer)
    denoiser = transformer  # the module whose layers a concept's weights edit
    vae = property(lambda self: self.pipe.vae)
    vae_scale = property(lambda self: self.pipe.vae_scale_factor)
    size_step = property(lambda self: self.mmdit.size_step)
    native_size = property(lambda self: self.mmdit.native_size)

    def size_range(self) -> tuple[int, int]:
        """(smallest, largest) image side in pixels."""
        return -(-self.size_step // 8) * 8, self.mmdit.largest_size

    def defaults(self) -> Defaults:
        return self._defaults

    def check(self, s: Settings, size: int) -> None:
        """Raises SettingsError for a setting that has no meaning on SD3/Flux (README, "SD3 and Flux")."""
        grid = size // self.size_step
        refused = [
            (s.scheduler not in (None, SAMPLER), f"{self.title} samples with flow matching's Euler method "
             f"('{SAMPLER}'); the {s.scheduler!r} scheduler is for UNet (noise-prediction) models"),
            (s.swap_uncond, f"on {self.title} the side stream writes the conditional half only (swap_uncond is for "
             f"UNet models)"),
            (s.swap_strength != 1, f"on {self.title} the side stream's rows replace p's whole; the swap strength "
             f"(blending keys and values) is for UNet models"),
            (s.lora_rest != 0, f"on {self.title} AlignIT's main stream is the base model and a LoRA acts through the "
             f"side stream's text branch; the rest of a LoRA (lora_rest) is for UNet models"),
            (tuple(s.map_blocks or ()) != MAP_BLOCKS, f"{self.title}'s heat maps average every transformer block; "
             f"the UNet parts (down, mid, up) do not apply"),
            (s.map_resolution not in (None, grid), f"{self.title}'s heat maps are on the image-token grid: "
             f"{grid}x{grid} at {size} px, not {s.map_resolution}x{s.map_resolution}"),
        ]
        for wrong, why in refused:
            if wrong:
                raise SettingsError(why)

    # ---------------------------------------------------------------- prompts and swaps

    def prompt(self, text: str, long: str = "segments") -> Prompt:
        """The primary token table of `text` (CLIP's on SD3, T5's on Flux). Longer prompts than the
        model reads are refused whatever `long` says. Raises PromptError."""
        if self.kind == "flux":
            return as_prompt(t5_table(self.tokenizers[0], text, DEFAULT_TEXT_TOKENS["flux"]))
        return tokenize(self.tokenizers[0], text)

    def swap_plan(self, text: str, swaps: list, long: str = "segments") -> SwapPlan:
        """Word and position swaps (target, source) as p, p' and the rows written. Raises PromptError."""
        check_swaps(swaps)
        if self.kind == "sd3":
            self.prompt(text)  # the prompt's length, said as this model's (CLIP reads 75 tokens)
            return word_swap_plan(self.tokenizers[0], text, swaps, "refuse")
        if not swaps:
            raise PromptError("no swap given: name a word or position and a source, e.g. dog=zebra")
        p, source, positions, read = t5_swap_plan(self.tokenizers[0], text, swaps, DEFAULT_TEXT_TOKENS["flux"])
        return TokenSwapPlan(as_prompt(p), as_prompt(source), positions, read)

    def concept_plan(self, text: str, words: ConceptWords, long: str = "segments") -> ConceptPrompts:
        """The customized prompt, p and p' of one concept: on SD3 CLIP's, planned as on SD 1.x (up to
        75 tokens whatever `long` says); on Flux T5's, word by word (t5_concept_plan). Raises PromptError."""
        if self.kind == "sd3":
            return concept_plan(self.tokenizers[0], text, words, "refuse")
        table, p, source, positions, read = t5_concept_plan(self.tokenizers[0], text, words,
                                                            DEFAULT_TEXT_TOKENS["flux"])
        return ConceptPrompts(as_prompt(table), TokenSwapPlan(as_prompt(p), as_prompt(source), positions, read))

    def several_concepts_plan(self, text: str, words: list[ConceptWords]) -> SeveralConcepts:
        """The customized prompt, p and each concept's p' of several concepts in one prompt: on SD3 CLIP's
        (as on SD 1.x); on Flux T5's, each concept planned word by word as one is (`concept_plan`) in the
        prompt with the others as their class words. Raises PromptError."""
        if self.kind == "sd3":
            return several_concepts_plan(self.tokenizers[0], text, words)
        return plan_several(text, words, lambda alone, c: self.concept_plan(alone, c).plan, self._t5_customized)

    def _t5_customized(self, text: str, table: tuple[tuple[str, int], ...]) -> Prompt:
        """T5's table of a prompt holding several concepts, each (token, vector count) of `table` read as
        its vectors' positions, numbered on in that order."""
        vectors = ConceptVectors("", (torch.zeros(sum(n for _, n in table), 1),), table) if table else None
        return as_prompt(t5_table(self.tokenizers[0], text, DEFAULT_TEXT_TOKENS["flux"], vectors))

    def concept_positions(self, plan: SwapPlan, positions: list[int]) -> SwapPlan:
        """A concept's plan with the swapped positions of p chosen by hand: on SD3 any of p's (p' is read
        at the same ones); on Flux among the concept's own (its words pair with p''s word by word).
        Raises PromptError."""
        if not isinstance(plan, TokenSwapPlan):
            return positions_plan(plan.target, plan.source, positions)
        chosen = set()
        for raw in positions:
            if isinstance(raw, bool) or not isinstance(raw, int):
                raise PromptError(f"position {raw!r} is not a whole number")
            chosen.add(raw)
        outside = sorted(chosen - set(plan.positions))
        if not chosen or outside:
            raise PromptError(f"on {self.title} a concept's rows pair with p's word by word: choose among its "
                              f"positions {list(plan.positions)}" + (f", not {outside}" if outside else ""))
        return plan.narrowed(chosen)

    # ---------------------------------------------------------------- denoising

    def denoise(self, rows: list, settings: Settings, progress=None, on_kv=None):
        """The engine's rows (a token swap's "baseline" / "swapped"; a concept's "customized", "alignit",
        "base") for resolved `settings`: (images, {row: (tokens, side, side) maps of the primary
        table}, bytes of the map sums, final latents per row, CPU). A row's `concept` writes its
        vectors into the row's own encoding; a swap's concept into p''s, which the side stream
        carries. `on_kv(KVRecord)` sees every block's keys and values (mmdit_attention). Raises
        ConceptError for a concept of a kind it does not take."""
        s = settings
        mmdit = MMDiTSettings(seed=s.seed, steps=s.steps, guidance=s.guidance, size=s.size, swap_start=s.swap_start,
                              swap_end=s.swap_end, swap_kv=s.swap_kv, record_maps=s.record_maps,
                              map_start=s.map_start, map_end=s.map_end)
        gen = generate_rows(self.mmdit, [self._row(row) for row in rows], mmdit, on_kv=on_kv, progress=progress)
        names = [row.name for row in rows]
        store_bytes = sum(m.nbytes for m in gen.text_maps.values())
        latents = [on_grid(self.kind, gen.latents[n]) for n in names]  # (C, h, w), Flux's unpacked
        return [gen.images[n] for n in names], gen.maps, store_bytes, latents

    def _vectors(self, concept) -> ConceptVectors | None:
        """A textual-inversion concept's vectors, or several's at once (concepts.one_model); None: no
        concept, or a LoRA, which has none."""
        if concept is None or concept.kind == "lora" and not concept.vectors:
            return None
        if concept.kind not in self.concept_kinds or not concept.vectors:
            raise ConceptError(self.concept_refusal)
        return ConceptVectors(concept.token, tuple(concept.vectors), concept.vector_tokens)

    def _branch(self, concept) -> TextBranch | None:
        """The customized text branch a swap's side stream carries p' through (None: the base model's)."""
        if concept is None:
            return None
        if concept.kind == "lora":
            return TextBranch(transformer=text_branch_view(self.transformer, concept.unet),
                              text_encoders=self._encoders(concept))
        return TextBranch(vectors=self._vectors(concept))

    def _encoders(self, concept) -> tuple | None:
        """A LoRA's text encoders in the pipeline's order (None where it has none), or None: the model's own."""
        if concept is None or not concept.text_encoders:
            return None
        given = iter(concept.text_encoders)  # the concept_encoders' order: the pipeline's, less a missing T5
        return tuple(None if own is None else next(given) for own in self.mmdit.text_encoders)

    def _row(self, row) -> MMDiTRow:
        """An engine Row as generate_rows' row: its prompt's text, its concept's vectors, transformer weights
        (a LoRA's, on both branches) and text encoders, its swaps."""
        swaps = []
        for plan, concept in row.sources:
            read = plan.source_positions if isinstance(plan, TokenSwapPlan) else None
            swaps.append(MMDiTSwap(tuple(plan.positions), plan.source.text, self._branch(concept), read))
        edits = row.concept.unet if row.concept is not None else {}
        return MMDiTRow(row.name, row.prompt.text, self._vectors(row.concept), tuple(swaps), edits,
                        self._encoders(row.concept))

    # ---------------------------------------------------------------- the MI score: RFMI (mmdit_score.py)

    def noising(self) -> RectifiedFlow:
        """The rectified-flow process the model was trained with (for the MI score)."""
        return RectifiedFlow.of_scheduler(self.scheduler_config)

    scoring = property(lambda self: MMDiTScoring(self.mmdit))
    encode = property(lambda self: self.scoring.encode)
    empty = property(lambda self: self.scoring.empty)
    token_rows = property(lambda self: self.scoring.token_rows)
    score_output = property(lambda self: self.scoring.velocity)
