"""Stable Diffusion 1.x / 2.x and SDXL: a UNet whose cross-attention layers read the text.

Everything that differs between model families lives in one such object: the pipeline's parts,
how a prompt becomes conditioning (SDXL: two CLIP encoders, penultimate states, a pooled
embedding and size conditions), the empty prompt of classifier-free guidance (encoded once per
text stack and kept here), the denoiser call, the attention processor's installation, which
layers record heat maps at which resolution, the noising process the MI score uses, and the
default sampling settings. The engine (`generate`, `scores`, `sweep`) asks the family and never
which family it is.

On a UNet the text conditioning is the same at every step, so a concept's keys and values are
projected once per request (kv.py): this is the paper's AlignIT exactly.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from PIL import Image

from ..attention import install
from ..concept_prompts import (ConceptPrompts, ConceptWords, SeveralConcepts, concept_plan,
                               several_concepts_plan)
from ..encoding import concept_vectors, encode
from ..noising import Noising
from ..prompts import Prompt, SwapPlan, padded, positions_plan, read_prompt, tokenize, word_swap_plan
from ..settings import MAP_BLOCKS, SCHEDULERS, Settings


@dataclass(frozen=True)
class Defaults:
    """What `Settings` leaves as None becomes this."""

    steps: int = 30
    guidance: float = 7.5
    text_rows: int | None = None  # SD3 / Flux: T5 rows read (SD3 without T5: zero rows); None: the pipeline's


EMBEDDED_DEFAULTS = Defaults(steps=20, guidance=10.0)  # the embedded model's best, measured (README)


def block_of(layer: str) -> str:
    """"down", "mid" or "up": the part of the UNet a layer name (`up_blocks.1.attentions...`) lies in."""
    return layer.split("_", 1)[0]


def cross_attention_sides(unet) -> list[tuple[str, int, torch.nn.Module]]:
    """(name, latent side, module) of every cross-attention layer of `unet` at its native size
    (16, 8 and 4 on the embedded model): the mapping MapLayers uses, for scripts that train or
    probe a bare UNet."""
    cross = {name: m for name, m in unet.named_modules() if name.endswith("attn2")}
    maps = MapLayers(unet, cross, vae_scale=1)
    return [(name, maps.side(name, unet.config.sample_size), m) for name, m in cross.items()]


class MapLayers:
    """Which cross-attention layers record heat maps, and at which resolution."""

    def __init__(self, unet, layers: dict, vae_scale: int):
        self.layers_by_name = layers  # attn2 module name -> Attention
        self.n_down = len(unet.config.block_out_channels) - 1
        self.vae_scale = vae_scale

    def side(self, name: str, size: int) -> int:
        """Side length of cross-attention layer `name`'s maps for an image of `size` pixels."""
        latent = size // self.vae_scale
        if name.startswith("mid_block"):
            return latent // 2 ** self.n_down
        i = int(name.split(".")[1])
        return latent // 2 ** (i if name.startswith("down_blocks") else self.n_down - i)

    def resolutions(self, size: int) -> list[int]:
        """Side lengths of the cross-attention maps for an image of `size` pixels."""
        return sorted({self.side(name, size) for name in self.layers_by_name})

    def layers(self, side: int, size: int, blocks=MAP_BLOCKS) -> list[str]:
        """The cross-attention layers whose maps are `side` x `side` at `size` px, in the UNet's
        `blocks` (down, mid, up)."""
        return [name for name in self.layers_by_name
                if self.side(name, size) == side and block_of(name) in blocks]

    def default_resolution(self, size: int) -> int:
        """The cross-attention resolution nearest max(16, latent/4): 16x16 for SD 1.x at 512 px,
        32x32 for SDXL at 1024 px, 16x16 for the embedded model."""
        target = max(16, size // self.vae_scale // 4)
        return min(self.resolutions(size), key=lambda s: (abs(s - target), -s))


class UNetFamily:
    """A Stable Diffusion 1.x / 2.x or SDXL pipeline's parts and what the engine asks of them.
    Read-only after construction, except the empty-prompt cache."""

    name = "sd-unet"
    own_loop = False  # the engine's batched loop (generate.py) runs the rows; True: the family's `denoise`
    concept_kinds = None  # the concept kinds it takes (None: all of concepts.KINDS)
    concept_refusal = ""  # why it takes no concepts of the other kinds
    several_concepts_refusal = ""  # why it takes no prompt with several concepts ("": it takes them)
    concept_keys = None  # a textual-inversion file's per-encoder entries it reads (None: SDXL's clip_l, clip_g)
    schedulers = tuple(SCHEDULERS)  # the samplers it runs, by their Settings name

    @staticmethod
    def accepts(pipe) -> bool:
        return getattr(pipe, "unet", None) is not None and hasattr(pipe, "text_encoder")

    def __init__(self, pipe, device: torch.device, defaults: Defaults | None = None):
        self.pooled = getattr(pipe, "text_encoder_2", None) is not None  # SDXL: pooled text and size conditions
        self.tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if self.pooled else [])
        self.text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if self.pooled else [])
        for m in self.text_encoders + [pipe.unet, pipe.vae]:
            m.to(device).eval().requires_grad_(False)
        self.unet, self.vae, self.device = pipe.unet, pipe.vae, device
        # `_use_default_values` would make from_config() drop values a pipeline fixed after loading
        # (e.g. SD's steps_offset=1), so the scheduler we build per request would differ from pipe's.
        self.scheduler_config = {k: v for k, v in pipe.scheduler.config.items() if k != "_use_default_values"}
        self.scheduler_name = type(pipe.scheduler).__name__
        self.zeros_for_empty_prompt = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False))
        # the layers that read the text: cross-attention (attn2), not the UNet's self-attention
        cross = {name: m for name, m in install(pipe.unet).items() if m.is_cross_attention}
        self.maps = MapLayers(pipe.unet, cross, self.vae_scale)
        self._defaults = defaults or Defaults()
        self._empty: dict = {}  # (encoder ids, device, dtype) -> (weakref to the first encoder, encodings)

    # ---------------------------------------------------------------- sizes and defaults

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_step(self) -> int:
        """Image sizes must be multiples of this (the VAE and every UNet downsampling halve them)."""
        return self.vae_scale * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        return self.unet.config.sample_size * self.vae_scale

    def size_range(self) -> tuple[int, int]:
        """(smallest, largest) image side in pixels."""
        return 64, 2 * self.native_size

    def defaults(self) -> Defaults:
        return self._defaults

    def check(self, s: Settings, size: int) -> None:
        """Raises SettingsError for a setting the family cannot honour; every one applies to a UNet."""

    # ---------------------------------------------------------------- prompts and swaps

    def prompt(self, text: str, long: str = "segments") -> Prompt:
        """The token table of `text` as the model reads it (long prompts per `long`)."""
        return read_prompt(self.tokenizers[0], text, long)

    @property
    def denoiser(self) -> torch.nn.Module:
        """The module whose layers a concept's weights edit: the UNet."""
        return self.unet

    @property
    def concept_encoders(self) -> list:
        """The text encoders a textual-inversion concept holds vectors for, in its files' order."""
        return self.text_encoders

    def concept_plan(self, text: str, words: ConceptWords, long: str = "segments") -> ConceptPrompts:
        """The customized prompt, p and p' (with the swapped positions) of one concept written as
        `words`; `long` decides past 75 tokens (concept_prompts.concept_plan). Raises PromptError."""
        return concept_plan(self.tokenizers[0], text, words, long)

    def several_concepts_plan(self, text: str, words: list[ConceptWords]) -> SeveralConcepts:
        """The customized prompt, p and each concept's p' of several concepts in one prompt (at most 75
        tokens; concept_prompts.several_concepts_plan). Raises PromptError."""
        return several_concepts_plan(self.tokenizers[0], text, words)

    def concept_positions(self, plan: SwapPlan, positions: list[int]) -> SwapPlan:
        """A concept's plan with the swapped positions of p chosen by hand (any of p's; p' is read at
        the same ones). Raises PromptError."""
        return positions_plan(plan.target, plan.source, positions)

    def swap_plan(self, text: str, swaps: list, long: str = "segments") -> SwapPlan:
        """Word and position swaps (target, source) as p, p' and the rows written. Raises PromptError."""
        return word_swap_plan(self.tokenizers[0], text, swaps, long)

    # ---------------------------------------------------------------- text

    def stack(self, concept) -> list:
        """The text encoders a row's prompt goes through: a fine-tune's own copies, else the model's."""
        return list(concept.text_encoders) if concept is not None and concept.text_encoders else self.text_encoders

    @torch.no_grad()
    def encode(self, prompts: list[Prompt], concept) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Prompts of one segment each, through `concept`'s text stack as one batch per encoder:
        hidden states (prompts, tokens, dim) and, for SDXL, each prompt's projected pooled
        embedding (else None). `concept` also gives the vectors of prompts that hold its tokens."""
        hidden, pooled = [], None
        for i, (tok, te) in enumerate(zip(self.tokenizers, self.stack(concept))):
            ids = torch.tensor([padded(p, tok) for p in prompts], device=self.device)
            vectors, mask = concept_vectors(ids, prompts, concept, i)
            out = encode(te, ids, vectors, mask, penultimate=self.pooled)
            hidden.append(out.hidden)
            if self.pooled and i == 1:
                # projected one prompt at a time (a batched matmul rounds differently)
                pooled = [te.text_projection(out.pooled[j: j + 1])[0] for j in range(len(prompts))]
        return torch.cat(hidden, dim=-1), pooled or [None] * len(prompts)

    def empty(self, concept) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(hidden, pooled) of the unconditional branch through `concept`'s text stack, and the
        padding vector of long prompts (the mean of the empty prompt's padding states). Encoded
        once per text stack, device and dtype, and kept (the encoders are read-only)."""
        stack = self.stack(concept)
        first = next(stack[0].parameters())
        key = (tuple(map(id, stack)), first.device, first.dtype)
        kept = self._empty.get(key)
        if kept is not None and kept[0]() is stack[0]:  # the same encoder, not a new one at a reused id
            return kept[1]
        empty = tokenize(self.tokenizers[0], "")
        hidden, pooled = self.encode([empty], concept)
        hidden, pooled = hidden[0], pooled[0]
        pad = hidden[len(empty.ids):].mean(0)
        if self.pooled and self.zeros_for_empty_prompt:
            hidden, pooled = torch.zeros_like(hidden), torch.zeros_like(pooled)
        for k in [k for k, v in self._empty.items() if v[0]() is None]:  # encoders gone with their concept
            del self._empty[k]
        self._empty[key] = (weakref.ref(stack[0]), (hidden, pooled, pad))
        return hidden, pooled, pad

    def added_conditions(self, pooled: list[torch.Tensor | None], size: int, dtype) -> dict | None:
        """SDXL's added conditions for a batch whose rows have these pooled embeddings, at `size` px
        (original and target size, no crop); None for SD 1.x / 2.x."""
        if not self.pooled:
            return None
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=self.device, dtype=dtype)
        return {"text_embeds": torch.stack(pooled), "time_ids": time_ids.repeat(len(pooled), 1)}

    # ---------------------------------------------------------------- denoising

    def scheduler(self, class_name: str):
        import diffusers

        return getattr(diffusers, class_name).from_config(self.scheduler_config)

    def initial_latent(self, seed: int, size: int) -> torch.Tensor:
        """(1, C, h, w) standard normal from a CPU generator seeded with `seed`, as diffusers draws it."""
        side = size // self.vae_scale
        g = torch.Generator("cpu").manual_seed(seed)
        return torch.randn((1, self.unet.config.in_channels, side, side), generator=g)

    def predict(self, denoiser, x, t, hidden, added, state=None) -> torch.Tensor:
        """The denoiser's output for latents `x` at timestep(s) `t`; `state` is the request's
        CallState for the attention processors (None: plain attention)."""
        kwargs = {"alignit": state} if state is not None else None
        return denoiser(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added,
                        cross_attention_kwargs=kwargs).sample

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor
        x = vae.decode(z).sample.float()
        x = ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in x]

    # ---------------------------------------------------------------- the MI score (scores.py)

    def noising(self) -> Noising:
        """The DDPM forward process the model was trained with (for the MI score)."""
        return Noising.of_scheduler(self.scheduler_config)

    def token_rows(self, prompt: Prompt, position: int) -> list[int]:
        """The conditioning rows that carry token `position` of `prompt` (per-token MI removes them)."""
        return [position]

    def score_output(self, x, t, hidden, pooled: list) -> torch.Tensor:
        """The denoiser's output for the MI score: latents `x` (b, C, h, w) at the process's timesteps
        `t` (b,), conditioned on `hidden` (b, tokens, dim) and `pooled` (b entries, None on SD 1.x / 2.x);
        plain attention."""
        added = self.added_conditions(pooled, x.shape[-1] * self.vae_scale, hidden.dtype)
        return self.predict(self.unet, x, t, hidden, added)
