"""Reading concept files without trusting them: size, safetensors header (tensor count, number
types, shapes) checked before any tensor is made, pickles only through `torch.load(weights_only=True)`
and only where the caller allows them; and the layouts of textual-inversion and Custom Diffusion
files. concepts.py turns what is read here into a Concept bound to a model.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import ConceptError, short
from .lora import is_lora
from .weights import Replace

PICKLE_SUFFIXES = (".bin", ".pt", ".ckpt", ".pth")
# A concept file read from a local folder: an SDXL LoRA of rank 128 with both text encoders is about
# 1 GB, a CLIP-L text-encoder fine-tune in float32 half that.
MAX_FILE_BYTES = 2**30
# A textual-inversion file, wherever it comes from: 16 vectors for SDXL's two encoders are 130 KB.
MAX_EMBEDDING_BYTES = 2**20
# What one safetensors header may list. A concept file: Custom Diffusion on SDXL has 140 tensors, a
# CLIP text-encoder fine-tune about 200, in headers of tens of KB. A LoRA: kohya's SDXL LoRA of every
# attention, feed-forward and convolution layer and both text encoders has 3,156 (down, up and alpha
# of 1,052 layers), some 500 KB, beside its training metadata.
MAX_TENSORS = 1024
MAX_HEADER_BYTES = 2**20
MAX_LORA_TENSORS = 8192
MAX_LORA_HEADER_BYTES = 4 * 2**20
MAX_DIMS = 4  # a convolution's weight; embeddings and linear weights have 2
# Bytes per number of each safetensors number type a concept may hold (integers for buffers such as
# a text encoder's position ids); float8 and the like are not among them: the model computes in
# float16 / bfloat16 / float32, and torch cannot even check float8 numbers for NaN.
SAFETENSORS_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                          "BOOL": 1}
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FLOAT_NAMES = "float16, bfloat16, float32 or float64"


def check_file(path: Path, max_bytes: int, what: str = "concept file") -> None:
    if not path.is_file():
        raise ConceptError(f"concept file {path.name} not found")
    if path.stat().st_size > max_bytes:
        raise ConceptError(f"{what} {path.name} is {path.stat().st_size / 2**20:.1f} MiB; "
                           f"the limit is {max_bytes / 2**20:.0f} MiB")


def read_file(path: Path, allow_pickle: bool, max_bytes: int = MAX_FILE_BYTES, what: str = "concept file") -> dict:
    check_file(path, max_bytes, what)
    if path.suffix == ".safetensors":
        check_safetensors(path, max_bytes)
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ConceptError(f"{path.name} is not a valid safetensors file ({e})") from None
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ConceptError(f"{path.name} is a pickle file; only .safetensors can be uploaded")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses anything that is not plain tensors/containers
            raise ConceptError(f"{path.name} could not be loaded safely: it holds more than tensors "
                               f"({type(e).__name__})") from None
    raise ConceptError(f"{path.name}: unknown concept file type {path.suffix!r}")


def _counts(values) -> bool:
    """Whether `values` (from a JSON header) is a list of whole numbers >= 0."""
    return isinstance(values, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in values)


def check_safetensors(path: Path, max_bytes: int, lora: bool | None = False) -> bool:
    """Refuse a safetensors file from its header alone, before any tensor exists: a header over
    MAX_HEADER_BYTES or holding more than MAX_TENSORS tensors (a LoRA's: MAX_LORA_HEADER_BYTES,
    MAX_LORA_TENSORS), a number type outside SAFETENSORS_ITEM_BYTES (float8 ...), more than MAX_DIMS
    dimensions, shapes whose sizes disagree with the data or add up to more than `max_bytes`.
    `lora`: whether the file is read as a LoRA, or None when its tensors' names say. Returns whether
    it is a LoRA; raises ConceptError."""
    invalid = f"{path.name} is not a valid safetensors file"
    size = path.stat().st_size
    with path.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > size - 8:
            raise ConceptError(f"{invalid} (its header is longer than the file)")
        limit = MAX_HEADER_BYTES if lora is False else MAX_LORA_HEADER_BYTES
        if length > limit:
            raise _header_too_long(path, length, lora)
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConceptError(f"{invalid} (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ConceptError(f"{invalid} (its header is not a table of tensors)")
    tensors = {name: info for name, info in header.items() if name != "__metadata__"}
    lora = is_lora(tensors) if lora is None else lora
    if not lora and length > MAX_HEADER_BYTES:
        raise _header_too_long(path, length, lora)
    most = MAX_LORA_TENSORS if lora else MAX_TENSORS
    if len(tensors) > most:
        raise ConceptError(f"{path.name} holds {len(tensors)} tensors; a {'LoRA' if lora else 'concept'} file "
                           f"holds at most {most}")
    total = 0
    for name, info in tensors.items():
        info = info if isinstance(info, dict) else {}
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_ITEM_BYTES:
            raise ConceptError(f"the tensor {short(name)} in {path.name} holds {short(str(dtype))} numbers, which "
                               f"concepts cannot use; save it as {FLOAT_NAMES}")
        if isinstance(shape, list) and len(shape) > MAX_DIMS:
            raise ConceptError(f"the tensor {short(name)} in {path.name} has {len(shape)} dimensions; a concept's "
                               f"tensors have at most {MAX_DIMS}")
        if not (_counts(shape) and _counts(offsets) and len(offsets) == 2
                and offsets[1] - offsets[0] == math.prod(shape) * SAFETENSORS_ITEM_BYTES[dtype]):
            raise ConceptError(f"{invalid} (the shape of {short(name)} does not match its data)")
        total += offsets[1] - offsets[0]
    if total > max_bytes:
        raise ConceptError(f"{path.name} holds {total / 2**20:.1f} MiB of tensors; the limit is "
                           f"{max_bytes / 2**20:.0f} MiB")
    return lora


def _header_too_long(path: Path, length: int, lora: bool | None) -> ConceptError:
    limit = {False: f"{MAX_HEADER_BYTES // 2**20} MiB", True: f"{MAX_LORA_HEADER_BYTES // 2**20} MiB",
             None: f"{MAX_HEADER_BYTES // 2**20} MiB ({MAX_LORA_HEADER_BYTES // 2**20} MiB for a LoRA)"}[lora]
    return ConceptError(f"{path.name} lists too many tensors for a concept: its header is {length / 2**20:.1f} MiB; "
                        f"the limit is {limit}")


def checked_tensor(x, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ConceptError(f"{what} is a {type(x).__name__}, not a tensor")
    if x.dtype not in FLOATS:  # checked first: torch.isfinite is not implemented for float8
        raise ConceptError(f"{what} holds {str(x.dtype).removeprefix('torch.')} numbers; it must hold finite "
                           f"floating-point numbers ({FLOAT_NAMES})")
    if not torch.isfinite(x).all():
        raise ConceptError(f"{what} must hold finite floating-point numbers")
    return x


A1111_KEYS = {"string_to_param", "string_to_token", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}


def read_embeddings(data: dict, token: str | None, keys: tuple[str, ...] | None = None
                    ) -> tuple[str, list[torch.Tensor], list[str]]:
    """(token, per-encoder (n, dim) vectors, warnings about keys not used) from any supported
    textual-inversion layout. `keys`: the per-text-encoder entries a model reads, in its order (SD3:
    `clip_l`, `clip_g` (, `t5`); Flux: `clip_l`, `t5`); None: SDXL's `clip_l`, `clip_g` when present."""
    if keys is not None and "clip_l" in data:  # SD3 / Flux: one entry per text encoder
        missing = [k for k in keys if k not in data]
        if missing:
            raise ConceptError(f"the textual-inversion file has no {' or '.join(repr(k) for k in missing)} entry; "
                               f"this model's text encoders read {', '.join(keys)}")
        return token or "<concept>", [checked_tensor(data[k], k) for k in keys], unused_keys(data, set(keys))
    if "string_to_param" in data:  # A1111
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise ConceptError("A1111 embedding must hold exactly one entry in string_to_param")
        vec = checked_tensor(next(iter(params.values())), "the A1111 embedding")
        name = data.get("name")
        return (token or (f"<{name}>" if isinstance(name, str) else "<concept>")), [vec], unused_keys(data, A1111_KEYS)
    if "clip_l" in data and "clip_g" in data:  # SDXL
        return (token or "<concept>", [checked_tensor(data["clip_l"], "clip_l"), checked_tensor(data["clip_g"], "clip_g")],
                unused_keys(data, {"clip_l", "clip_g"}))
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != 1 or len(data) != 1:
        raise ConceptError(f"a textual-inversion file must hold one token's embedding, found keys "
                           f"{[short(str(k)) for k in sorted(data)[:5]]}")
    key, vec = next(iter(tensors.items()))
    return token or key, [checked_tensor(vec, f"the embedding of {short(key)}")], []


def unused_keys(data: dict, known: set[str]) -> list[str]:
    extra = sorted(set(data) - known)
    return [f"the embedding file also holds {[short(str(k)) for k in extra[:5]]}, which is not used"] if extra else []


# Custom Diffusion keys: Adobe's delta.bin names the UNet's own layers, diffusers names its processors
_ADOBE_KEY = re.compile(r"^(?P<layer>.+)\.(?P<proj>to_q|to_k|to_v|to_out\.0)\.(?P<kind>weight|bias)$")
_DIFFUSERS_KEY = re.compile(r"^(?P<layer>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_custom_diffusion"
                            r"(?:\.0)?\.(?P<kind>weight|bias)$")


def read_custom_diffusion(data: dict) -> tuple[dict[str, Replace], dict]:
    """({UNet layer, e.g. '...attn2.to_k': its replaced weights}, modifier tokens) from Adobe's
    delta.bin or diffusers' layout. `--freeze_model crossattn` files hold W_q and the output
    projection too; they are read like W_k/W_v. A key that is none of these is refused, never
    dropped."""
    tokens = {}
    if "unet" in data:  # Adobe custom-diffusion delta.bin
        weights, tokens, pattern = data["unet"], data.get("modifier_token", {}), _ADOBE_KEY
        unknown = sorted(set(data) - {"unet", "modifier_token"})
    else:
        weights, pattern, unknown = data, _DIFFUSERS_KEY, []
    if not isinstance(weights, dict):
        raise ConceptError("Custom Diffusion weights must be a dictionary of tensors")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        m = pattern.match(key)
        if m is None:
            unknown.append(key)
            continue
        proj = "to_out.0" if m["proj"].startswith("to_out") else m["proj"]
        parts.setdefault(f"{m['layer']}.{proj}", {})[m["kind"]] = checked_tensor(value, key)
    if unknown:
        raise ConceptError(f"the Custom Diffusion file holds keys this reader does not know, e.g. "
                           f"{[short(str(k)) for k in unknown[:3]]}; refusing it rather than leaving those weights out")
    for name, part in parts.items():
        if "weight" not in part:
            raise ConceptError(f"Custom Diffusion weights have a bias for {name} but no weight")
    for name in parts:
        if name.endswith(".to_k") and name[:-5] + ".to_v" not in parts:
            raise ConceptError(f"Custom Diffusion weights have {name} but no {name[:-5]}.to_v")
    if not any(name.endswith(".to_k") for name in parts):
        raise ConceptError("no Custom Diffusion to_k/to_v weights found in the file")
    return {name: Replace(part["weight"], part.get("bias")) for name, part in parts.items()}, tokens
