"""The exported embedded model's parts, sampled directly from conditioning rows.

The training's checks and `scripts/concept_rows.py` condition the UNet with rows they build
themselves (a concept's row spliced into a base prompt's), so they bypass the pipeline: a plain
DDIM loop with classifier-free guidance on Stable Diffusion's own noise schedule.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel

from ..encoding import encode
from .shapes import to_uint8

MAX_LEN = 77


def noise_schedule() -> dict:
    # Stable Diffusion's own schedule, so schedulers configured for SD behave the same here.
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


@torch.no_grad()
def sample(vae, unet, te, scale, cond: torch.Tensor, guidance: float, seed: int, steps: int = 20):
    """A plain DDIM loop with classifier-free guidance from conditioning rows (n, 77, dim) to
    uint8 images (n, H, W, 3); the unconditional rows are the empty prompt's through `te` (a
    customized text encoder's for a customized prompt, as the engine encodes them)."""
    n, device = cond.shape[0], cond.device
    sched = DDIMScheduler(**noise_schedule())
    sched.set_timesteps(steps)
    c = te.config
    empty = [c.bos_token_id, c.eos_token_id] + [c.pad_token_id] * (MAX_LEN - 2)  # the empty prompt's ids
    uncond = encode(te, torch.tensor([empty] * n, device=device)).hidden
    z = torch.randn((n, 4, 16, 16), generator=torch.Generator(device).manual_seed(seed), device=device)
    for t in sched.timesteps:
        eu, ec = unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
        z = sched.step(eu + guidance * (ec - eu), t, z).prev_sample
    return to_uint8(vae.decode(z / scale).sample.float())


def load_exported(folder: Path, device):
    """(vae, unet, text encoder, latent scale) of an exported model folder, fp32, in eval mode."""
    vae = AutoencoderKL.from_pretrained(folder / "vae", dtype=torch.float32).to(device)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", dtype=torch.float32).to(device)
    te = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32).to(device)
    vae.eval().requires_grad_(False)
    return vae, unet.eval(), te.eval(), vae.config.scaling_factor
