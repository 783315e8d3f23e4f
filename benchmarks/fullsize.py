"""Random-weight Stable Diffusion 1.5 and SDXL pipelines built from their published config values.

Weights do not change speed or memory, so a GPU benchmark needs no download. The values are those
of `stable-diffusion-v1-5/stable-diffusion-v1-5` and `stabilityai/stable-diffusion-xl-base-1.0`
(unet/, vae/, text_encoder/, text_encoder_2/ config.json); the tokenizer is the real CLIP BPE one
shipped in assets/.
"""
from __future__ import annotations

import torch

from alignit_core.testing import clip_tokenizer


def _clip_l():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                          projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)


def _vae(sample_size: int, scaling: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                         layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=sample_size,
                         scaling_factor=scaling, force_upcast=False)


def sd15(device: str = "cpu", dtype=torch.float32, seed: int = 0):
    """StableDiffusionPipeline with SD 1.5's architecture (860 M UNet parameters), random weights."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                                    block_out_channels=(320, 640, 1280, 1280),
                                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                                    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
        vae = _vae(512, 0.18215)
        te = CLIPTextModel(_clip_l())
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=clip_tokenizer(), unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe.to(device, dtype)


def sdxl(device: str = "cpu", dtype=torch.float32, seed: int = 0):
    """StableDiffusionXLPipeline with SDXL base's architecture (2.6 B UNet parameters), random weights."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    big_g = CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                           num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                           projection_dim=1280, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                                    block_out_channels=(320, 640, 1280),
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                                    cross_attention_dim=2048, use_linear_projection=True,
                                    addition_embed_type="text_time", addition_time_embed_dim=256,
                                    projection_class_embeddings_input_dim=2816, norm_num_groups=32)
        vae = _vae(1024, 0.13025)
        te = CLIPTextModel(_clip_l())
        te2 = CLIPTextModelWithProjection(big_g)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=clip_tokenizer(),
                                     tokenizer_2=clip_tokenizer(pad="!"), unet=unet, scheduler=sched)
    return pipe.to(device, dtype)
