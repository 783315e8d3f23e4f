"""Load a pipeline (hub id, local diffusers folder, or the embedded model) and install AlignIT.

`auto` takes Stable Diffusion 1.5 when it is in the local cache (or downloadable), else the
embedded model, and says which it chose. CUDA -> fp16, otherwise fp32. The AlignIT attention
processor is installed once here on every attention module; nothing is changed afterwards.
"""
from __future__ import annotations

import functools
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .attention import install
from .errors import ModelError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
EMBEDDED = ASSETS / "embedded-shapes"
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
MAP_BLOCKS = ("down", "mid", "up")  # the UNet's parts whose cross-attention layers can record maps
HUB_TIMEOUT_S = 3.0  # one answer from the hub within this, or the process treats it as offline
log = logging.getLogger(__name__)


def block_of(layer: str) -> str:
    """"down", "mid" or "up": the part of the UNet a layer name (`up_blocks.1.attentions...`) lies in."""
    return layer.split("_", 1)[0]


@functools.cache
def hub_reachable() -> bool:
    """Whether the Hugging Face hub answers, asked once per process. `HF_HUB_OFFLINE=1` says no
    without asking; otherwise one HTTP request with a short timeout (proxy settings honoured).
    Loading with `local_files_only` when it does not answer spares the hub client's retries: a
    machine without network spent 47 s on them before CLIP was reported missing."""
    import huggingface_hub.constants as hub

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        urllib.request.urlopen(urllib.request.Request(hub.ENDPOINT, method="HEAD"), timeout=HUB_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return True  # it answered, even if not with 200
    except (OSError, ValueError):
        return False
    return True


@dataclass(eq=False)
class Model:
    """The parts of a Stable Diffusion pipeline the engine uses, read-only after loading."""

    name: str  # shown to people; concept manifests name their model by it
    source: str  # what load_model() takes to load it again ("embedded", a folder, a hub id)
    tokenizers: list
    text_encoders: list
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler_config: dict
    scheduler_name: str
    is_xl: bool
    device: torch.device
    dtype: torch.dtype
    force_zeros_for_empty_prompt: bool = False
    chosen_because: str = ""
    cross_attention_layers: dict = field(default_factory=dict)  # attn2 module name -> Attention
    accelerations: tuple[str, ...] = ()  # what accelerate() turned on
    empty_encodings: dict = field(default_factory=dict, repr=False)  # the empty prompt per text stack

    @property
    def tokenizer(self):
        return self.tokenizers[0]

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

    @property
    def is_embedded(self) -> bool:
        return self.name == EMBEDDED.name

    def layer_side(self, name: str, size: int) -> int:
        """Side length of cross-attention layer `name`'s maps for an image of `size` pixels."""
        latent = size // self.vae_scale
        n_down = len(self.unet.config.block_out_channels) - 1
        if name.startswith("mid_block"):
            return latent // 2 ** n_down
        i = int(name.split(".")[1])
        return latent // 2 ** (i if name.startswith("down_blocks") else n_down - i)

    def attention_resolutions(self, size: int) -> list[int]:
        """Side lengths of the cross-attention maps for an image of `size` pixels."""
        return sorted({self.layer_side(name, size) for name in self.cross_attention_layers})

    def map_layers(self, side: int, size: int, blocks=MAP_BLOCKS) -> list[str]:
        """The cross-attention layers whose maps are `side` x `side` at `size` px, in the UNet's
        `blocks` (down, mid, up)."""
        return [name for name in self.cross_attention_layers
                if self.layer_side(name, size) == side and block_of(name) in blocks]

    def default_map_resolution(self, size: int) -> int:
        """The cross-attention resolution nearest max(16, latent/4): 16x16 for SD 1.x at 512 px,
        32x32 for SDXL at 1024 px, 16x16 for the embedded model."""
        target = max(16, size // self.vae_scale // 4)
        return min(self.attention_resolutions(size), key=lambda s: (abs(s - target), -s))


def _device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _from_pipeline(pipe, name: str, source: str, device: torch.device, dtype: torch.dtype, because: str) -> Model:
    is_xl = getattr(pipe, "text_encoder_2", None) is not None
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if is_xl else [])
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if is_xl else [])
    for m in encoders + [pipe.unet, pipe.vae]:
        m.to(device).eval().requires_grad_(False)
    layers = install(pipe.unet)
    # `_use_default_values` would make from_config() drop values a pipeline fixed after loading
    # (e.g. SD's steps_offset=1), so the scheduler we build per request would differ from pipe's.
    scheduler_config = {k: v for k, v in pipe.scheduler.config.items() if k != "_use_default_values"}
    return Model(name, source, tokenizers, encoders, pipe.unet, pipe.vae, scheduler_config,
                 type(pipe.scheduler).__name__, is_xl, device, dtype,
                 bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False)), because, layers)


def load_model(name: str = "auto", device: str | None = None, dtype: torch.dtype | None = None) -> Model:
    """Load `name`: "auto", "embedded", a local diffusers folder or a hub id. Raises ModelError."""
    from diffusers import DiffusionPipeline

    dev = _device(device)
    dtype = dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
    offline = not hub_reachable()
    if name == "auto":
        try:
            pipe = DiffusionPipeline.from_pretrained(SD15, torch_dtype=dtype, local_files_only=True,
                                                     safety_checker=None, requires_safety_checker=False)
            return _from_pipeline(pipe, SD15, SD15, dev, dtype, f"auto: {SD15} found in the local cache")
        except Exception:
            if not offline:
                try:
                    pipe = DiffusionPipeline.from_pretrained(SD15, torch_dtype=dtype, safety_checker=None,
                                                             requires_safety_checker=False)
                    return _from_pipeline(pipe, SD15, SD15, dev, dtype, f"auto: downloaded {SD15}")
                except Exception as e:
                    log.info("auto: %s not reachable (%s)", SD15, type(e).__name__)
        model = load_model("embedded", device, dtype)
        model.chosen_because = f"auto: {SD15} is not available here, using the embedded offline model"
        log.info(model.chosen_because)
        return model
    if name in ("embedded", EMBEDDED.name):
        path, because = EMBEDDED, "embedded offline model"
        if not (path / "model_index.json").exists():
            raise ModelError(f"the embedded model is missing from {path}")
    else:
        path, because = Path(name), f"local folder {name}"
        if not path.is_dir():
            path, because = name, f"hub id {name}"
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, local_files_only=offline,
                                                 safety_checker=None, requires_safety_checker=False)
    except Exception as e:
        if isinstance(path, str) and offline:
            raise ModelError(f"model {name!r} is not available offline (no local copy; the hub is not "
                             f"reachable). Use --model embedded or a local diffusers folder") from None
        raise ModelError(f"model {name!r} could not be loaded: {type(e).__name__}: {str(e)[:200]}") from None
    if not hasattr(pipe, "unet") or not hasattr(pipe, "text_encoder"):
        raise ModelError(f"{name!r} is not a Stable Diffusion pipeline (it has no UNet and text encoder)")
    label = path.name if isinstance(path, Path) else name  # a folder is named by its last part
    return _from_pipeline(pipe, label, "embedded" if path == EMBEDDED else str(name), dev, dtype, because)


def from_components(pipe, name: str = "custom") -> Model:
    """Wrap an already built diffusers pipeline (tests build tiny ones from configs)."""
    dev = pipe.unet.device
    return _from_pipeline(pipe, name, name, dev, pipe.unet.dtype, "built in memory")


def accelerate(model: Model, compile: bool = False, channels_last: bool = False,
               backend: str = "inductor") -> Model:
    """Optional speed-ups, turned on once after loading and before serving: the channels-last
    memory layout for the UNet's convolutions, and `torch.compile` of the UNet. The request-specific
    part of each cross-attention layer (K/V writes, map recording) stays eager, so compiled graphs
    never specialise on a request: the first call compiles (minutes on a CPU), later calls with
    other prompts, swaps and concepts reuse the graphs. Images match eager ones within 1/255."""
    on = list(model.accelerations)
    if channels_last and "channels_last" not in on:
        model.unet.to(memory_format=torch.channels_last)
        on.append("channels_last")
    if compile and not any(a.startswith("compile") for a in on):
        model.unet.compile(backend=backend)
        on.append(f"compile:{backend}")
    model.accelerations = tuple(on)
    return model
