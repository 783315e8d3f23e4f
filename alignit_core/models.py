"""Load a pipeline (hub id, local diffusers folder, or the embedded model) and install AlignIT.

`auto` takes Stable Diffusion 1.5 when it is in the local cache (or downloadable), else the
embedded model, and says which it chose. CUDA -> fp16, otherwise fp32. The AlignIT attention
processor is installed once here on every attention module; nothing is changed afterwards.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelError
from .families import EMBEDDED_DEFAULTS, EMBEDDED_MMDIT_DEFAULTS, UNetFamily, family_for

ASSETS = Path(__file__).resolve().parents[1] / "assets"
EMBEDDED = ASSETS / "embedded-shapes"
EMBEDDED_MMDIT = ASSETS / "embedded-mmdit"  # an SD3 pipeline on the same world (scripts/train_mmdit.py)
EMBEDDED_NAMES = {"embedded": EMBEDDED, EMBEDDED.name: EMBEDDED, EMBEDDED_MMDIT.name: EMBEDDED_MMDIT}
_EMBEDDED_DEFAULTS = {EMBEDDED.name: EMBEDDED_DEFAULTS, EMBEDDED_MMDIT.name: EMBEDDED_MMDIT_DEFAULTS}  # by name
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
HUB_TIMEOUT_S = 3.0  # one answer from the hub within this, or the process treats it as offline
log = logging.getLogger(__name__)
# Loading a pipeline, diffusers looks up the image-processor classes of every pipeline it knows; without
# torchvision (not needed here) transformers warns about two of them, on every load, before anything else.
logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)


def draws_shapes_world(name: str | None) -> bool:
    """Is the model of that name one of the shipped models of the shapes world (`Model.is_embedded`)?"""
    return name in _EMBEDDED_DEFAULTS


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
    """A loaded pipeline: what people call it, where it came from, and its family object, which
    holds the parts (tokenizers, text encoders, denoiser, VAE) and answers what differs between
    families. Read-only after loading."""

    name: str  # shown to people; concept manifests name their model by it
    source: str  # what load_model() takes to load it again ("embedded", a folder, a hub id)
    family: object  # a families.* object
    device: torch.device
    dtype: torch.dtype
    chosen_because: str = ""
    accelerations: tuple[str, ...] = ()  # what accelerate() turned on

    # the parts and sizes every module reads, as the family holds them

    @property
    def tokenizers(self) -> list:
        return self.family.tokenizers

    @property
    def text_encoders(self) -> list:
        return self.family.text_encoders

    @property
    def concept_encoders(self) -> list:
        """The text encoders a textual-inversion concept holds vectors for, in its files' order."""
        return self.family.concept_encoders

    @property
    def unet(self) -> torch.nn.Module:
        return self.family.unet

    @property
    def denoiser(self) -> torch.nn.Module:
        """The UNet, or SD3/Flux's transformer: the module whose layers a concept's weights edit."""
        return self.family.denoiser

    @property
    def vae(self) -> torch.nn.Module:
        return self.family.vae

    @property
    def scheduler_config(self) -> dict:
        return self.family.scheduler_config

    @property
    def scheduler_name(self) -> str:
        return self.family.scheduler_name

    @property
    def vae_scale(self) -> int:
        return self.family.vae_scale

    @property
    def size_step(self) -> int:
        return self.family.size_step

    @property
    def native_size(self) -> int:
        return self.family.native_size

    @property
    def tokenizer(self):
        """The tokenizer of the table whose positions swaps name: CLIP's (SD 1.x/2.x, SDXL, SD3), T5's (Flux)."""
        return self.tokenizers[0]

    @property
    def is_embedded(self) -> bool:
        """One of the shipped models of the shapes world (the UNet one or the MMDiT one)."""
        return draws_shapes_world(self.name)

    @property
    def cross_attention_layers(self) -> dict:
        """Cross-attention module name -> module: the layers that read the text."""
        return self.family.maps.layers_by_name

    def attention_resolutions(self, size: int) -> list[int]:
        """Side lengths of the cross-attention maps for an image of `size` pixels."""
        return self.family.maps.resolutions(size)

    def default_map_resolution(self, size: int) -> int:
        return self.family.maps.default_resolution(size)


def _device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _from_pipeline(pipe, name: str, source: str, device: torch.device, dtype: torch.dtype, because: str) -> Model:
    return Model(name, source, family_for(pipe, device, _EMBEDDED_DEFAULTS.get(name)), device, dtype, because)


def _loading_arguments(path) -> dict:
    """What from_pretrained needs for `path`: no safety checker; and for a local folder, the parts
    its model_index.json lists as null passed as None (an SD3 saved without T5 lists
    `text_encoder_3`/`tokenizer_3` so, and diffusers loads it only then). Pipelines without a
    safety checker (SD3, Flux) are not told about one."""
    unet = {"safety_checker": None, "requires_safety_checker": False}
    index = Path(path) / "model_index.json"
    try:
        listed = json.loads(index.read_text()) if isinstance(path, Path) and index.is_file() else {}
    except (OSError, ValueError):
        listed = {}
    absent = {k: None for k, v in listed.items() if not k.startswith("_") and v in (None, [None, None])}
    return absent if "transformer" in listed else {**unet, **absent}


def load_model(name: str = "auto", device: str | None = None, dtype: torch.dtype | None = None) -> Model:
    """Load `name`: "auto", "embedded" (the UNet model of the shapes world), "embedded-mmdit" (its
    SD3-architecture model), a local diffusers folder or a hub id (SD 1.x/2.x, SDXL, SD3, Flux).
    Raises ModelError."""
    from diffusers import DiffusionPipeline

    dev = _device(device)
    dtype = dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
    offline = not hub_reachable()
    if name == "auto":
        try:
            pipe = DiffusionPipeline.from_pretrained(SD15, dtype=dtype, local_files_only=True,
                                                     safety_checker=None, requires_safety_checker=False)
            return _from_pipeline(pipe, SD15, SD15, dev, dtype, f"auto: {SD15} found in the local cache")
        except Exception:
            if not offline:
                try:
                    pipe = DiffusionPipeline.from_pretrained(SD15, dtype=dtype, safety_checker=None,
                                                             requires_safety_checker=False)
                    return _from_pipeline(pipe, SD15, SD15, dev, dtype, f"auto: downloaded {SD15}")
                except Exception as e:
                    log.info("auto: %s not reachable (%s)", SD15, type(e).__name__)
        model = load_model("embedded", device, dtype)
        model.chosen_because = f"auto: {SD15} is not available here, using the embedded offline model"
        log.info(model.chosen_because)
        return model
    if name in EMBEDDED_NAMES:
        path = EMBEDDED_NAMES[name]
        because = "embedded offline model" + (" (SD3 architecture)" if path == EMBEDDED_MMDIT else "")
        if not (path / "model_index.json").exists():
            raise ModelError(f"the embedded model is missing from {path}")
    else:
        path, because = Path(name), f"local folder {name}"
        if not path.is_dir():
            path, because = name, f"hub id {name}"
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path), dtype=dtype, local_files_only=offline,
                                                 **_loading_arguments(path))
    except Exception as e:
        if isinstance(path, str) and offline:
            raise ModelError(f"model {name!r} is not available offline (no local copy; the hub is not "
                             f"reachable). Use --model embedded or a local diffusers folder") from None
        raise ModelError(f"model {name!r} could not be loaded: {type(e).__name__}: {str(e)[:200]}") from None
    label = path.name if isinstance(path, Path) else name  # a folder is named by its last part
    return _from_pipeline(pipe, label, "embedded" if path == EMBEDDED else str(name), dev, dtype, because)


def from_components(pipe, name: str = "custom") -> Model:
    """Wrap an already built diffusers pipeline (tests build tiny ones from configs)."""
    denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
    return _from_pipeline(pipe, name, name, denoiser.device, denoiser.dtype, "built in memory")


def accelerate(model: Model, compile: bool = False, channels_last: bool = False,
               backend: str = "inductor") -> Model:
    """Optional speed-ups, turned on once after loading and before serving: the channels-last
    memory layout for the UNet's convolutions, and `torch.compile` of the UNet. The request-specific
    part of each cross-attention layer (K/V writes, map recording) stays eager, so compiled graphs
    never specialise on a request: the first call compiles (minutes on a CPU), later calls with
    other prompts, swaps and concepts reuse the graphs. Images match eager ones within 1/255.
    Raises ModelError on a model without a UNet (SD3, Flux)."""
    if (compile or channels_last) and not isinstance(model.family, UNetFamily):
        raise ModelError("--compile and --channels-last apply to UNet models (SD 1.x, 2.x, SDXL); "
                         f"{model.name} has a transformer")
    on = list(model.accelerations)
    if channels_last and "channels_last" not in on:
        model.unet.to(memory_format=torch.channels_last)
        on.append("channels_last")
    if compile and not any(a.startswith("compile") for a in on):
        model.unet.compile(backend=backend)
        on.append(f"compile:{backend}")
    model.accelerations = tuple(on)
    return model
