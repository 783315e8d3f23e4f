"""Random-weight tiny SD 1.x and SDXL pipelines built from configs, for tests and benchmarks; no hub.

They use the project's CLIP BPE tokenizer (assets/clip-tokenizer), so prompt positions behave as
in SD 1.5, and a VAE with scale factor 8 like the real ones. Each builder seeds torch first, so
every call gives the same weights.
"""
from __future__ import annotations

from pathlib import Path

import torch

TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "clip-tokenizer"


def clip_tokenizer(pad: str | None = None):
    """The CLIP BPE tokenizer of SD 1.x and SDXL (77 positions); `pad` replaces its padding token,
    as SDXL's second tokenizer pads with '!'."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(TOKENIZER, model_max_length=77)
    if pad:
        tok.pad_token = pad
    return tok


def _text_config(hidden: int, projection: bool = False):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                          eos_token_id=49407, pad_token_id=49407, projection_dim=hidden if projection else 512)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                         layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=64)


def build_tiny_sd():
    """A StableDiffusionPipeline with a 32-wide text encoder and 64-pixel images, DDIM."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=2, norm_num_groups=8)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=CLIPTextModel(_text_config(32)),
                                   tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                           beta_end=0.012, clip_sample=False, set_alpha_to_one=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe


def build_tiny_sdxl():
    """A StableDiffusionXLPipeline with two 32-wide text encoders (64 wide together), Euler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=2, norm_num_groups=8, transformer_layers_per_block=(1, 1),
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=6 * 8 + 32, use_linear_projection=True)
    return StableDiffusionXLPipeline(vae=_vae(), text_encoder=CLIPTextModel(_text_config(32)),
                                     text_encoder_2=CLIPTextModelWithProjection(_text_config(32, projection=True)),
                                     tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(pad="!"), unet=unet,
                                     scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                                      beta_end=0.012))
