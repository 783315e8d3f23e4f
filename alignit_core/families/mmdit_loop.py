"""The denoising loops of SD3 and Flux, written out op for op as their pipelines run them
(`pipe(...)` keeps per-call state; a demo serves several people at once), and the decoding of one
row at a time (a CPU VAE batch of identical latents can decode 1e-6 apart row to row).

`model` is an `MMDiTModel` (mmdit.py), `transformer` the request's view of its transformer (the
model's own, or one in which a customized row's layers carry a LoRA on that row's batch rows),
`state` the request's `MMDiTState`; `progress(done, total)`, if given, is called after each step.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def initial_latent(channels: int, side: int, seed: int, dtype, device) -> torch.Tensor:
    """The seed's latent, drawn as the pipelines draw it from a CPU generator (1, C, side, side)."""
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor((1, channels, side, side), generator=torch.Generator("cpu").manual_seed(seed),
                        device=device, dtype=dtype)


def pack(z: torch.Tensor) -> torch.Tensor:
    """Flux's packing: latents (b, C, h, w) as 2x2 patches, one token each: (b, h/2 * w/2, 4C)."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(latents: torch.Tensor, half: int) -> torch.Tensor:
    """`pack` undone for a square grid of `half` x `half` tokens: (b, half^2, 4C) -> (b, C, 2 half, 2 half)."""
    b, n, c = latents.shape
    latents = latents.view(b, half, half, c // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, c // 4, 2 * half, 2 * half)


def packed_ids(half: int, device, dtype) -> torch.Tensor:
    """(half^2, 3) Flux's image ids: (0, row, column) of each packed token."""
    ids = torch.zeros(half, half, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(half)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(half)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def denoise_sd3(model, transformer, state, hidden, pooled, r, cfg, s, progress=None):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

    pipe = model.pipe
    side = s.size // pipe.vae_scale_factor
    latents = initial_latent(transformer.config.in_channels, side, s.seed, hidden.dtype, hidden.device)
    latents = latents.repeat(r, 1, 1, 1)
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    kwargs = {}
    if sched.config.get("use_dynamic_shifting", None):
        patch = transformer.config.patch_size
        c = sched.config
        kwargs["mu"] = calculate_shift((side // patch) ** 2, c.get("base_image_seq_len", 256),
                                       c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5),
                                       c.get("max_shift", 1.16))
    timesteps, _ = retrieve_timesteps(sched, s.steps, hidden.device, **kwargs)
    for i, t in enumerate(timesteps):
        state.begin_step(i)
        x = torch.cat([latents] * 2) if cfg else latents
        noise = transformer(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=hidden,
                            pooled_projections=pooled, joint_attention_kwargs={"alignit": state}, return_dict=False)[0]
        if cfg:
            uncond, cond = noise.chunk(2)
            noise = uncond + s.guidance * (cond - uncond)
        latents = sched.step(noise, t, latents, return_dict=False)[0]
        if progress is not None:
            progress(i + 1, s.steps)
    return latents


def denoise_flux(model, transformer, state, hidden, pooled, r, cfg, s, progress=None):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    pipe = model.pipe
    side = 2 * (s.size // (pipe.vae_scale_factor * 2))
    channels = transformer.config.in_channels // 4
    z = initial_latent(channels, side, s.seed, hidden.dtype, hidden.device)
    latents = pack(z).repeat(r, 1, 1)
    image_ids = packed_ids(side // 2, hidden.device, hidden.dtype)
    text_ids = torch.zeros(hidden.shape[1], 3).to(device=hidden.device, dtype=pipe.text_encoder.dtype)
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sigmas = None if sched.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / s.steps, s.steps)
    c = sched.config
    mu = calculate_shift(latents.shape[1], c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                         c.get("base_shift", 0.5), c.get("max_shift", 1.15))
    timesteps, _ = retrieve_timesteps(sched, s.steps, hidden.device, sigmas=sigmas, mu=mu)
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.full([1], s.guidance, device=hidden.device, dtype=torch.float32).expand(r)
    sched.set_begin_index(0)
    for i, t in enumerate(timesteps):
        state.begin_step(i)
        timestep = t.expand(r).to(latents.dtype)
        noise = transformer(hidden_states=latents, timestep=timestep / 1000, guidance=guidance,
                            pooled_projections=pooled, encoder_hidden_states=hidden, txt_ids=text_ids,
                            img_ids=image_ids, joint_attention_kwargs={"alignit": state}, return_dict=False)[0]
        latents = sched.step(noise, t, latents, return_dict=False)[0]
        if progress is not None:
            progress(i + 1, s.steps)
    return latents


def decode(model, latents: torch.Tensor, size: int) -> Image.Image:
    """One row's latent -> PIL image, as the pipeline decodes (one row at a time)."""
    pipe = model.pipe
    if model.family == "flux":
        latents = unpack(latents, size // (pipe.vae_scale_factor * 2))
    z = (latents / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
    image = pipe.vae.decode(z.to(pipe.vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pil")[0]
