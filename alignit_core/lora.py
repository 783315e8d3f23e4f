"""LoRA files (DreamBooth-LoRA and kin) -> per-layer low-rank updates of the UNet and text encoders.

Formats read, safetensors only:

* diffusers / peft: `unet.<layer>.lora_A.weight` / `lora_B.weight` (peft's names), `.lora.down` /
  `.lora.up` (diffusers' training scripts), `text_encoder.<layer>.lora_linear_layer.down` / `up`
  or `lora_A` / `lora_B` (`text_encoder_2.` on SDXL); alpha from the file's `lora_adapter_metadata`
  (`lora_alpha`, `alpha_pattern`, `use_rslora`), else from a `<layer>.alpha` tensor, else the rank;
* kohya / A1111: `lora_unet_<layer, dots as underscores>.lora_down.weight`, `.lora_up.weight`,
  `.alpha`; text encoders `lora_te_` (SDXL: `lora_te1_`, `lora_te2_`); SDXL's UNet under the
  original model's block names (`input_blocks_4_1_...`, `middle_block_1_...`, `output_blocks_...`);
* SD3 and Flux: the transformer's layers in diffusers' names, `transformer.<layer>.lora_A.weight` /
  `lora_B.weight` (what their DreamBooth-LoRA scripts save), or dots as underscores under
  `lora_transformer_` with `lora_down` / `lora_up` / `alpha` (kohya-style files in diffusers' names);
  text encoders as above, in the pipeline's order (`text_encoder` / `lora_te1_` CLIP-L, `text_encoder_2`
  / `lora_te2_` SD3's CLIP-G or Flux's T5); and kohya's files in the original models' block names
  (Flux: `lora_unet_double_blocks_<i>_img_attn_qkv`, `single_blocks_<i>_linear1`, ...; SD3:
  `lora_unet_joint_blocks_<i>_x_block_attn_qkv`, `context_block_...`), whose fused projections are split
  by rows (one down, the up's rows per layer: the same update) and whose (shift, scale) modulations that
  diffusers stores as (scale, shift) are swapped, as diffusers' own conversion of the weights does; the
  same layers dotted under `diffusion_model.` with `lora_A` / `lora_B` (Black Forest Labs' and ComfyUI's
  files, e.g. `diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`).

An update is `alpha / rank · up(down(x))` (peft's rsLoRA: `alpha / √rank`). The trigger word and
class word come from the concept's manifest, else from kohya's `ss_tag_frequency` /
`ss_dataset_dirs` folder names (`10_sks dog`), else the caller names them.

The file's header (names, dtypes, shapes, offsets) is read and checked against the model first
(concepts.py has judged its size, tensor count and number types already): a key no format here
knows, a layer the model does not have, a shape it does not take or a rank past the layer's own is
refused before any tensor is read.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import ConceptError, short
from .weights import LowRank

FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
# a key: (target prefix, layer, part); target "unet" or "transformer" (the denoiser), "te0", "te1"
_DIFFUSERS = re.compile(r"^(?P<target>unet|transformer|text_encoder|text_encoder_2)\.(?P<layer>.+?)\."
                        r"(?P<part>lora_A\.weight|lora_B\.weight|lora\.down\.weight|lora\.up\.weight|"
                        r"lora_linear_layer\.down\.weight|lora_linear_layer\.up\.weight|alpha)$")
_KOHYA = re.compile(r"^lora_(?P<target>unet|transformer|te|te1|te2)_(?P<layer>.+?)\."
                    r"(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")
# Black Forest Labs' / ComfyUI's names: the original model's layers, dotted, under `diffusion_model.`
_ORIGINAL = re.compile(r"^(?P<target>diffusion_model)\.(?P<layer>.+?)\."
                       r"(?P<part>lora_A\.weight|lora_B\.weight|lora_down\.weight|lora_up\.weight|alpha)$")
_TARGETS = {"diffusion_model": "unet", "unet": "unet", "transformer": "transformer", "text_encoder": "te0",
            "text_encoder_2": "te1", "te": "te0", "te1": "te0", "te2": "te1"}
_DOWN = {"lora_A.weight", "lora.down.weight", "lora_linear_layer.down.weight", "lora_down.weight"}
_UP = {"lora_B.weight", "lora.up.weight", "lora_linear_layer.up.weight", "lora_up.weight"}
# the original model's ResNet layer names -> diffusers'
_LDM_RESNET = {"in_layers_2": "conv1", "emb_layers_1": "time_emb_proj", "out_layers_3": "conv2",
               "skip_connection": "conv_shortcut", "op": "conv"}


def is_lora(keys) -> bool:
    """Whether a safetensors file with these keys is a LoRA (rather than an embedding)."""
    return any(_DIFFUSERS.match(k) or _KOHYA.match(k) or _ORIGINAL.match(k) for k in keys)


@dataclass(frozen=True)
class LoRAFile:
    """What a LoRA file holds, checked against one model (tensors still on the CPU)."""

    denoiser: dict[str, LowRank]  # UNet or MMDiT transformer layer -> its update
    text: tuple[dict[str, LowRank], ...]  # per text encoder of the model: layer -> its update
    trigger: tuple[str, str] | None  # (token, class word) from the file's training metadata


def _denoiser_name(model) -> str:
    """What LoRA files call `model`'s denoiser: "unet", or "transformer" (SD3, Flux)."""
    return "unet" if type(model.denoiser).__name__.startswith("UNet") else "transformer"


def _linear_layers(root: torch.nn.Module) -> dict[str, str]:
    """Every way a file may name a linear/convolution layer of `root` -> its name in `root`."""
    names = {}
    for name, module in root.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            bare = name.removeprefix("text_model.")  # transformers 4 named a CLIP text model's layers text_model.*
            for alias in (bare, bare.replace(".", "_")):
                names.setdefault(alias, name)
    return names


def _sdxl_block(layer: str, unet) -> str:
    """A kohya SDXL layer in the original model's block names -> diffusers' (underscored)."""
    middle = re.match(r"^middle_block_(\d+)_(.+)$", layer)
    if middle is not None:
        where = {0: "mid_block_resnets_0", 1: "mid_block_attentions_0", 2: "mid_block_resnets_1"}.get(int(middle[1]))
        return f"{where}_{_LDM_RESNET.get(middle[2], middle[2])}" if where else layer
    m = re.match(r"^(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)$", layer)
    if m is None:
        return layer
    kind, block, part, rest = m[1], int(m[2]), int(m[3]), _LDM_RESNET.get(m[4], m[4])
    per = unet.config.layers_per_block + (kind == "output_blocks")
    if kind == "input_blocks":
        level, j = (block - 1) // (per + 1), (block - 1) % (per + 1)
        where = (f"down_blocks_{level}_downsamplers_0" if j == per else
                 f"down_blocks_{level}_{'resnets' if part == 0 else 'attentions'}_{j}")
    else:
        level, j = block // per, block % per
        up = unet.up_blocks[level] if level < len(unet.up_blocks) else None
        has_attention = up is not None and getattr(up, "attentions", None) is not None
        where = (f"up_blocks_{level}_resnets_{j}" if part == 0 else
                 f"up_blocks_{level}_attentions_{j}" if part == 1 and has_attention else
                 f"up_blocks_{level}_upsamplers_0")
    return f"{where}_{rest}"


# kohya's Flux / SD3 layers in the original models' names -> diffusers' layers: a list of one (a layer)
# or several (a fused projection, split by its up's rows: q, k, v, and Flux's single-block MLP the rest)
def _in(block: str, *layers: str) -> tuple[str, ...]:
    return tuple(f"{block}.{layer}" for layer in layers)


_J, _S = "transformer_blocks.{}", "single_transformer_blocks.{}"
_QKV, _ADD_QKV = ("attn.to_q", "attn.to_k", "attn.to_v"), ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
_FLUX_BLOCKS = {
    r"double_blocks_(\d+)_img_attn_qkv": _in(_J, *_QKV),
    r"double_blocks_(\d+)_img_attn_proj": _in(_J, "attn.to_out.0"),
    r"double_blocks_(\d+)_img_mlp_0": _in(_J, "ff.net.0.proj"),
    r"double_blocks_(\d+)_img_mlp_2": _in(_J, "ff.net.2"),
    r"double_blocks_(\d+)_img_mod_lin": _in(_J, "norm1.linear"),
    r"double_blocks_(\d+)_txt_attn_qkv": _in(_J, *_ADD_QKV),
    r"double_blocks_(\d+)_txt_attn_proj": _in(_J, "attn.to_add_out"),
    r"double_blocks_(\d+)_txt_mlp_0": _in(_J, "ff_context.net.0.proj"),
    r"double_blocks_(\d+)_txt_mlp_2": _in(_J, "ff_context.net.2"),
    r"double_blocks_(\d+)_txt_mod_lin": _in(_J, "norm1_context.linear"),
    r"single_blocks_(\d+)_linear1": _in(_S, *_QKV, "proj_mlp"),
    r"single_blocks_(\d+)_linear2": _in(_S, "proj_out"),
    r"single_blocks_(\d+)_modulation_lin": _in(_S, "norm.linear"),
    r"img_in": ("x_embedder",), r"txt_in": ("context_embedder",),
    r"time_in_in_layer": ("time_text_embed.timestep_embedder.linear_1",),
    r"time_in_out_layer": ("time_text_embed.timestep_embedder.linear_2",),
    r"vector_in_in_layer": ("time_text_embed.text_embedder.linear_1",),
    r"vector_in_out_layer": ("time_text_embed.text_embedder.linear_2",),
    r"guidance_in_in_layer": ("time_text_embed.guidance_embedder.linear_1",),
    r"guidance_in_out_layer": ("time_text_embed.guidance_embedder.linear_2",),
    r"final_layer_linear": ("proj_out",), r"final_layer_adaLN_modulation_1": ("norm_out.linear",),
}
_SD3_BLOCKS = {
    r"joint_blocks_(\d+)_x_block_attn_qkv": _in(_J, *_QKV),
    r"joint_blocks_(\d+)_x_block_attn_proj": _in(_J, "attn.to_out.0"),
    r"joint_blocks_(\d+)_x_block_attn2_qkv": _in(_J, "attn2.to_q", "attn2.to_k", "attn2.to_v"),
    r"joint_blocks_(\d+)_x_block_attn2_proj": _in(_J, "attn2.to_out.0"),
    r"joint_blocks_(\d+)_x_block_mlp_fc1": _in(_J, "ff.net.0.proj"),
    r"joint_blocks_(\d+)_x_block_mlp_fc2": _in(_J, "ff.net.2"),
    r"joint_blocks_(\d+)_x_block_adaLN_modulation_1": _in(_J, "norm1.linear"),
    r"joint_blocks_(\d+)_context_block_attn_qkv": _in(_J, *_ADD_QKV),
    r"joint_blocks_(\d+)_context_block_attn_proj": _in(_J, "attn.to_add_out"),
    r"joint_blocks_(\d+)_context_block_mlp_fc1": _in(_J, "ff_context.net.0.proj"),
    r"joint_blocks_(\d+)_context_block_mlp_fc2": _in(_J, "ff_context.net.2"),
    r"joint_blocks_(\d+)_context_block_adaLN_modulation_1": _in(_J, "norm1_context.linear"),
    r"x_embedder_proj": ("pos_embed.proj",), r"context_embedder": ("context_embedder",),
    r"t_embedder_mlp_0": ("time_text_embed.timestep_embedder.linear_1",),
    r"t_embedder_mlp_2": ("time_text_embed.timestep_embedder.linear_2",),
    r"y_embedder_mlp_0": ("time_text_embed.text_embedder.linear_1",),
    r"y_embedder_mlp_2": ("time_text_embed.text_embedder.linear_2",),
    r"final_layer_linear": ("proj_out",), r"final_layer_adaLN_modulation_1": ("norm_out.linear",),
}


@dataclass(frozen=True)
class _Part:
    """Where a file's layer lands in the model: a layer, the rows of the file's up weight it takes
    (None: all), and whether the up's two halves swap ((shift, scale) -> diffusers' (scale, shift))."""

    layer: str
    rows: tuple[int, int] | None = None
    swap: bool = False
    of: int = 0  # the fused layer's rows in all


def _original_mmdit_block(layer: str, transformer, model_name: str) -> list[_Part] | None:
    """A kohya SD3 / Flux layer in the original model's block names -> diffusers' layers, or None when
    `layer` is not one (it is then looked up as it is). ConceptError for the other family's layer."""
    flux = hasattr(transformer, "single_transformer_blocks")
    own, other = (_FLUX_BLOCKS, _SD3_BLOCKS) if flux else (_SD3_BLOCKS, _FLUX_BLOCKS)
    if not any(re.fullmatch(p, layer) for p in own) and any(re.fullmatch(p, layer) for p in other):
        raise ConceptError(f"the LoRA's layer {short(layer)} is {'an SD3' if flux else 'a Flux'} layer; {model_name} is "
                           f"{'a Flux' if flux else 'an SD3'} model: the LoRA is for another model")
    for pattern, targets in own.items():
        m = re.fullmatch(pattern, layer)
        if m is None:
            continue
        names = [t.format(*m.groups()) for t in targets]
        modules = [_get(transformer, n) for n in names]
        if any(module is None for module in modules):
            return [_Part(names[0])]  # not in this model: refused as "does not exist" by the caller
        block = names[0].removesuffix(".norm1_context.linear")  # SD3's last block ends the text stream
        swap = names[0] == "norm_out.linear" or (block != names[0] and getattr(_get(transformer, block),
                                                                                "context_pre_only", False))
        if len(names) == 1:
            return [_Part(names[0], swap=swap)]
        total, start, parts = sum(module.out_features for module in modules), 0, []
        for name, module in zip(names, modules):
            parts.append(_Part(name, (start, start + module.out_features), of=total))
            start += module.out_features
        return parts
    return None


def _get(root, name: str):
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


def _trigger(metadata: dict) -> tuple[str, str] | None:
    """(token, class word) from kohya's training folders, `<repeats>_<token> <class word>`."""
    found = set()
    for key in ("ss_tag_frequency", "ss_dataset_dirs"):
        try:
            folders = json.loads(metadata.get(key) or "{}")
        except json.JSONDecodeError:
            continue
        for folder in folders if isinstance(folders, dict) else ():
            m = re.match(r"^\d+_(\S+)\s+(.+)$", str(folder).strip())
            if m:
                found.add((m.group(1), m.group(2).strip()))
    return found.pop() if len(found) == 1 else None


def _config(metadata: dict) -> dict:
    try:
        config = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except json.JSONDecodeError:
        config = None
    if not isinstance(config, dict):
        raise ConceptError("the LoRA file's lora_adapter_metadata is not a valid adapter configuration")
    return config


def _alpha(config: dict, prefix: str, layer: str, rank: int) -> float:
    """peft's alpha / rank (or alpha / √rank) for `layer` from diffusers' saved adapter config. The
    alpha pattern's keys are read as the module names diffusers writes there; one that is a regular
    expression is refused, never run (a file's pattern could keep a regular expression engine busy
    for hours)."""
    if config.get(f"{prefix}.use_dora"):
        raise ConceptError("the LoRA is a DoRA (weight-decomposed) adapter, which this reader does not apply")
    alpha = config.get(f"{prefix}.lora_alpha", rank)
    patterns = config.get(f"{prefix}.alpha_pattern") or {}
    for module, value in (patterns.items() if isinstance(patterns, dict) else ()):
        if not re.fullmatch(r"[\w.]+", module):
            raise ConceptError(f"the LoRA's alpha pattern {short(repr(module))} is a regular expression; this reader "
                               f"takes module names only")
        if layer == module or layer.endswith(f".{module}"):
            alpha = value
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ConceptError(f"the LoRA's alpha for {layer} is {short(repr(alpha))}, not a number")
    return alpha / (math.sqrt(rank) if config.get(f"{prefix}.use_rslora") else rank)


def read_lora(path: Path, model) -> LoRAFile:
    """Read and check a LoRA safetensors file (its size and header judged already) for `model`.
    Raises ConceptError (for people)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            header = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
            parts = _plan(header, metadata, model)
            tensors = {k: f.get_tensor(k) for k in header}
    except ConceptError:
        raise
    except (SafetensorError, OSError, ValueError) as e:
        raise ConceptError(f"{path.name} is not a valid safetensors file ({e})") from None
    config = _config(metadata)
    denoiser = _denoiser_name(model)
    targets = {denoiser: {}, "te0": {}, "te1": {}}
    for (target, layer), keys in parts.items():
        down, up = tensors[keys["down"]], tensors[keys["up"]]
        if keys.get("rows") is not None:  # a fused projection's share
            up = up[keys["rows"][0]: keys["rows"][1]]
        if keys.get("swap"):  # (shift, scale) -> (scale, shift)
            up = torch.cat(up.chunk(2)[::-1])
        for key in (keys["down"], keys["up"]):
            if not torch.isfinite(tensors[key]).all():
                raise ConceptError(f"the LoRA's {short(key)} holds numbers that are not finite")
        rank = down.shape[0]
        prefix = {"te0": "text_encoder", "te1": "text_encoder_2"}.get(target, target)
        if "alpha" in keys:
            scale = float(tensors[keys["alpha"]].float().reshape(-1)[0]) / rank
        else:
            scale = _alpha(config, prefix, layer, rank)
        targets[target][layer] = LowRank(down.float(), up.float(), scale)
    text = tuple(targets[f"te{i}"] for i in range(len(model.concept_encoders)))
    return LoRAFile(targets[denoiser], text, _trigger(metadata))


def _plan(header: dict, metadata: dict, model) -> dict:
    """{(target, layer in the model): {"down": key, "up": key, "alpha": key}} from the header
    alone, every layer and shape checked against `model`."""
    denoiser = _denoiser_name(model)
    # the text encoders in the pipeline's order (Flux's primary table is T5's, but its files count CLIP first)
    roots = {denoiser: model.denoiser, **{f"te{i}": te for i, te in enumerate(model.concept_encoders)}}
    names = {target: _linear_layers(root) for target, root in roots.items()}
    parts: dict = {}
    unknown = []
    for key, (dtype, shape) in header.items():
        m = _DIFFUSERS.match(key) or _KOHYA.match(key) or _ORIGINAL.match(key)
        if m is None:
            unknown.append(key)
            continue
        if dtype not in FLOAT_DTYPES:
            raise ConceptError(f"the LoRA's {short(key)} is {dtype}, not floating point")
        target = _TARGETS[m["target"]]
        layer = m["layer"]
        where = None
        if m.re is _ORIGINAL and denoiser != "transformer":
            raise ConceptError(f"the LoRA's {short(key)} names an original model's layer under diffusion_model., "
                               f"read for SD3 and Flux; {model.name} is a UNet model, whose LoRA files name "
                               f"unet.<layer> or lora_unet_<layer>")
        if target == "unet" and m.re is not _DIFFUSERS and denoiser == "transformer":
            where = _original_mmdit_block(layer.replace(".", "_"), model.denoiser, model.name)
            if where is None and m.re is _ORIGINAL:
                raise ConceptError(f"the LoRA's layer {short(layer)} is no layer of SD3 or Flux: "
                                   f"the LoRA is for another model")
            target = "transformer" if where is not None else target
        _check_target(target, denoiser, key, model)
        if where is None:
            if target == "unet" and m.re is _KOHYA:
                layer = _sdxl_block(layer, model.unet)
            elif target.startswith("te"):
                layer = layer.removeprefix("text_model.").removeprefix("text_model_")
            where = [_Part(layer)]
        if target not in names:
            raise ConceptError(f"the LoRA has weights for a second text encoder ({short(key)}); {model.name} has one: "
                               f"the LoRA is for another model")
        part = "down" if m["part"] in _DOWN else "up" if m["part"] in _UP else "alpha"
        if part == "alpha" and math.prod(shape) != 1:
            raise ConceptError(f"the LoRA's {short(key)} holds {math.prod(shape)} numbers; an alpha is one number")
        for w in where:
            resolved = names[target].get(w.layer)
            if resolved is None:
                raise ConceptError(f"the LoRA's layer {short(m['layer'])} does not exist in {model.name}: "
                                   f"the LoRA is for another model")
            entry = parts.setdefault((target, resolved), {})
            entry.update({part: key, "rows": w.rows, "swap": w.swap})
            if part == "up" and w.rows is not None:  # its rows of a fused layer, when the file's up has them all
                entry["up shape"] = (w.rows[1] - w.rows[0], *shape[1:]) if shape and shape[0] == w.of else shape
            elif part != "alpha":
                entry[f"{part} shape"] = shape
    if unknown:
        raise ConceptError(f"the LoRA file holds keys this reader does not know, e.g. "
                           f"{[short(k) for k in unknown[:3]]} (LyCORIS, DoRA and other adapters are not read); "
                           f"refusing it rather than leaving them out")
    if not parts:
        raise ConceptError("the file holds no LoRA weights")
    for (target, layer), keys in parts.items():
        if "down" not in keys or "up" not in keys:
            raise ConceptError(f"the LoRA has {'an up' if 'up' in keys else 'a down'} weight for {layer} but no "
                               f"{'down' if 'up' in keys else 'up'} weight")
        _check_shapes(roots[target].get_submodule(layer), layer, keys["down shape"], keys["up shape"], model)
    return {k: {p: v for p, v in keys.items() if not p.endswith("shape")} for k, keys in parts.items()}


def _check_target(target: str, denoiser: str, key: str, model) -> None:
    """ConceptError for a key of another kind of denoiser than `model`'s."""
    if target == denoiser or target.startswith("te"):
        return
    if target == "transformer":
        raise ConceptError(f"the LoRA's {short(key)} names a transformer layer (SD3/Flux); {model.name} is a UNet "
                           f"model: the LoRA is for another model")
    if target == "unet":
        raise ConceptError(f"the LoRA's {short(key)} names a UNet layer; {model.name} is an SD3/Flux transformer, "
                           f"whose LoRA files name transformer.<layer>, lora_transformer_<layer> or the original "
                           f"model's blocks (lora_unet_double_blocks_..., lora_unet_joint_blocks_...): the LoRA is "
                           f"for another model")


def _check_shapes(layer: torch.nn.Module, name: str, down: tuple, up: tuple, model) -> None:
    weight = tuple(layer.weight.shape)
    rank = down[0] if down else 0
    if isinstance(layer, torch.nn.Conv2d):
        fits = (down[1:] in (weight[1:], (weight[1],)) and rank > 0 and up[:2] == (weight[0], rank)
                and up[2:] in ((), (1, 1)) and (len(down) == 4 or weight[2:] == (1, 1)))
    else:
        fits = len(down) == 2 and len(up) == 2 and down[1] == weight[1] and up == (weight[0], rank)
    if not fits or rank < 1:
        raise ConceptError(f"the LoRA's weights for {name} are {down} and {up}; {model.name}'s layer is {weight}: "
                           f"the LoRA is for another model")
    side = min(weight[0], math.prod(weight[1:]))
    if rank > side:  # a full update needs no more; past it the file only costs memory and time
        raise ConceptError(f"the LoRA's rank for {name} is {rank}; the layer takes at most {side}")
