"""Concept registry: textual inversion, Custom Diffusion and text-encoder fine-tune files -> Concept.

Formats read (each written by the tests in that exact layout first):

* textual inversion: diffusers / sd-concepts-library `learned_embeds.safetensors` or `.bin`
  (`{token: (n, dim) or (dim,)}`), SDXL's `{"clip_l": ..., "clip_g": ...}` (SD3's with `"t5"` when T5
  was trained; Flux's `{"clip_l": ..., "t5": ...}`), and A1111 `.pt`
  (`{"string_to_param": {"*": (n, dim)}, "name": ...}`);
* Custom Diffusion: Adobe's `delta.bin` (`{"unet": {"<layer>.to_k.weight": W, ...},
  "modifier_token": {token: vec}}`) and diffusers' `pytorch_custom_diffusion_weights.{bin,safetensors}`
  (`{"<layer>.processor.to_k_custom_diffusion.weight": W, ...}`) with the token in a TI file;
* text-encoder fine-tune (CatVersion-style): text-encoder weights in safetensors, used only to
  encode the customized prompt and p';
* DreamBooth-LoRA (lora.py): diffusers/peft and kohya safetensors, UNet (SD3/Flux: transformer) and
  text-encoder updates; the trigger word is read as ordinary text (`a photo of sks dog`).

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
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .concept_files import (MAX_EMBEDDING_BYTES, MAX_FILE_BYTES, check_file, check_safetensors, checked_tensor,
                            read_custom_diffusion, read_embeddings, read_file)
from .errors import ConceptError, short
from .settings import is_seed
from .lora import read_lora
from .concept_prompts import ConceptWords
from .weights import Edit, LowRank, Replace, overlay

KINDS = ("textual_inversion", "custom_diffusion", "text_encoder", "lora")
KIND_LABELS = {"textual_inversion": "textual inversion", "custom_diffusion": "Custom Diffusion",
               "text_encoder": "text-encoder fine-tune", "lora": "DreamBooth-LoRA"}
SHORT_KIND_LABELS = {**KIND_LABELS, "text_encoder": "text encoder", "lora": "LoRA"}  # where a label has to be short
# A token or class word is a word or two; every label, prompt and file name it enters stays short.
MAX_WORD_CHARS = 64
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
    # denoiser layer ('...attn2.to_k'; on SD3/Flux the transformer's) -> its customized weights
    unet: dict[str, Edit] = field(default_factory=dict)
    text_encoders: tuple = ()  # the customized text stack, in the order of the model's concept_encoders
    references: tuple[Path, ...] = ()
    example_prompt: str = ""
    # how often (share of seeds) the customized model and AlignIT draw both the concept and the rest of
    # `example_prompt`, measured by `scripts/table1.py --write-examples`; None when not measured
    example_rates: tuple[float, float] | None = None
    # the seed the demo runs the example on (`--write-examples`: the first where AlignIT draws it all and
    # the customized baseline draws the concept on another background); 0 when not measured
    example_seed: int = 0
    warnings: tuple[str, ...] = ()  # what in its files was not used, said to the user with every generation
    scale: float = 1.0  # a LoRA's adapter weight (diffusers' set_adapters), already in its updates
    # several concepts held at once (one_model): (token, vector count) each, in the order `vectors` stacks them
    vector_tokens: tuple[tuple[str, int], ...] = ()

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
    def key_value_edits(self) -> dict[str, tuple[Edit | None, Edit | None]]:
        """Cross-attention layer -> the customized key and value projections (None: the base one):
        what AlignIT projects the concept's rows of p' with."""
        out: dict[str, tuple[Edit | None, Edit | None]] = {}
        for name, edit in self.unet.items():
            layer, _, proj = name.rpartition(".")
            if layer.endswith("attn2") and proj in ("to_k", "to_v"):
                k, v = out.get(layer, (None, None))
                out[layer] = (edit, v) if proj == "to_k" else (k, edit)
        return out


def _example_seed(m: dict) -> int:
    """The manifest's `example_seed`, or 0 when absent or not a seed (it only chooses the example's seed)."""
    seed = m.get("example_seed")
    return seed if is_seed(seed) else 0


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
    weight; default the manifest's `scale`, else 1). Raises ConceptError (also for a kind the model's
    family does not take yet: SD3 and Flux take textual inversion and LoRA)."""
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
        tok, vectors, warnings = _read_embeddings_file(path, allow_pickle, max_bytes, token, model)
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
    _check_kind(kind, model)
    vectors, unet, encoders, tok, warnings = (), {}, (), m["token"], []
    if m.get("weights"):
        tok, vecs, warnings = _read_embeddings_file(_inside(folder, m["weights"]), allow_pickle, max_bytes, m["token"],
                                                    model)
        vectors = tuple(vecs)
    if kind == "custom_diffusion":
        if not m.get("custom_diffusion"):
            raise ConceptError("a Custom Diffusion manifest needs a 'custom_diffusion' weights file")
        unet, modifier = read_custom_diffusion(read_file(_inside(folder, m["custom_diffusion"]), allow_pickle, max_bytes))
        if not vectors and modifier:
            if tok not in modifier:
                raise ConceptError(f"the Custom Diffusion file has no embedding for {tok}")
            vectors = (checked_tensor(modifier[tok], f"the embedding of {tok}"),)
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
        encoders = (read_file(_inside(folder, m["text_encoder"]), allow_pickle, max_bytes),)
    refs = tuple(_inside(folder, r) for r in m.get("references", []))
    phrase = m.get("phrase", "{token} {class_word}" if kind == "custom_diffusion" else "{token}")
    concept = Concept(m.get("name", folder.name), tok, m["class_word"], kind, phrase=phrase, vectors=vectors,
                      unet=unet, text_encoders=encoders, references=refs, example_prompt=m.get("example_prompt", ""),
                      example_rates=_example_rates(m), example_seed=_example_seed(m), warnings=tuple(warnings))
    return _bind(concept, model)


def _read_embeddings_file(path: Path, allow_pickle: bool, max_bytes: int, token: str | None, model):
    """read_embeddings of a textual-inversion file for `model`, refused past MAX_EMBEDDING_BYTES."""
    return read_embeddings(read_file(path, allow_pickle, min(max_bytes, MAX_EMBEDDING_BYTES), "textual-inversion file"),
                           token, model.family.concept_keys)


def _holds_lora(path: Path, max_bytes: int) -> bool:
    """Whether a bare file is a LoRA, from its safetensors header alone (judged first)."""
    if path.suffix != ".safetensors":
        return False
    check_file(path, max_bytes)
    return check_safetensors(path, max_bytes, lora=None)


def _lora_concept(name: str, path: Path, model, max_bytes: int, token, class_word, scale, m: dict) -> Concept:
    """A DreamBooth-LoRA concept from its file; the trigger and class word as given, else the file's."""
    _check_kind("lora", model)
    if path.suffix != ".safetensors":
        raise ConceptError(f"{path.name}: a LoRA is read from .safetensors only")
    check_file(path, max_bytes, "LoRA file")
    check_safetensors(path, max_bytes, lora=True)
    lora = read_lora(path, model)
    if not (token and class_word) and lora.trigger is not None:
        token, class_word = token or lora.trigger[0], class_word or lora.trigger[1]
    if not (isinstance(token, str) and token.strip() and isinstance(class_word, str) and class_word.strip()):
        raise ConceptError(f"{path.name} does not say its trigger word and class word; give them (e.g. token "
                           f"'sks', class word 'dog')")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale <= 2:
        raise ConceptError("a LoRA's scale must be a number from 0 to 2")
    concept = Concept(name, token.strip(), class_word.strip(), "lora", phrase=m.get("phrase", "{token} {class_word}"),
                      unet={layer: edit.scaled(scale) for layer, edit in lora.denoiser.items()},
                      text_encoders=tuple({layer: edit.scaled(scale) for layer, edit in text.items()}
                                          for text in lora.text),
                      references=tuple(_inside(path.parent, r) for r in m.get("references", [])),
                      example_prompt=m.get("example_prompt", ""), example_rates=_example_rates(m),
                      example_seed=_example_seed(m), scale=float(scale))
    return _bind(concept, model)


def _check_kind(kind: str, model) -> None:
    """ConceptError when `model`'s family does not take concepts of `kind` (SD3 and Flux: Custom
    Diffusion and text-encoder fine-tunes, so far)."""
    kinds = model.family.concept_kinds
    if kinds is not None and kind not in kinds:
        raise ConceptError(model.family.concept_refusal)


def _bind(c: Concept, model) -> Concept:
    """Check lengths, shapes and norms against `model`, move tensors to its device/dtype, build
    fine-tuned encoders."""
    _check_kind(c.kind, model)
    for what, word in (("token", c.token), ("class word", c.class_word)):
        if len(word) > MAX_WORD_CHARS:
            raise ConceptError(f"the {what} {short(word, 24)} is {len(word)} characters; "
                               f"the limit is {MAX_WORD_CHARS}")
    if not c.token.strip() or any(ch.isspace() for ch in c.token):
        raise ConceptError(f"concept token {c.token!r} must be one word without spaces")
    widths = [te.get_input_embeddings().weight.shape[1] for te in model.concept_encoders]
    vectors = []
    for i, v in enumerate(c.vectors):
        v = v.reshape(1, -1) if v.ndim == 1 else v
        if v.ndim != 2 or v.shape[0] < 1 or v.shape[0] > 16:
            raise ConceptError(f"the embedding of {c.token} must be (vectors, width), got {tuple(v.shape)}")
        vectors.append(v)
    if vectors and len(vectors) != len(widths):
        raise ConceptError(f"{c.token} has embeddings for {len(vectors)} text encoder(s); "
                           f"{model.name} has {len(widths)}")
    for k, (v, w) in enumerate(zip(vectors, widths)):
        if v.shape[1] != w:
            which = "text encoder" if len(widths) == 1 else \
                f"text encoder {k + 1} ({type(model.concept_encoders[k]).__name__})"
            raise ConceptError(f"the embedding of {c.token} is {v.shape[1]} wide but {model.name}'s "
                               f"{which} is {w} wide: the concept is for another model")
    if len({v.shape[0] for v in vectors}) > 1:
        raise ConceptError(f"{c.token} has different vector counts per text encoder")
    for v, encoder in zip(vectors, model.concept_encoders):
        _check_norm(c.token, v, encoder, model.name)
    unet = {name: _fit(model.denoiser, name, edit, model, KIND_LABELS[c.kind]) for name, edit in c.unet.items()}
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
    """The model's text stack (its concept_encoders: the pipeline's order) with a LoRA's updates on
    every row (views sharing the model's weights), or () when the LoRA leaves the text encoders alone."""
    if not any(updates):
        return ()
    return tuple(overlay(te, {layer: [(None, _fit(te, layer, edit, model, "LoRA"))]
                              for layer, edit in (updates[i] if i < len(updates) else {}).items()})
                 for i, te in enumerate(model.concept_encoders))


def one_model(concepts: list[Concept]) -> Concept:
    """The customized model holding several concepts at once (the customized baseline of a prompt
    with all of them): every concept's vectors, numbered on in order, and the text stack and UNet
    weights of the concept that changes them. Raises ConceptError when two concepts change the same
    part (two Custom Diffusion concepts, two text-encoder fine-tunes): no single model holds both."""
    for part, what in (("unet", "denoiser's weights (UNet or transformer)"), ("text_encoders", "text encoder")):
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
                   text_encoders=encoders, warnings=tuple(w for c in concepts for w in c.warnings),
                   vector_tokens=tuple((c.token, c.n_vectors) for c in with_vectors))


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
    """Every concept folder under `folder` made for `model` (manifest 'model' field, or any) of a kind
    its family takes."""
    out, kinds = [], model.family.concept_kinds
    for manifest in sorted(Path(folder).glob("*/manifest.json")):
        m = json.loads(manifest.read_text())
        if m.get("model") in (None, model.name) and (kinds is None or m.get("kind") in kinds):
            out.append(load_concept(manifest, model))
    return out

