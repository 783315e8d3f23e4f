"""Fixtures: tiny random-weight SD 1.x / SDXL pipelines built from configs, and the embedded model.

Tiny pipelines use the real CLIP BPE tokenizer (assets/clip-tokenizer) so positions behave as in
SD 1.5, and a VAE with scale factor 8 like the real ones.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Idle OpenMP threads sleep instead of spinning: with two generations (or processes) sharing two cores,
# spinning threads made one text encoding take 450 ms instead of 1.5 ms. Read when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "assets" / "clip-tokenizer"


def _tokenizer(pad: str | None = None):
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
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=2, norm_num_groups=8)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=CLIPTextModel(_text_config(32)), tokenizer=_tokenizer(),
                                   unet=unet, scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                                      beta_end=0.012, clip_sample=False,
                                                                      set_alpha_to_one=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe


def build_tiny_sdxl():
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
                                     tokenizer=_tokenizer(), tokenizer_2=_tokenizer(pad="!"), unet=unet,
                                     scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                                      beta_end=0.012))


@pytest.fixture(scope="session")
def tiny_sd():
    from alignit_core.models import from_components

    return from_components(build_tiny_sd(), "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sdxl():
    from alignit_core.models import from_components

    return from_components(build_tiny_sdxl(), "tiny-sdxl")


@pytest.fixture(scope="session")
def embedded():
    from alignit_core import load_model

    return load_model("embedded", device="cpu")


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """The tiny SD pipeline saved as a diffusers folder, for the CLI."""
    d = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_sd().save_pretrained(d)
    return d


def run_at_once(jobs: list) -> list:
    """Call every job in its own thread, all starting together; their results in order."""
    import threading

    results, barrier = [None] * len(jobs), threading.Barrier(len(jobs))

    def run(i):
        barrier.wait()
        results[i] = jobs[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results
