"""Concept registry: textual inversion, Custom Diffusion and text-encoder fine-tune files -> Concept.

Formats read (each written by the tests in that exact layout first):

* textual inversion: diffusers / sd-concepts-library `learned_embeds.safetensors` or `.bin`
  (`{token: (n, dim) or (dim,)}`), SDXL's `{"clip_l": ..., "clip_g": ...}`, and A1111 `.pt`
  (`{"string_to_param": {"*": (n, dim)}, "name": ...}`);
* Custom Diffusion: Adobe's `delta.bin` (`{"unet": {"<layer>.to_k.weight": W, ...},
  "modifier_token": {token: vec}}`) and diffusers' `pytorch_custom_diffusion_weights.{bin,safetensors}`
  (`{"<layer>.processor.to_k_custom_diffusion.weight": W, ...}`) with the token in a TI file;
* text-encoder fine-tune (CatVersion-style): text-encoder weights in safetensors, used only to
  encode the customized prompt and p';
* DreamBooth-LoRA (lora.py): diffusers/peft and kohya safetensors, UNet and text-encoder updates;
  the trigger word is read as ordinary text (`a photo of sks dog`).

A concept is described by `manifest.json` in its folder. Pickled files (`.bin`, `.pt`) are read
only with `torch.load(weights_only=True)` and only when the caller allows it (local folders,
never uploads). A safetensors file is judged by its header (tensor count, number types, sizes)
before any tensor is made, and a concept's token, class word, number type and vector norms are
checked against the model, so that a hostile upload is refused at once and cheaply. Nothing here
mutates the model: a concept's tensors live beside it.
"""
from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import ConceptError, short
from .lora import is_lora, read_lora
from .concept_prompts import ConceptWords
from .weights import Edit, LowRank, Replace, overlay

KINDS = ("textual_inversion", "custom_diffusion", "text_encoder", "lora")
KIND_LABELS = {"textual_inversion": "textual inversion", "custom_diffusion": "Custom Diffusion",
               "text_encoder": "text-encoder fine-tune", "lora": "DreamBooth-LoRA"}
PICKLE_SUFFIXES = (".bin", ".pt", ".ckpt", ".pth")
# A concept file read from a local folder: an SDXL LoRA of rank 128 with both text encoders is about
# 1 GB, a CLIP-L text-encoder fine-tune in float32 half that.
MAX_FILE_BYTES = 2**30
# A textual-inversion file, wherever it comes from: 16 vectors for SDXL's two encoders are 130 KB.
MAX_EMBEDDING_BYTES = 2**20
# A token or class word is a word or two; every label, prompt and file name it enters stays short.
MAX_WORD_CHARS = 64
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
# A learned embedding lies within a few times the norm of the model's own token embeddings (the
# shipped concepts: 2-6 times); one past this many times is not a concept but a number that drowns
# the prompt (at 1e38 every image comes out black).
MAX_NORM_RATIO = 100


@dataclass(frozen=True, eq=False)
class Concept:
    """A customized concept, validated against one model and placed on its device."""

    name: str
    token: str  # as written in prompts, e.g. "<striped-ball>"
    class_word: str  # e.g. "circle"
    kind: str  # one of KINDS
    phrase: str = "{token}"  # how the customization method reads it in prompts
    vectors: tuple[torch.Tensor, ...] = ()  # per text encoder: (n_vectors, dim)
    unet: dict[str, Edit] = field(default_factory=dict)  # UNet layer ('...attn2.to_k') -> its customized weights
    text_encoders: tuple = ()  # the customized text stack, same order as the model's
    references: tuple[Path, ...] = ()
    example_prompt: str = ""
    # how often (share of seeds) the customized model and AlignIT draw both the concept and the rest of
    # `example_prompt`, measured by `scripts/table1.py --write-examples`; None when not measured
    example_rates: tuple[float, float] | None = None
    warnings: tuple[str, ...] = ()  # what in its files was not used, said to the user with every generation
    scale: float = 1.0  # a LoRA's adapter weight (diffusers' set_adapters), already in its updates

    @property
    def n_vectors(self) -> int:
        return self.vectors[0].shape[0] if self.vectors else 0

    @property
    def label(self) -> str:
        return f"{self.name} — {KIND_LABELS[self.kind]}, class '{self.class_word}'"

    @property
    def words(self) -> ConceptWords:
        """How prompts write it (a concept without vectors reads its token as ordinary text)."""
        return ConceptWords(self.token, self.class_word, self.phrase, self.n_vectors)

    @property
    def kv(self) -> dict[str, tuple[Edit | None, Edit | None]]:
        """Cross-attention layer -> the customized key and value projections (None: the base one):
        what AlignIT projects the concept's rows of p' with."""
        out: dict[str, tuple[Edit | None, Edit | None]] = {}
        for name, edit in self.unet.items():
            layer, _, proj = name.rpartition(".")
            if layer.endswith("attn2") and proj in ("to_k", "to_v"):
                k, v = out.get(layer, (None, None))
                out[layer] = (edit, v) if proj == "to_k" else (k, edit)
        return out


def _check_file(path: Path, max_bytes: int, what: str = "concept file") -> None:
    if not path.is_file():
        raise ConceptError(f"concept file {path.name} not found")
    if path.stat().st_size > max_bytes:
        raise ConceptError(f"{what} {path.name} is {path.stat().st_size / 2**20:.1f} MiB; "
                           f"the limit is {max_bytes / 2**20:.0f} MiB")


def _read(path: Path, allow_pickle: bool, max_bytes: int = MAX_FILE_BYTES, what: str = "concept file") -> dict:
    _check_file(path, max_bytes, what)
    if path.suffix == ".safetensors":
        _check_safetensors(path, max_bytes)
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


def _check_safetensors(path: Path, max_bytes: int, lora: bool | None = False) -> bool:
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


def _tensor(x, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ConceptError(f"{what} is a {type(x).__name__}, not a tensor")
    if x.dtype not in FLOATS:  # checked first: torch.isfinite is not implemented for float8
        raise ConceptError(f"{what} holds {str(x.dtype).removeprefix('torch.')} numbers; it must hold finite "
                           f"floating-point numbers ({FLOAT_NAMES})")
    if not torch.isfinite(x).all():
        raise ConceptError(f"{what} must hold finite floating-point numbers")
    return x


A1111_KEYS = {"string_to_param", "string_to_token", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}


def read_embeddings(data: dict, token: str | None) -> tuple[str, list[torch.Tensor], list[str]]:
    """(token, per-encoder (n, dim) vectors, warnings about keys not used) from any supported
    textual-inversion layout."""
    if "string_to_param" in data:  # A1111
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise ConceptError("A1111 embedding must hold exactly one entry in string_to_param")
        vec = _tensor(next(iter(params.values())), "the A1111 embedding")
        name = data.get("name")
        return (token or (f"<{name}>" if isinstance(name, str) else "<concept>")), [vec], _unused(data, A1111_KEYS)
    if "clip_l" in data and "clip_g" in data:  # SDXL
        return (token or "<concept>", [_tensor(data["clip_l"], "clip_l"), _tensor(data["clip_g"], "clip_g")],
                _unused(data, {"clip_l", "clip_g"}))
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != 1 or len(data) != 1:
        raise ConceptError(f"a textual-inversion file must hold one token's embedding, found keys "
                           f"{[short(str(k)) for k in sorted(data)[:5]]}")
    key, vec = next(iter(tensors.items()))
    return token or key, [_tensor(vec, f"the embedding of {short(key)}")], []


def _unused(data: dict, known: set[str]) -> list[str]:
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
        parts.setdefault(f"{m['layer']}.{proj}", {})[m["kind"]] = _tensor(value, key)
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


def _example_rates(m: dict) -> tuple[float, float] | None:
    """The manifest's `example_rates` ([customized, AlignIT], shares of seeds), or None when absent or not
    two numbers from 0 to 1 (they only choose which examples the demo offers)."""
    rates = m.get("example_rates")
    if (isinstance(rates, list) and len(rates) == 2
            and all(isinstance(r, (int, float)) and not isinstance(r, bool) and 0 <= r <= 1 for r in rates)):
        return float(rates[0]), float(rates[1])
    return None


def _inside(folder: Path, rel: str) -> Path:
    p = (folder / rel).resolve()
    if folder.resolve() not in p.parents and p != folder.resolve():
        raise ConceptError(f"manifest path {rel!r} points outside the concept folder")
    return p


def load_concept(source: str | Path, model, allow_pickle: bool = True, max_bytes: int = MAX_FILE_BYTES,
                 token: str | None = None, class_word: str | None = None, lora_scale: float | None = None) -> Concept:
    """Load a concept folder (with manifest.json), a manifest path, or a bare textual-inversion or
    LoRA file (then `token`/`class_word` name it; a LoRA's may come from its training metadata), and
    validate it against `model`. `lora_scale`: how much of a LoRA to apply (diffusers' adapter
    weight; default the manifest's `scale`, else 1). Raises ConceptError."""
    path = Path(source)
    if not path.exists():
        raise ConceptError(f"unknown concept {str(source)!r}: no concept folder, manifest or file there")
    if path.is_dir():
        path = path / "manifest.json"
    if path.suffix != ".json":
        if _holds_lora(path, max_bytes):
            return _lora_concept(path.stem, path, model, max_bytes, token, class_word,
                                 1.0 if lora_scale is None else lora_scale, {})
        if not class_word:
            raise ConceptError("a bare embedding file needs a class word (e.g. 'cat')")
        tok, vectors, warnings = _read_embeddings_file(path, allow_pickle, max_bytes, token)
        return _bind(Concept(path.stem, tok, class_word, "textual_inversion", vectors=tuple(vectors),
                             warnings=tuple(warnings)), model)
    if not path.is_file():
        raise ConceptError(f"no concept manifest at {path}")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConceptError(f"{path.name} is not valid JSON ({e})") from None
    folder = path.parent
    if m.get("kind") == "lora":  # its trigger and class word may come from the file
        if not m.get("lora"):
            raise ConceptError("a LoRA manifest needs a 'lora' weights file")
        return _lora_concept(m.get("name", folder.name), _inside(folder, m["lora"]), model, max_bytes,
                             token or m.get("token"), class_word or m.get("class_word"),
                             m.get("scale", 1.0) if lora_scale is None else lora_scale, m)
    for key in ("token", "class_word", "kind"):
        if not isinstance(m.get(key), str) or not m[key].strip():
            raise ConceptError(f"the manifest {path} needs a {key!r} string")
    kind = m["kind"]
    if kind not in KINDS:
        raise ConceptError(f"unknown concept kind {kind!r}; expected one of {', '.join(KINDS)}")
    vectors, unet, encoders, tok, warnings = (), {}, (), m["token"], []
    if m.get("weights"):
        tok, vecs, warnings = _read_embeddings_file(_inside(folder, m["weights"]), allow_pickle, max_bytes, m["token"])
        vectors = tuple(vecs)
    if kind == "custom_diffusion":
        if not m.get("custom_diffusion"):
            raise ConceptError("a Custom Diffusion manifest needs a 'custom_diffusion' weights file")
        unet, modifier = read_custom_diffusion(_read(_inside(folder, m["custom_diffusion"]), allow_pickle, max_bytes))
        if not vectors and modifier:
            if tok not in modifier:
                raise ConceptError(f"the Custom Diffusion file has no embedding for {tok}")
            vectors = (_tensor(modifier[tok], f"the embedding of {tok}"),)
        if set(modifier) - {tok}:
            extra = [short(str(k)) for k in sorted(set(modifier) - {tok})[:5]]
            warnings.append(f"the Custom Diffusion file also holds embeddings for {extra}, "
                            f"which are not used (this concept is {tok})")
        if not vectors:
            raise ConceptError(f"the Custom Diffusion concept has no embedding for its token {tok}")
    elif kind == "textual_inversion" and not vectors:
        raise ConceptError("a textual-inversion manifest needs a 'weights' file")
    if kind == "text_encoder":
        if not m.get("text_encoder"):
            raise ConceptError("a text-encoder concept needs a 'text_encoder' weights file")
        encoders = (_read(_inside(folder, m["text_encoder"]), allow_pickle, max_bytes),)
    refs = tuple(_inside(folder, r) for r in m.get("references", []))
    phrase = m.get("phrase", "{token} {class_word}" if kind == "custom_diffusion" else "{token}")
    concept = Concept(m.get("name", folder.name), tok, m["class_word"], kind, phrase=phrase, vectors=vectors,
                      unet=unet, text_encoders=encoders, references=refs, example_prompt=m.get("example_prompt", ""),
                      example_rates=_example_rates(m), warnings=tuple(warnings))
    return _bind(concept, model)


def _read_embeddings_file(path: Path, allow_pickle: bool, max_bytes: int, token: str | None):
    """read_embeddings of a textual-inversion file, refused past MAX_EMBEDDING_BYTES."""
    return read_embeddings(_read(path, allow_pickle, min(max_bytes, MAX_EMBEDDING_BYTES), "textual-inversion file"),
                           token)


def _holds_lora(path: Path, max_bytes: int) -> bool:
    """Whether a bare file is a LoRA, from its safetensors header alone (judged first)."""
    if path.suffix != ".safetensors":
        return False
    _check_file(path, max_bytes)
    return _check_safetensors(path, max_bytes, lora=None)


def _lora_concept(name: str, path: Path, model, max_bytes: int, token, class_word, scale, m: dict) -> Concept:
    """A DreamBooth-LoRA concept from its file; the trigger and class word as given, else the file's."""
    if path.suffix != ".safetensors":
        raise ConceptError(f"{path.name}: a LoRA is read from .safetensors only")
    _check_file(path, max_bytes, "LoRA file")
    _check_safetensors(path, max_bytes, lora=True)
    lora = read_lora(path, model)
    if not (token and class_word) and lora.trigger is not None:
        token, class_word = token or lora.trigger[0], class_word or lora.trigger[1]
    if not (isinstance(token, str) and token.strip() and isinstance(class_word, str) and class_word.strip()):
        raise ConceptError(f"{path.name} does not say its trigger word and class word; give them (e.g. token "
                           f"'sks', class word 'dog')")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale <= 2:
        raise ConceptError("a LoRA's scale must be a number from 0 to 2")
    concept = Concept(name, token.strip(), class_word.strip(), "lora", phrase=m.get("phrase", "{token} {class_word}"),
                      unet={layer: edit.scaled(scale) for layer, edit in lora.unet.items()},
                      text_encoders=tuple({layer: edit.scaled(scale) for layer, edit in text.items()}
                                          for text in lora.text),
                      references=tuple(_inside(path.parent, r) for r in m.get("references", [])),
                      example_prompt=m.get("example_prompt", ""), example_rates=_example_rates(m), scale=float(scale))
    return _bind(concept, model)


def _bind(c: Concept, model) -> Concept:
    """Check lengths, shapes and norms against `model`, move tensors to its device/dtype, build
    fine-tuned encoders."""
    for what, word in (("token", c.token), ("class word", c.class_word)):
        if len(word) > MAX_WORD_CHARS:
            raise ConceptError(f"the {what} {short(word, 24)} is {len(word)} characters; "
                               f"the limit is {MAX_WORD_CHARS}")
    if not c.token.strip() or any(ch.isspace() for ch in c.token):
        raise ConceptError(f"concept token {c.token!r} must be one word without spaces")
    widths = [te.config.hidden_size for te in model.text_encoders]
    vectors = []
    for i, v in enumerate(c.vectors):
        v = v.reshape(1, -1) if v.ndim == 1 else v
        if v.ndim != 2 or v.shape[0] < 1 or v.shape[0] > 16:
            raise ConceptError(f"the embedding of {c.token} must be (vectors, width), got {tuple(v.shape)}")
        vectors.append(v)
    if vectors and len(vectors) != len(widths):
        raise ConceptError(f"{c.token} has embeddings for {len(vectors)} text encoder(s); "
                           f"{model.name} has {len(widths)}")
    for v, w in zip(vectors, widths):
        if v.shape[1] != w:
            raise ConceptError(f"the embedding of {c.token} is {v.shape[1]} wide but {model.name}'s "
                               f"text encoder is {w} wide: the concept is for another model")
    if len({v.shape[0] for v in vectors}) > 1:
        raise ConceptError(f"{c.token} has different vector counts per text encoder")
    for v, encoder in zip(vectors, model.text_encoders):
        _check_norm(c.token, v, encoder, model.name)
    unet = {name: _fit(model.unet, name, edit, model, KIND_LABELS[c.kind]) for name, edit in c.unet.items()}
    if c.kind == "lora":
        return replace(c, unet=unet, text_encoders=_lora_encoders(c.text_encoders, model))
    encoders = []
    for state in c.text_encoders:
        te = copy.deepcopy(model.text_encoders[0])
        own = te.state_dict()
        # transformers 4.x saved CLIPTextModel weights as text_model.*; 5.x names them without it
        state = {(k if k in own else k.removeprefix("text_model.")): v for k, v in state.items()}
        bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
        if bad:
            raise ConceptError(f"text-encoder weights do not fit {model.name}: {bad[:3]}")
        te.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
        encoders.append(te.eval().requires_grad_(False))
    if encoders and len(model.text_encoders) > 1:
        encoders += list(model.text_encoders[1:])
    return replace(c, vectors=tuple(v.to(model.device, model.dtype) for v in vectors), unet=unet,
                   text_encoders=tuple(encoders))


def _fit(root: torch.nn.Module, name: str, edit: Edit, model, what: str) -> Edit:
    """`edit` of layer `name` of `root`, moved to the model's device and dtype. Raises ConceptError
    for a layer that is not there or replaced weights of other shapes (LoRA shapes: lora.py)."""
    try:
        layer = root.get_submodule(name)
    except AttributeError:
        layer = None
    if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
        raise ConceptError(f"{what} layer {name} does not exist in {model.name}")
    if isinstance(edit, LowRank):
        down, up = edit.down, edit.up
        if isinstance(layer, torch.nn.Conv2d) and down.ndim == 2:  # a linear LoRA on a 1x1 convolution
            down, up = down[:, :, None, None], up[:, :, None, None]
        _check_weight_norm(edit, layer, name, model.name, what)
        return LowRank(down.to(model.device, model.dtype), up.to(model.device, model.dtype), edit.scale)
    weight = layer.weight
    bias_ok = edit.bias is None or (layer.bias is not None and edit.bias.shape == layer.bias.shape)
    if edit.weight.shape != weight.shape or not bias_ok:
        raise ConceptError(f"{what} weights for {name} are {tuple(edit.weight.shape)}; {model.name} needs "
                           f"{tuple(weight.shape)}: the concept is for another model")
    _check_weight_norm(edit, layer, name, model.name, what)
    return Replace(edit.weight.to(model.device, model.dtype),
                   None if edit.bias is None else edit.bias.to(model.device, model.dtype))


def _lora_encoders(updates: tuple[dict[str, LowRank], ...], model) -> tuple:
    """The model's text stack with a LoRA's updates on every row (views sharing the model's
    weights), or () when the LoRA leaves the text encoders alone."""
    if not any(updates):
        return ()
    return tuple(overlay(te, {layer: [(None, _fit(te, layer, edit, model, "LoRA"))]
                              for layer, edit in (updates[i] if i < len(updates) else {}).items()})
                 for i, te in enumerate(model.text_encoders))


def one_model(concepts: list[Concept]) -> Concept:
    """The customized model holding several concepts at once (the customized baseline of a prompt
    with all of them): every concept's vectors, numbered on in order, and the text stack and UNet
    weights of the concept that changes them. Raises ConceptError when two concepts change the same
    part (two Custom Diffusion concepts, two text-encoder fine-tunes): no single model holds both."""
    for part, what in (("unet", "UNet weights"), ("text_encoders", "text encoder")):
        owners = [c for c in concepts if getattr(c, part)]
        if len(owners) > 1:
            raise ConceptError(f"{owners[0].token} and {owners[1].token} both change the {what}; no single "
                               f"customized model holds both, so the customized baseline is left out")
    with_vectors = [c for c in concepts if c.vectors]
    vectors = tuple(torch.cat([c.vectors[i] for c in with_vectors]) for i in range(len(with_vectors[0].vectors))) \
        if with_vectors else ()
    unet = next((c.unet for c in concepts if c.unet), {})
    encoders = next((c.text_encoders for c in concepts if c.text_encoders), ())
    return Concept(" + ".join(c.name for c in concepts), " ".join(c.token for c in concepts),
                   " ".join(c.class_word for c in concepts), concepts[0].kind, vectors=vectors, unet=unet,
                   text_encoders=encoders, warnings=tuple(w for c in concepts for w in c.warnings))


def _check_norm(token: str, vectors: torch.Tensor, encoder, model_name: str) -> None:
    """Refuse `vectors` (n, width) when one is over MAX_NORM_RATIO times as long as the longest of
    `encoder`'s own token embeddings."""
    table = encoder.get_input_embeddings().weight.detach()
    # in chunks: SD 1.5's table is 49,408 x 768, in float32 150 MB at once
    largest = max(float(chunk.float().norm(dim=1).max()) for chunk in table.split(4096))
    norm = float(vectors.double().norm(dim=1).max())
    if norm > MAX_NORM_RATIO * largest:
        raise ConceptError(f"the embedding of {token} has norm {norm:.3g}, over {MAX_NORM_RATIO} times that of "
                           f"{model_name}'s longest token embedding ({largest:.3g}); a vector that far out drowns "
                           f"the prompt (at 1e38 the images come out black)")


def _check_weight_norm(edit: Edit, layer: torch.nn.Module, name: str, model_name: str, what: str) -> None:
    """Refuse a layer's customized weights (or a LoRA's update of them) when they are over
    MAX_NORM_RATIO times as long as the layer's own: trained ones stay near them, and ones that far
    out overflow what the layer computes (at 1e38 the images come out black)."""
    norm = edit.norm()
    own = math.hypot(*(float(p.detach().double().norm()) for p in (layer.weight, layer.bias) if p is not None))
    if not norm <= MAX_NORM_RATIO * own:  # NaN too: an alpha of NaN scales the update to NaN
        raise ConceptError(f"the {what} weights for {name} have norm {norm:.3g}, over {MAX_NORM_RATIO} times that of "
                           f"{model_name}'s own ({own:.3g}); weights that far out drown the layer (at 1e38 the images "
                           f"come out black)")


def find_concepts(folder: str | Path, model) -> list[Concept]:
    """Every concept folder under `folder` made for `model` (manifest 'model' field, or any)."""
    out = []
    for manifest in sorted(Path(folder).glob("*/manifest.json")):
        m = json.loads(manifest.read_text())
        if m.get("model") in (None, model.name):
            out.append(load_concept(manifest, model))
    return out

