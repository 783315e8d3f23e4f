"""Random-weight tiny pipelines built from configs, for tests and benchmarks; nothing is downloaded.

SD 1.x and SDXL (`build_tiny_sd`, `build_tiny_sdxl`) use the project's CLIP BPE tokenizer
(assets/clip-tokenizer), so prompt positions behave as in SD 1.5, and a VAE with scale factor 8 like
the real ones. Each builder seeds torch first, so every call gives the same weights.

SD3 and Flux (`tiny_sd3`, `tiny_flux`) use the same CLIP tokenizer; their T5 tokenizer is built here in code (no T5 tokenizer files ship with transformers or are
cached on the build machines, and `sentencepiece` is not installed). It is a Unigram model over
T5's special tokens, the whole English words of CLIP's vocabulary (the first `T5_WORDS` in merge
order, i.e. the most frequent) and single characters as a fallback, pre-tokenized like T5
(whitespace split, "▁" word marks). It reads English prompts word by word, as T5's SentencePiece
model does for common words; it is not T5's real vocabulary.

`full=True` builds the real architectures (SD3.5-medium, Flux-dev and their text encoders) from
configs with random weights, for GPU benchmarks; they are large (Flux-dev ~12B + T5-XXL ~4.7B
parameters), so build them only on a machine with the memory.
"""
from __future__ import annotations

import json
import string
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


# ------------------------------------------------------------------------------ SD3 and Flux

T5_WORDS = 3000  # whole words in the tiny T5 vocabulary
T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5


def t5_tokenizer():
    """A T5 tokenizer (Unigram, fast) built in code; see the module docstring."""
    from transformers import T5Tokenizer

    vocab = json.loads((TOKENIZER / "vocab.json").read_text())
    words = [w[:-4] for w, _ in sorted(vocab.items(), key=lambda kv: kv[1])
             if w.endswith("</w>") and w[:-4].isascii() and w[:-4].isalpha() and len(w) > 5][:T5_WORDS]
    pieces = [(s, 0.0) for s in T5_SPECIALS] + [("▁", -3.0)]
    # more frequent words score higher; any word beats its spelling (characters score -10 each)
    pieces += [("▁" + w, -2.0 - k / len(words)) for k, w in enumerate(words)]
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces += [("▁" + c, -9.0) for c in chars if "▁" + c not in dict(pieces)]
    pieces += [(c, -10.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _clip_encoder(with_projection: bool, hidden: int, layers: int, heads: int, seed: int, full_dims=None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    dims = full_dims or dict(hidden_size=hidden, intermediate_size=2 * hidden + 5, num_hidden_layers=layers,
                             num_attention_heads=heads, projection_dim=hidden)
    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                            pad_token_id=49407, hidden_act="gelu" if full_dims is None else "quick_gelu", **dims)
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def _t5_encoder(d_model: int, seed: int, full: bool = False, vocab_size: int | None = None):
    from transformers import T5Config, T5EncoderModel

    if full:  # T5 v1.1 XXL's encoder
        config = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                          feed_forward_proj="gated-gelu", dropout_rate=0.0)
    else:
        config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model + 3, num_layers=2,
                          num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                          feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                          decoder_start_token_id=0)
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def _mmdit_vae(latent_channels: int, seed: int, full: bool = False, sd3: bool = True):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    if full:
        return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                             layers_per_block=2, norm_num_groups=32, sample_size=1024, use_quant_conv=False,
                             use_post_quant_conv=False, shift_factor=0.0609 if sd3 else 0.1159,
                             scaling_factor=1.5305 if sd3 else 0.3611).eval()
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=4, sample_size=32, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035).eval()


def tiny_sd3(t5: bool = False, seed: int = 0, full: bool = False, dtype=torch.float32, device="cpu"):
    """A StableDiffusion3Pipeline: CLIP-L and CLIP-G (with projection), optionally T5, a transformer
    with QK-RMSNorm and a dual-attention (SD3.5) first block, a flow-matching scheduler. Tiny: 32 px
    images, 8x8 image tokens, 3 joint blocks. `full`: SD3.5-medium's shapes (1024 px), always with
    T5. Weights are made on `device` (a full-size model is best made on the GPU), then cast to `dtype`."""
    with torch.device(device):
        return _ready(_sd3(t5, seed, full), dtype)


def tiny_flux(seed: int = 0, full: bool = False, dtype=torch.float32, device="cpu"):
    """A FluxPipeline (guidance-distilled, like Flux-dev): a tiny CLIP for the pooled vector, a tiny
    T5 for the text tokens, 2 joint + 2 single-stream blocks, 32 px images (8x8 image tokens).
    `full`: Flux-dev's shapes (1024 px)."""
    with torch.device(device):
        return _ready(_flux(seed, full), dtype)


def _ready(pipe, dtype):
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def _sd3(t5: bool, seed: int, full: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    t5 = t5 or full
    if full:
        clip_l = _clip_encoder(True, 0, 0, 0, seed, dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                        num_attention_heads=12, projection_dim=768))
        clip_g = _clip_encoder(True, 0, 0, 0, seed + 1, dict(hidden_size=1280, intermediate_size=5120,
                                                            num_hidden_layers=32, num_attention_heads=20,
                                                            projection_dim=1280))
        torch.manual_seed(seed + 2)
        transformer = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                                            attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                            caption_projection_dim=1536, pooled_projection_dim=2048,
                                            out_channels=16, pos_embed_max_size=384, qk_norm="rms_norm",
                                            dual_attention_layers=tuple(range(13)))
        te3 = _t5_encoder(0, seed + 3, full=True)
    else:
        clip_l = _clip_encoder(True, 32, 2, 4, seed)
        clip_g = _clip_encoder(True, 32, 2, 4, seed + 1)
        torch.manual_seed(seed + 2)
        transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=3,
                                            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                            caption_projection_dim=32, pooled_projection_dim=64, out_channels=4,
                                            pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,))
        te3 = _t5_encoder(64, seed + 3, vocab_size=len(t5_tokenizer())) if t5 else None
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_mmdit_vae(4, seed + 4, full=full), text_encoder=clip_l, tokenizer=clip_tokenizer(),
        text_encoder_2=clip_g, tokenizer_2=clip_tokenizer(),
        text_encoder_3=te3, tokenizer_3=t5_tokenizer() if t5 else None)
    return pipe


def _flux(seed: int, full: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    if full:
        clip = _clip_encoder(False, 0, 0, 0, seed, dict(hidden_size=768, intermediate_size=3072,
                                                       num_hidden_layers=12, num_attention_heads=12,
                                                       projection_dim=768))
        t5 = _t5_encoder(0, seed + 1, full=True)
        torch.manual_seed(seed + 2)
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                             attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                             pooled_projection_dim=768, guidance_embeds=True,
                                             axes_dims_rope=(16, 56, 56))
    else:
        clip = _clip_encoder(False, 32, 2, 4, seed)
        t5 = _t5_encoder(32, seed + 1, vocab_size=len(t5_tokenizer()))
        torch.manual_seed(seed + 2)
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                             pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer.eval(), scheduler=scheduler, vae=_mmdit_vae(4, seed + 3, full, sd3=False),
                        text_encoder=clip, tokenizer=clip_tokenizer(), text_encoder_2=t5,
                        tokenizer_2=t5_tokenizer())
    return pipe


def perturbed_copy(module: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> torch.nn.Module:
    """A copy of `module` with every weight moved by Gaussian noise: a stand-in for a customized
    (fine-tuned) text branch or text encoder in tests."""
    import copy

    out = copy.deepcopy(module)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale * (p.float().std().item() or 1.0))
    return out
