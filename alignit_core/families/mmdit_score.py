"""What the MI score asks of SD3 and Flux: RFMI (Wang et al., "RFMI: Estimating Mutual Information on
Rectified Flow for Text-to-Image Alignment", arXiv 2503.14358) with the engine's estimator (scores.py).

    family.noising()                       # RectifiedFlow: z_σ = (1−σ) z0 + σ ε, the model predicts v = ε − z0
    family.encode(prompts, None)           # the joint text rows and pooled vector, as the pipeline encodes them
    family.score_output(x, σ, hidden, pooled)   # the transformer's velocity on the latent grid

The estimator integrates (1−σ)/σ · (‖v − v̂(z_σ, ∅)‖² − ‖v − v̂(z_σ, p)‖²) over σ (noising.py says
why). Everything here is the pipelines' own arithmetic: the prompt's rows as their encoders make them
(`text_tokens` T5 rows, as a generation reads them), the timestep as their loops feed it (SD3 σ·1000,
Flux σ), Flux's latents packed in 2x2 tokens with their image ids.

**The unconditional branch.** SD3's is its classifier-free guidance's: the empty prompt (CLIP-L,
CLIP-G and T5 states of "", and their pooled vector). Flux-dev is guidance-distilled: one pass
predicts the guided velocity v(∅) + g·(v(p) − v(∅)) for the guidance g it is given, and there is no
unconditional pass of its own. Read at g = 1 (`SCORE_GUIDANCE`) that is v(p), the plain conditional
velocity, and the same pass on the empty prompt is v(∅); so both branches are Flux's one pass at
g = 1, on p and on "" (T5 rows and CLIP pooled vector of ""). A Flux without a guidance input
(schnell) takes no g.

**Per-token MI** removes a token by writing the empty prompt's rows over its rows: on Flux its T5
rows; on SD3 its CLIP row and, with T5, the T5 rows of the same word (else T5 still reads the word).
"""
from __future__ import annotations

import torch

from ..errors import ConceptError
from ..prompts import Prompt
from .mmdit import MMDiTModel, tables
from .mmdit_loop import pack, packed_ids, unpack
from .mmdit_text import CLIP_ROWS

SCORE_GUIDANCE = 1.0  # Flux-dev's distilled guidance while scoring: g = 1 is the conditional velocity itself


class MMDiTScoring:
    """The text conditions and velocity predictions of one SD3 / Flux pipeline, for the MI score."""

    def __init__(self, mmdit: MMDiTModel):
        self.mmdit = mmdit
        self.rows = mmdit.text_rows  # T5 rows: as `generate_rows` reads a prompt by default

    def encode(self, prompts: list[Prompt], concept=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(joint text rows (prompts, tokens, dim), pooled vectors) of each prompt, the base model's
        encoders. Raises ConceptError for a concept (the score reads the base model)."""
        if concept is not None:
            raise ConceptError("on SD3 and Flux the MI score reads the base model's text encoders only")
        encoded = [self.mmdit.encode(p.text, self.rows) for p in prompts]
        return torch.cat([hidden for hidden, _ in encoded]), [pooled[0] for _, pooled in encoded]

    def empty(self, concept=None) -> tuple[torch.Tensor, torch.Tensor, None]:
        """(rows, pooled vector) of the empty prompt: the unconditional branch (SD3's CFG branch; Flux's
        one pass on "", see the module's docstring); no long-prompt padding (a prompt is read whole)."""
        if concept is not None:
            raise ConceptError("on SD3 and Flux the MI score reads the base model's text encoders only")
        hidden, pooled = self.mmdit.uncond(self.rows)
        return hidden[0], pooled[0], None

    def token_rows(self, prompt: Prompt, position: int) -> list[int]:
        """The joint text rows that carry token `position` of `prompt` (its primary table): the token's
        own row and, on SD3 with T5, the T5 rows of its word."""
        _, t5 = tables(self.mmdit, prompt.text, self.rows)
        if t5 is None:
            return [position]
        return [position] + [CLIP_ROWS + q for q in t5.of_word(prompt.tokens[position].word_index)]

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, hidden: torch.Tensor, pooled: list) -> torch.Tensor:
        """The velocity (b, C, h, w) the transformer predicts for latents `x` (b, C, h, w) at noise levels
        `sigma` (b,), conditioned on `hidden` (b, tokens, dim) and `pooled` (b vectors)."""
        transformer = self.mmdit.transformer
        pooled = torch.stack(pooled)
        if self.mmdit.family == "sd3":
            return transformer(hidden_states=x, timestep=(sigma * 1000).to(x.dtype), encoder_hidden_states=hidden,
                               pooled_projections=pooled, return_dict=False)[0]
        half = x.shape[-1] // 2
        guidance = torch.full([x.shape[0]], SCORE_GUIDANCE, device=x.device, dtype=torch.float32) \
            if transformer.config.guidance_embeds else None
        out = transformer(hidden_states=pack(x), timestep=sigma.to(x.dtype), guidance=guidance,
                          pooled_projections=pooled, encoder_hidden_states=hidden,
                          txt_ids=torch.zeros(hidden.shape[1], 3, device=x.device, dtype=x.dtype),
                          img_ids=packed_ids(half, x.device, x.dtype), return_dict=False)[0]
        return unpack(out, half)


def on_grid(kind: str, latent: torch.Tensor) -> torch.Tensor:
    """One row's final latent (C, h, w) as the engine keeps it: Flux's packed (tokens, 4C) unpacked."""
    if kind != "flux":
        return latent
    return unpack(latent.unsqueeze(0), round(latent.shape[0] ** 0.5))[0]
