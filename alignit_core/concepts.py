"""Concept registry: textual inversion, Custom Diffusion and text-encoder fine-tune files -> Concept.

Formats read (each written by the tests in that exact layout first):

* textual inversion: diffusers / sd-concepts-library `learned_embeds.safetensors` or `.bin`
  (`{token: (n, dim) or (dim,)}`), SDXL's `{"clip_l": ..., "clip_g": ...}`, and A1111 `.pt`
  (`{"string_to_param": {"*": (n, dim)}, "name": ...}`);
* Custom Diffusion: Adobe's `delta.bin` (`{"unet": {"<layer>.to_k.weight": W, ...},
  "modifier_token": {token: vec}}`) and diffusers' `pytorch_custom_diffusion_weights.{bin,safetensors}`
  (`{"<layer>.processor.to_k_custom_diffusion.weight": W, ...}`) with the token in a TI file;
* text-encoder fine-tune (CatVersion-style): text-encoder weights in safetensors, used only to
  encode the customized prompt and p'.

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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import ConceptError

KINDS = ("textual_inversion", "custom_diffusion", "text_encoder")
KIND_LABELS = {"textual_inversion": "textual inversion", "custom_diffusion": "Custom Diffusion",
               "text_encoder": "text-encoder fine-tune"}
PICKLE_SUFFIXES = (".bin", ".pt", ".ckpt", ".pth")
MAX_FILE_BYTES = 200 * 2**20
# A token or class word is a word or two; every label, prompt and file name it enters stays short.
MAX_WORD_CHARS = 64
# Tensors in one concept file: Custom Diffusion on SDXL has 140, a CLIP text-encoder fine-tune about
# 200; their safetensors headers are tens of KB.
MAX_TENSORS = 1024
MAX_HEADER_BYTES = 2**20
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
    kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # attn2 name -> (W_k, W_v)
    text_encoders: tuple = ()  # fine-tuned copies, same order as the model's
    references: tuple[Path, ...] = ()
    example_prompt: str = ""

    @property
    def n_vectors(self) -> int:
        return self.vectors[0].shape[0] if self.vectors else 0

    @property
    def label(self) -> str:
        return f"{self.name} — {KIND_LABELS[self.kind]}, class '{self.class_word}'"


def _read(path: Path, allow_pickle: bool, max_bytes: int = MAX_FILE_BYTES) -> dict:
    if not path.is_file():
        raise ConceptError(f"concept file {path.name} not found")
    if path.stat().st_size > max_bytes:
        raise ConceptError(f"concept file {path.name} is {path.stat().st_size / 2**20:.1f} MiB; "
                           f"the limit is {max_bytes / 2**20:.0f} MiB")
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


def _short(text: str, limit: int = MAX_WORD_CHARS) -> str:
    """`text` as a message may quote it: at most `limit` characters, cut with "…"."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _counts(values) -> bool:
    """Whether `values` (from a JSON header) is a list of whole numbers >= 0."""
    return isinstance(values, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in values)


def _check_safetensors(path: Path, max_bytes: int) -> None:
    """Refuse a safetensors file from its header alone, before any tensor exists: a header over
    MAX_HEADER_BYTES or holding more than MAX_TENSORS tensors, a number type outside
    SAFETENSORS_ITEM_BYTES (float8 ...), shapes whose sizes disagree with the data or add up to more
    than `max_bytes`. Raises ConceptError."""
    invalid = f"{path.name} is not a valid safetensors file"
    size = path.stat().st_size
    with path.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > size - 8:
            raise ConceptError(f"{invalid} (its header is longer than the file)")
        if length > MAX_HEADER_BYTES:
            raise ConceptError(f"{path.name} lists too many tensors for a concept: its header is "
                               f"{length / 2**20:.1f} MiB; the limit is {MAX_HEADER_BYTES / 2**20:.0f} MiB")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConceptError(f"{invalid} (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ConceptError(f"{invalid} (its header is not a table of tensors)")
    tensors = {name: info for name, info in header.items() if name != "__metadata__"}
    if len(tensors) > MAX_TENSORS:
        raise ConceptError(f"{path.name} holds {len(tensors)} tensors; a concept file holds at most {MAX_TENSORS}")
    total = 0
    for name, info in tensors.items():
        info = info if isinstance(info, dict) else {}
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_ITEM_BYTES:
            raise ConceptError(f"the tensor {_short(name)} in {path.name} holds {_short(str(dtype))} numbers, which "
                               f"concepts cannot use; save it as {FLOAT_NAMES}")
        if not (_counts(shape) and _counts(offsets) and len(offsets) == 2
                and offsets[1] - offsets[0] == math.prod(shape) * SAFETENSORS_ITEM_BYTES[dtype]):
            raise ConceptError(f"{invalid} (the shape of {_short(name)} does not match its data)")
        total += offsets[1] - offsets[0]
    if total > max_bytes:
        raise ConceptError(f"{path.name} holds {total / 2**20:.1f} MiB of tensors; the limit is "
                           f"{max_bytes / 2**20:.0f} MiB")


def _tensor(x, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ConceptError(f"{what} is a {type(x).__name__}, not a tensor")
    if x.dtype not in FLOATS:  # checked first: torch.isfinite is not implemented for float8
        raise ConceptError(f"{what} holds {str(x.dtype).removeprefix('torch.')} numbers; it must hold finite "
                           f"floating-point numbers ({FLOAT_NAMES})")
    if not torch.isfinite(x).all():
        raise ConceptError(f"{what} must hold finite floating-point numbers")
    return x


def read_embeddings(data: dict, token: str | None) -> tuple[str, list[torch.Tensor]]:
    """(token, per-encoder (n, dim) vectors) from any supported textual-inversion layout."""
    if "string_to_param" in data:  # A1111
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise ConceptError("A1111 embedding must hold exactly one entry in string_to_param")
        vec = _tensor(next(iter(params.values())), "the A1111 embedding")
        name = data.get("name")
        return (token or (f"<{name}>" if isinstance(name, str) else "<concept>")), [vec]
    if "clip_l" in data and "clip_g" in data:  # SDXL
        return token or "<concept>", [_tensor(data["clip_l"], "clip_l"), _tensor(data["clip_g"], "clip_g")]
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != 1 or len(data) != 1:
        raise ConceptError(f"a textual-inversion file must hold one token's embedding, found keys "
                           f"{[_short(str(k)) for k in sorted(data)[:5]]}")
    key, vec = next(iter(tensors.items()))
    return token or key, [_tensor(vec, f"the embedding of {_short(key)}")]


def read_custom_diffusion(data: dict) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """({attn2 layer: (W_k, W_v)}, modifier tokens) from Adobe delta.bin or diffusers' layout."""
    tokens = {}
    if "unet" in data:  # Adobe custom-diffusion delta.bin
        weights, tokens = data["unet"], data.get("modifier_token", {})
        suffix_k, suffix_v = ".to_k.weight", ".to_v.weight"
    else:
        weights = data
        suffix_k, suffix_v = ".processor.to_k_custom_diffusion.weight", ".processor.to_v_custom_diffusion.weight"
    if not isinstance(weights, dict):
        raise ConceptError("Custom Diffusion weights must be a dictionary of tensors")
    kv = {}
    for key in weights:
        if key.endswith(suffix_k):
            layer = key[: -len(suffix_k)]
            vkey = layer + suffix_v
            if vkey not in weights:
                raise ConceptError(f"Custom Diffusion weights have {key} but no {vkey}")
            kv[layer] = (_tensor(weights[key], key), _tensor(weights[vkey], vkey))
    if not kv:
        raise ConceptError("no Custom Diffusion to_k/to_v weights found in the file")
    return kv, tokens


def _inside(folder: Path, rel: str) -> Path:
    p = (folder / rel).resolve()
    if folder.resolve() not in p.parents and p != folder.resolve():
        raise ConceptError(f"manifest path {rel!r} points outside the concept folder")
    return p


def load_concept(source: str | Path, model, allow_pickle: bool = True, max_bytes: int = MAX_FILE_BYTES,
                 token: str | None = None, class_word: str | None = None) -> Concept:
    """Load a concept folder (with manifest.json), a manifest path, or a bare textual-inversion
    file (then `token`/`class_word` name it), and validate it against `model`. Raises ConceptError."""
    path = Path(source)
    if not path.exists():
        raise ConceptError(f"unknown concept {str(source)!r}: no concept folder, manifest or file there")
    if path.is_dir():
        path = path / "manifest.json"
    if path.suffix != ".json":
        if not class_word:
            raise ConceptError("a bare embedding file needs a class word (e.g. 'cat')")
        tok, vectors = read_embeddings(_read(path, allow_pickle, max_bytes), token)
        return _bind(Concept(path.stem, tok, class_word, "textual_inversion", vectors=tuple(vectors)), model)
    if not path.is_file():
        raise ConceptError(f"no concept manifest at {path}")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConceptError(f"{path.name} is not valid JSON ({e})") from None
    folder = path.parent
    for key in ("token", "class_word", "kind"):
        if not isinstance(m.get(key), str) or not m[key].strip():
            raise ConceptError(f"the manifest {path} needs a {key!r} string")
    kind = m["kind"]
    if kind not in KINDS:
        raise ConceptError(f"unknown concept kind {kind!r}; expected one of {', '.join(KINDS)}")
    vectors, kv, encoders, tok = (), {}, (), m["token"]
    if m.get("weights"):
        tok, vecs = read_embeddings(_read(_inside(folder, m["weights"]), allow_pickle, max_bytes), m["token"])
        vectors = tuple(vecs)
    if kind == "custom_diffusion":
        if not m.get("custom_diffusion"):
            raise ConceptError("a Custom Diffusion manifest needs a 'custom_diffusion' weights file")
        kv, modifier = read_custom_diffusion(_read(_inside(folder, m["custom_diffusion"]), allow_pickle, max_bytes))
        if not vectors and modifier:
            if tok not in modifier:
                raise ConceptError(f"the Custom Diffusion file has no embedding for {tok}")
            vectors = (_tensor(modifier[tok], f"the embedding of {tok}"),)
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
    concept = Concept(m.get("name", folder.name), tok, m["class_word"], kind, phrase, vectors, kv,
                      encoders, refs, m.get("example_prompt", ""))
    return _bind(concept, model)


def _bind(c: Concept, model) -> Concept:
    """Check lengths, shapes and norms against `model`, move tensors to its device/dtype, build
    fine-tuned encoders."""
    for what, word in (("token", c.token), ("class word", c.class_word)):
        if len(word) > MAX_WORD_CHARS:
            raise ConceptError(f"the {what} {_short(word, 24)} is {len(word)} characters; "
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
    kv = {}
    layers = model.cross_attention_layers
    for layer, (wk, wv) in c.kv.items():
        if layer not in layers:
            raise ConceptError(f"Custom Diffusion layer {layer} does not exist in {model.name}")
        attn = layers[layer]
        if wk.shape != attn.to_k.weight.shape or wv.shape != attn.to_v.weight.shape:
            raise ConceptError(f"Custom Diffusion weights for {layer} are {tuple(wk.shape)}; "
                               f"{model.name} needs {tuple(attn.to_k.weight.shape)}: the concept is for another model")
        kv[layer] = (wk.to(model.device, model.dtype), wv.to(model.device, model.dtype))
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
    return Concept(c.name, c.token, c.class_word, c.kind, c.phrase,
                   tuple(v.to(model.device, model.dtype) for v in vectors), kv, tuple(encoders),
                   c.references, c.example_prompt)


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


def find_concepts(folder: str | Path, model) -> list[Concept]:
    """Every concept folder under `folder` made for `model` (manifest 'model' field, or any)."""
    out = []
    for manifest in sorted(Path(folder).glob("*/manifest.json")):
        m = json.loads(manifest.read_text())
        if m.get("model") in (None, model.name):
            out.append(load_concept(manifest, model))
    return out

