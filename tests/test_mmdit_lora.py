"""DreamBooth-LoRA concepts on SD3 and Flux: files in diffusers' names (what peft and `save_lora_weights`
write) and in kohya-style names, the customized baseline against diffusers' own `load_lora_weights`,
AlignIT's side stream through the LoRA's text branch alone, the shared model never changed, and the
clear refusals. Tiny random-weight pipelines; seconds each."""
from __future__ import annotations

import copy
import hashlib
import json
import re

import numpy as np
import pytest
import torch
from conftest import assert_writes_only
from safetensors.torch import save_file

from alignit_core import Settings, generate_concept, generate_swap, load_concept
from alignit_core.conditioning import Row
from alignit_core.errors import ConceptError, SettingsError
from alignit_core.families.mmdit_score import on_grid
from alignit_core.generate import run_rows
from alignit_core.models import from_components
from alignit_core.testing import tiny_flux, tiny_sd3
from alignit_core.weights import RowEdited

FAST = dict(seed=1, steps=3, size=32)
PROMPT = "a photo of a sks"  # customized: "a photo of a sks dog"; p: "a photo of a dog"
BUILD = {"sd3": tiny_sd3, "flux": tiny_flux}
IMAGE_BRANCH = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.2", "norm1.linear"]
TEXT_BRANCH = ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff_context.net.0.proj",
               "ff_context.net.2", "norm1_context.linear"]
SINGLE = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear"]


@pytest.fixture(scope="module")
def models():
    return {name: from_components(build(), f"tiny-{name}") for name, build in BUILD.items()}


def _layers(model, joint=(), single=(), top=()) -> list[str]:
    t = model.denoiser
    names = [f"transformer_blocks.{i}.{x}" for i in range(len(t.transformer_blocks)) for x in joint]
    names += [f"single_transformer_blocks.{i}.{x}" for i in range(len(getattr(t, "single_transformer_blocks", ())))
              for x in single]
    return [n for n in names + list(top) if isinstance(_module(t, n), torch.nn.Linear)]  # SD3's last block: no text out


def _module(root, name):
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


def _text_layers(model, encoder: int = 0) -> list[str]:
    """The attention projections of text encoder `encoder` (pipeline order: CLIP-L, then SD3's CLIP-G or
    Flux's T5), as a file names them."""
    projections = ("q_proj", "k_proj", "v_proj", "out_proj", "q", "k", "v", "o")
    names = [n for n, m in model.concept_encoders[encoder].named_modules()
             if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in projections]
    return [f"{('text_encoder', 'text_encoder_2')[encoder]}.{n}" for n in names]


def _pairs(model, layers, seed=0, rank=2, zero=False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """layer (a transformer layer, or `text_encoder.<layer>` / `text_encoder_2.<layer>`) -> (down (rank, in),
    up (out, rank)): updates large enough to change the picture."""
    g = torch.Generator().manual_seed(seed)
    roots = {"text_encoder": model.concept_encoders[0], "text_encoder_2": model.concept_encoders[1]}
    out = {}
    for name in layers:
        part, _, layer = name.partition(".")
        weight = (roots[part].get_submodule(layer) if part in roots else model.denoiser.get_submodule(name)).weight
        down = torch.randn(rank, weight.shape[1], generator=g) / weight.shape[1] ** 0.5
        up = torch.zeros(weight.shape[0], rank) if zero else torch.randn(weight.shape[0], rank, generator=g) * 0.5
        out[name] = (down, up)
    return out


def _diffusers_file(path, pairs, alpha=4.0, rank=2):
    tensors = {}
    for name, (down, up) in pairs.items():
        key = name if name.startswith("text_encoder") else f"transformer.{name}"
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = down, up
    config = {f"{part}.{x}": value for part in ("transformer", "text_encoder", "text_encoder_2")
              for x, value in (("r", rank), ("lora_alpha", alpha))}
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": json.dumps(config)})
    return path


def _kohya_file(path, pairs, alpha=4.0):
    tensors = {}
    for name, (down, up) in pairs.items():
        part, _, layer = name.partition(".")
        prefix = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}.get(part)
        stem = prefix + layer.replace(".", "_") if prefix else "lora_transformer_" + name.replace(".", "_")
        tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"] = down, up
        tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


def _concept(model, tmp_path, layers, **kw):
    path = tmp_path / f"lora-{len(layers)}-{kw.get('seed', 0)}.safetensors"
    _diffusers_file(path, _pairs(model, layers, **kw))
    return load_concept(path, model, token="sks", class_word="dog")


def _hash(module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("name, text", [("sd3", False), ("sd3", True), ("flux", False), ("flux", True)])
def test_the_customized_baseline_is_what_diffusers_draws_with_load_lora_weights(models, tmp_path, name, text):
    """What diffusers' DreamBooth-LoRA scripts save (peft's adapters, `save_lora_weights`), with the CLIP
    text encoders' LoRA (`--train_text_encoder`: SD3's two, Flux's one) or without."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    trained = BUILD[name]()
    targets = {"transformer": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                               "to_add_out", "ff.net.2", "ff_context.net.2", "proj_mlp"]}
    if text:
        clip = ["q_proj", "k_proj", "v_proj", "out_proj"]
        targets.update({"text_encoder": clip, **({"text_encoder_2": clip} if name == "sd3" else {})})
    torch.manual_seed(0)
    saved = {}
    for part, modules in targets.items():
        module = getattr(trained, part)
        module.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=modules))
        with torch.no_grad():
            for n, p in module.named_parameters():
                if "lora_B" in n:
                    p.mul_(4.0)
        saved[f"{part}_lora_layers"] = get_peft_model_state_dict(module)
        saved[f"{part}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
    cls = StableDiffusion3Pipeline if name == "sd3" else FluxPipeline
    cls.save_lora_weights(tmp_path, **saved)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    model = from_components(BUILD[name](), f"tiny-{name}")  # the LoRA's views made before the model's first call
    concept = load_concept(path, model, token="sks", class_word="dog")
    assert concept.kind == "lora" and any("single_transformer_blocks" in k for k in concept.unet) == (name == "flux")
    assert len(concept.text_encoders) == (len(model.concept_encoders) if text else 0)
    gen = generate_concept(model, PROMPT, concept, Settings(**FAST))
    assert gen.record()["customized_prompt"] == "a photo of a sks dog" and gen.record()["p"] == "a photo of a dog"

    reference = BUILD[name]()
    reference.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="concept")
    guidance = gen.settings.guidance

    def draw(pipe):  # on the engine's latent grid (Flux's pipeline returns its packed tokens)
        return on_grid(name, pipe("a photo of a sks dog", num_inference_steps=3, height=32, width=32,
                                  guidance_scale=guidance, generator=torch.Generator().manual_seed(1),
                                  output_type="latent").images[0])

    theirs, plain = draw(reference), draw(BUILD[name]())
    assert (theirs - plain).abs().max() > 0.05  # the LoRA shows
    # merged weights round otherwise than an added low-rank output (a misplaced layer: 0.1 and more)
    torch.testing.assert_close(gen.latents["customized"], theirs, rtol=0, atol=1e-3)
    if text:  # the text encoders' LoRA shows too: without it the picture is another
        cls.save_lora_weights(tmp_path / "transformer", transformer_lora_layers=saved["transformer_lora_layers"],
                              transformer_lora_adapter_metadata=saved["transformer_lora_adapter_metadata"])
        no_text = BUILD[name]()
        no_text.load_lora_weights(str(tmp_path / "transformer"), weight_name=path.name, adapter_name="concept")
        without = draw(no_text)
        assert (without - plain).abs().max() > 0.05 and (without - theirs).abs().max() > 1e-3


@pytest.mark.parametrize("encoder_of, layer", [
    (lambda: tiny_sd3().text_encoder, "text_model.encoder.layers.0.self_attn.q_proj"),  # CLIP with projection
    (lambda: tiny_flux().text_encoder_2, "encoder.block.0.layer.0.SelfAttention.q")])  # T5
@pytest.mark.parametrize("called_first", [False, True])
def test_a_text_encoders_view_records_each_hidden_state_once_made_before_or_after_its_first_call(
        encoder_of, layer, called_first):
    """transformers 5 hooks a model's layers to record hidden states at its first call: a view made
    before or after it must not leave them hooked twice (SD3 reads CLIP's penultimate layer; a LoRA
    with text encoders uploaded after the model's first request broke every later request)."""
    from alignit_core.weights import LowRank, overlay

    encoder = encoder_of()
    ids = torch.tensor([[49406, 320, 1125, 49407]]) % encoder.config.vocab_size
    fresh = encoder(ids, output_hidden_states=True).hidden_states if called_first else None
    width = encoder.get_submodule(layer).in_features
    view = overlay(encoder, {layer: [(None, LowRank(torch.zeros(2, width), torch.zeros(width, 2), 1.0))]})
    seen, own = view(ids, output_hidden_states=True), encoder(ids, output_hidden_states=True)
    layers = getattr(encoder.config, "num_hidden_layers", None) or encoder.config.num_layers
    assert len(seen.hidden_states) == len(own.hidden_states) == layers + 1
    for k, (a, b) in enumerate(zip(seen.hidden_states, own.hidden_states)):
        assert torch.equal(a, b)
        if fresh is not None:
            assert torch.equal(b, fresh[k])
    reference = encoder_of()
    reference(ids, output_hidden_states=True)
    hooks = [sum(len(m._forward_hooks) for m in e.modules()) for e in (encoder, reference)]
    assert hooks[0] == hooks[1] > 0  # as many as the model's own first call installs


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_a_lora_whose_updates_are_zero_draws_the_base_model_bit_for_bit(models, tmp_path, name):
    model = models[name]
    everything = _layers(model, IMAGE_BRANCH + TEXT_BRANCH, SINGLE, ["context_embedder", "proj_out"])
    concept = _concept(model, tmp_path, everything, zero=True)
    gen = generate_concept(model, PROMPT, concept, Settings(**FAST), include_base=True)
    plan, _ = gen.request.sources[0]
    customized = gen.request.customized
    _, _, _, plain = run_rows(model, [Row("customized", customized), Row("alignit", gen.request.p, swap=plan),
                                      Row("base", gen.request.p)], gen.settings)
    for k, row in enumerate(("customized", "alignit", "base")):
        assert torch.equal(gen.latents[row], plain[k]), row
    assert not torch.equal(gen.latents["alignit"], gen.latents["base"])  # AlignIT swapped p''s rows in


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_a_lora_on_the_image_branch_alone_leaves_alignit_as_the_base_text_branch_draws_it(models, tmp_path, name):
    """The side stream runs the text branch only: a LoRA of the image branch reaches the customized row alone."""
    model = models[name]
    concept = _concept(model, tmp_path, _layers(model, IMAGE_BRANCH, top=["proj_out"]))
    gen = generate_concept(model, PROMPT, concept, Settings(**FAST), include_base=True)
    plan, _ = gen.request.sources[0]
    rows = [Row("customized", gen.request.customized), Row("alignit", gen.request.p, swap=plan),
            Row("base", gen.request.p)]
    _, _, _, plain = run_rows(model, rows, gen.settings)
    assert torch.equal(gen.latents["alignit"], plain[1]) and torch.equal(gen.latents["base"], plain[2])
    assert (gen.latents["customized"] - plain[0]).abs().max() > 0.05


@pytest.mark.parametrize("name, part", [("sd3", "transformer"), ("flux", "transformer"), ("sd3", "text encoders"),
                                        ("flux", "text encoders")])
def test_a_text_branch_lora_changes_alignit_through_the_class_words_keys_and_values_alone(models, tmp_path, name, part):
    """A LoRA of the transformer's text branch, or of the text encoders alone (which encode p' for the side
    stream): AlignIT's image changes, and only through the keys and values the swap writes."""
    model = models[name]
    layers = _layers(model, TEXT_BRANCH, SINGLE, ["context_embedder"]) if part == "transformer" else \
        _text_layers(model) + _text_layers(model, 1)  # SD3: CLIP-L and CLIP-G; Flux: CLIP and T5
    concept = _concept(model, tmp_path, layers, seed=2)
    assert bool(concept.unet) == (part == "transformer") and bool(concept.text_encoders) == (part != "transformer")
    seen, plain_seen = [], []
    gen = generate_concept(model, PROMPT, concept, Settings(**FAST), include_base=True, include_customized=False,
                           on_kv=seen.append)
    plan, _ = gen.request.sources[0]
    _, _, _, plain = run_rows(model, [Row("alignit", gen.request.p, swap=plan), Row("base", gen.request.p)],
                              gen.settings, on_kv=plain_seen.append)
    # the LoRA's text branch shows in AlignIT (through one token's keys and values: far above rounding, ~1e-6)
    assert (gen.latents["alignit"] - plain[0]).abs().max() > 1e-3
    assert torch.equal(gen.latents["base"], plain[1])
    dog = [t.position for t in gen.tokens["base"] if t.word == "dog"]
    half = 2 if name == "sd3" else 0  # SD3: [uncond alignit, uncond base, cond alignit, cond base]
    assert gen.swapped["alignit"] == tuple(dog)
    assert_writes_only(seen, half, dog)  # every block and step: the AlignIT row's class word alone
    # the first block at the first step: with and without the LoRA the same keys and values but the written rows
    first, plain_first = seen[0], plain_seen[0]
    assert (first.block, first.step) == (plain_first.block, plain_first.step) == (0, 0)
    rows = [first.text.start + p for p in dog]
    for ours, theirs in ((first.swapped_key, plain_first.swapped_key),
                         (first.swapped_value, plain_first.swapped_value)):
        gap = (ours - theirs).abs().amax((-1, -2))  # (batch, tokens)
        assert (gap[half, rows] > 1e-4).all()
        gap[half, rows] = 0
        assert not gap.any()
    # and the base image's rows (both CFG halves on SD3) never see the LoRA
    base = [1, 3] if name == "sd3" else [1]
    for r, q in zip(seen, plain_seen):
        assert torch.equal(r.swapped_key[base], q.swapped_key[base]), (r.block, r.step)
        assert torch.equal(r.swapped_value[base], q.swapped_value[base]), (r.block, r.step)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_the_side_stream_is_the_merged_lora_models_text_branch(models, tmp_path, name):
    """AlignIT's side stream computes W·x + scale·B(A·x) beside the shared weights: what a copy of the
    transformer with the LoRA merged into it (W + scale·B·A) gives as a customized text branch."""
    from alignit_core.families.mmdit import MMDiTRow, MMDiTSettings, MMDiTSwap, TextBranch, generate_rows

    model = models[name]
    concept = _concept(model, tmp_path, _layers(model, TEXT_BRANCH, SINGLE, ["context_embedder"]), seed=6)
    gen = generate_concept(model, PROMPT, concept, Settings(**FAST), include_customized=False)
    merged = copy.deepcopy(model.denoiser)
    with torch.no_grad():
        for layer, edit in concept.unet.items():
            merged.get_submodule(layer).weight += edit.scale * edit.up @ edit.down
    plan, _ = gen.request.sources[0]
    read = getattr(plan, "source_positions", None) or None
    settings = MMDiTSettings(**FAST, guidance=gen.settings.guidance)

    def alignit(branch):
        swap = MMDiTSwap(tuple(plan.positions), plan.source.text, branch, read)
        return on_grid(name, generate_rows(model.family.mmdit, [MMDiTRow("alignit", gen.request.p.text, swaps=(swap,))],
                                           settings).latents["alignit"])

    direct = alignit(TextBranch(transformer=merged))
    assert (alignit(None) - direct).abs().max() > 1e-3  # the LoRA shows
    torch.testing.assert_close(gen.latents["alignit"], direct, rtol=0, atol=2e-5)


def test_on_flux_a_clip_lora_reaches_the_customized_row_alone(models, tmp_path):
    """Flux's CLIP gives only the pooled vector, and the side stream is modulated with the main row's."""
    flux = models["flux"]
    concept = _concept(flux, tmp_path, _text_layers(flux), seed=7)
    gen = generate_concept(flux, PROMPT, concept, Settings(**FAST))
    plan, _ = gen.request.sources[0]
    _, _, _, plain = run_rows(flux, [Row("customized", gen.request.customized),
                                     Row("alignit", gen.request.p, swap=plan)], gen.settings)
    assert (gen.latents["customized"] - plain[0]).abs().max() > 1e-3
    assert torch.equal(gen.latents["alignit"], plain[1])


def test_on_flux_the_single_blocks_shared_weights_act_on_the_side_streams_text(models, tmp_path):
    flux = models["flux"]
    joint = len(flux.denoiser.transformer_blocks)
    concept = _concept(flux, tmp_path, [f"single_transformer_blocks.0.{x}" for x in SINGLE], seed=3)
    seen, plain_seen = [], []
    gen = generate_concept(flux, PROMPT, concept, Settings(**FAST), include_customized=False, on_kv=seen.append)
    plan, _ = gen.request.sources[0]
    run_rows(flux, [Row("alignit", gen.request.p, swap=plan)], gen.settings, on_kv=plain_seen.append)
    first = [(r, q) for r, q in zip(seen, plain_seen) if r.step == 0]
    for r, q in first:  # before the first single block the side stream is the base model's
        same = torch.equal(r.swapped_key, q.swapped_key) and torch.equal(r.swapped_value, q.swapped_value)
        assert same == (r.block < joint), r.block


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_a_lora_request_leaves_the_pipeline_as_it_was(models, tmp_path, name):
    model = models[name]
    before = generate_swap(model, "a photo of a dog", [("dog", "cat")], Settings(**FAST))
    weights = _hash(model.denoiser)
    # with its text encoders' LoRA too, made after the model's first request (it once doubled their hooks)
    concept = _concept(model, tmp_path, _layers(model, IMAGE_BRANCH + TEXT_BRANCH, SINGLE) + _text_layers(model),
                       seed=4)
    assert concept.text_encoders
    generate_concept(model, PROMPT, concept, Settings(**FAST), include_base=True)
    assert _hash(model.denoiser) == weights
    assert not any(isinstance(m, RowEdited) or "lora" in n for n, m in model.denoiser.named_modules())
    after = generate_swap(model, "a photo of a dog", [("dog", "cat")], Settings(**FAST))
    for row in before.images:
        assert torch.equal(before.latents[row], after.latents[row])
        assert np.array_equal(np.asarray(before.images[row]), np.asarray(after.images[row]))


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_kohya_and_diffusers_names_of_the_same_weights_draw_the_same(models, tmp_path, name):
    model = models[name]
    transformer = _layers(model, IMAGE_BRANCH + TEXT_BRANCH, SINGLE, ["context_embedder"])
    pairs = _pairs(model, transformer + _text_layers(model), seed=5)
    ours = load_concept(_diffusers_file(tmp_path / "d.safetensors", pairs), model, token="sks", class_word="dog")
    kohya = load_concept(_kohya_file(tmp_path / "k.safetensors", pairs), model, token="sks", class_word="dog")
    assert ours.unet.keys() == kohya.unet.keys() == set(transformer)
    assert all(ours.unet[k].scale == kohya.unet[k].scale == 2.0 for k in transformer)  # alpha 4 / rank 2
    assert len(ours.text_encoders) == len(kohya.text_encoders) == len(model.concept_encoders)
    a = generate_concept(model, PROMPT, ours, Settings(**FAST))
    b = generate_concept(model, PROMPT, kohya, Settings(**FAST))
    for row in ("customized", "alignit"):
        assert torch.equal(a.latents[row], b.latents[row]), row


def test_bad_lora_files_are_refused_clearly(models, tiny_sd, tmp_path):
    sd3, flux = models["sd3"], models["flux"]

    def refused(tensors, match, model=sd3, **save):
        path = tmp_path / f"bad-{len(list(tmp_path.iterdir()))}.safetensors"
        save_file(tensors, str(path), **save)
        with pytest.raises(ConceptError, match=match):
            load_concept(path, model, token="sks", class_word="dog")

    good = {f"transformer.transformer_blocks.0.attn.add_k_proj.lora_{x}.weight": torch.zeros(*s)
            for x, s in (("A", (2, 32)), ("B", (32, 2)))}
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x20\x00\x00\x00\x00\x00\x00\x00{not json at all}" + bytes(64))
    with pytest.raises(ConceptError):
        load_concept(corrupt, sd3, token="sks", class_word="dog")
    refused({"transformer.transformer_blocks.0.attn.add_k_proj.lora_A.weight": torch.zeros(2, 64),
             "transformer.transformer_blocks.0.attn.add_k_proj.lora_B.weight": torch.zeros(32, 2)},
            r"are \(2, 64\) and \(32, 2\); tiny-sd3's layer is \(32, 32\): the LoRA is for another model")
    refused({k.replace("transformer_blocks.0", "transformer_blocks.2"): v for k, v in good.items()},
            "does not exist in tiny-flux", model=flux)  # an SD3 LoRA (3 joint blocks) on Flux (2)
    refused({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 32),
             "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 2)},
            "names a UNet layer; tiny-flux is an SD3/Flux transformer", model=flux)
    refused({"lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight": torch.zeros(2, 32),
             "lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight": torch.zeros(3 * 48, 2)},  # a wider model's
            r"are \(2, 32\) and \(144, 2\); tiny-flux's layer is \(32, 32\)", model=flux)
    refused({"lora_unet_double_blocks_5_img_attn_proj.lora_down.weight": torch.zeros(2, 32),
             "lora_unet_double_blocks_5_img_attn_proj.lora_up.weight": torch.zeros(32, 2)},
            "double_blocks_5_img_attn_proj does not exist in tiny-flux", model=flux)
    refused({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 32),
             "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(96, 2)},
            "double_blocks_0_img_attn_qkv is a Flux layer; tiny-sd3 is an SD3 model: the LoRA is for another model")
    refused({**good, "transformer.transformer_blocks.0.attn.add_k_proj.hada_w1_a": torch.zeros(2, 2)},
            "keys this reader does not know")
    refused({**good, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 768),
             "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(768, 2)},
            r"\(2, 768\) and \(768, 2\); tiny-sd3's layer is \(32, 32\): the LoRA is for another model")
    refused({**good, "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.zeros(2, 32),
             "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": torch.zeros(32, 2)},
            "keys this reader does not know")  # SD3's T5 in kohya's names
    refused(good, "names a transformer layer \\(SD3/Flux\\); tiny-sd is a UNet model", model=tiny_sd)
    concept = _concept(sd3, tmp_path, _layers(sd3, TEXT_BRANCH))
    with pytest.raises(SettingsError, match="lora_rest"):
        generate_concept(sd3, PROMPT, concept, Settings(**FAST, lora_rest=0.5))


def test_the_cli_draws_a_lora_on_sd3_and_exits_2_on_a_lora_for_another_model(models, tmp_path, capsys):
    from alignit_core.cli import main

    folder = tmp_path / "sd3"
    tiny_sd3().save_pretrained(folder)
    good = _diffusers_file(tmp_path / "sks.safetensors", _pairs(models["sd3"], _layers(models["sd3"], TEXT_BRANCH)))
    out = tmp_path / "out"
    args = ["generate", "--model", str(folder), "--prompt", PROMPT, "--token", "sks", "--class-word", "dog", "--steps",
            "2", "--device", "cpu"]
    assert main(args + ["--concept", str(good), "--out", str(out)]) == 0
    settings = json.loads((out / "settings.json").read_text())
    assert settings["concept"]["kind"] == "lora" and settings["p"] == "a photo of a dog"
    bad = _diffusers_file(tmp_path / "flux.safetensors", _pairs(models["flux"], _layers(models["flux"], [], SINGLE)))
    assert main(args + ["--concept", str(bad), "--out", str(tmp_path / "no")]) == 2
    assert "does not exist in sd3" in capsys.readouterr().err and not (tmp_path / "no").exists()


def test_the_demo_takes_an_uploaded_dreambooth_lora_on_sd3(models, tmp_path):
    """A visitor's path on an SD3 page: upload a LoRA with its trigger word and class word, then generate
    customized baseline | AlignIT | base model on p. The LoRA's text branch reaches AlignIT through the
    page: the same upload with its updates zeroed draws another AlignIT image and the same base image."""
    import app

    model = models["sd3"]

    def draw(name, zero):
        path = _diffusers_file(tmp_path / name, _pairs(model, _layers(model, TEXT_BRANCH), seed=3, zero=zero))
        uploaded, *_ = app.add_concept(model, {}, {}, str(path), "sks", "dog")
        key = next(iter(uploaded))
        assert uploaded[key].kind == "lora"
        *_, line, gen, pair, maps = app.generate(
            model, {}, uploaded, app.ALIGNIT, key, "a photo of a sks on the grass", [], "", 1, 3, 7.0, 32,
            "euler", False, 0.0, 1.0, None, True, "overlay", progress=lambda *a, **k: None)
        return gen, line

    gen, line = draw("sks.safetensors", zero=False)
    zero, _ = draw("zero.safetensors", zero=True)
    assert gen.rows == ["customized", "alignit", "base"] and gen.record()["p"] == "a photo of a dog on the grass"
    assert (gen.latents["alignit"] - zero.latents["alignit"]).abs().max() > 1e-3
    assert torch.equal(gen.latents["base"], zero.latents["base"])
    assert "--concept sks.safetensors" in line and "--token sks" in line


# kohya's Flux layers in the original model's names (Black Forest Labs' `flux` package) -> the diffusers
# layers whose outputs they stack, in order; written out here from the original model's blocks
def _flux_original(model) -> dict[str, list[str]]:
    t = model.denoiser
    out = {"img_in": ["x_embedder"], "txt_in": ["context_embedder"],
           "time_in_in_layer": ["time_text_embed.timestep_embedder.linear_1"],
           "vector_in_out_layer": ["time_text_embed.text_embedder.linear_2"],
           "guidance_in_in_layer": ["time_text_embed.guidance_embedder.linear_1"],
           "final_layer_linear": ["proj_out"], "final_layer_adaLN_modulation_1": ["norm_out.linear"]}
    for i in range(len(t.transformer_blocks)):
        b = f"transformer_blocks.{i}"
        out |= {f"double_blocks_{i}_img_attn_qkv": [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"],
                f"double_blocks_{i}_img_attn_proj": [f"{b}.attn.to_out.0"],
                f"double_blocks_{i}_img_mlp_0": [f"{b}.ff.net.0.proj"], f"double_blocks_{i}_img_mlp_2": [f"{b}.ff.net.2"],
                f"double_blocks_{i}_img_mod_lin": [f"{b}.norm1.linear"],
                f"double_blocks_{i}_txt_attn_qkv": [f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj"],
                f"double_blocks_{i}_txt_attn_proj": [f"{b}.attn.to_add_out"],
                f"double_blocks_{i}_txt_mlp_0": [f"{b}.ff_context.net.0.proj"],
                f"double_blocks_{i}_txt_mlp_2": [f"{b}.ff_context.net.2"],
                f"double_blocks_{i}_txt_mod_lin": [f"{b}.norm1_context.linear"]}
    for i in range(len(t.single_transformer_blocks)):
        b = f"single_transformer_blocks.{i}"
        out |= {f"single_blocks_{i}_linear1": [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v", f"{b}.proj_mlp"],
                f"single_blocks_{i}_linear2": [f"{b}.proj_out"], f"single_blocks_{i}_modulation_lin": [f"{b}.norm.linear"]}
    return out


def _original_file(path, model, layers: dict[str, list[str]], seed=0, rank=2, alpha=4.0):
    """A kohya file in the original names: one down and one (stacked) up per original layer."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, parts in layers.items():
        mods = [model.denoiser.get_submodule(p) for p in parts]
        stem = f"lora_unet_{name}"
        tensors[f"{stem}.lora_down.weight"] = torch.randn(rank, mods[0].in_features, generator=g) / mods[0].in_features ** 0.5
        tensors[f"{stem}.lora_up.weight"] = torch.randn(sum(m.out_features for m in mods), rank, generator=g) * 0.5
        tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path, tensors


def test_kohya_flux_files_in_the_original_block_names_draw_what_diffusers_draws(models, tmp_path):
    """Flux LoRAs as kohya's sd-scripts save them (fused q/k/v, the original blocks' names). The blocks against
    diffusers' own reading of the same weights; the embedders and the final layer (which diffusers 0.42's
    reader leaves out) merged into the weights, the final modulation's halves swapped by diffusers' own
    `swap_scale_shift`. (Diffusers reads the single blocks' fused `linear1` at Flux-dev's width only: the
    tiny model's comes in the next test, against the same weights split by hand.)"""
    from diffusers.loaders.lora_conversion_utils import swap_scale_shift
    from safetensors.torch import load_file

    model = models["flux"]
    everything = {k: v for k, v in _flux_original(model).items() if not k.endswith("_linear1")}
    path, tensors = _original_file(tmp_path / "kohya-flux.safetensors", model, everything, seed=8)
    concept = load_concept(path, model, token="sks", class_word="dog")
    assert set(concept.unet) == {p for parts in everything.values() for p in parts}
    gen = generate_concept(model, PROMPT, concept, Settings(**FAST))

    blocks = {k: v for k, v in load_file(str(path)).items() if k.startswith(("lora_unet_double", "lora_unet_single"))}
    save_file(blocks, str(tmp_path / "blocks.safetensors"))
    reference = tiny_flux()
    reference.load_lora_weights(str(tmp_path), weight_name="blocks.safetensors", adapter_name="concept")
    with torch.no_grad():
        for name, (layer,) in ((k, v) for k, v in everything.items() if not k.startswith(("double", "single"))):
            stem = f"lora_unet_{name}"
            up = tensors[f"{stem}.lora_up.weight"]
            up = swap_scale_shift(up) if name == "final_layer_adaLN_modulation_1" else up
            scale = float(tensors[f"{stem}.alpha"]) / up.shape[1]
            reference.transformer.get_submodule(layer).weight += scale * up @ tensors[f"{stem}.lora_down.weight"]

    def draw(pipe):
        return on_grid("flux", pipe("a photo of a sks dog", num_inference_steps=3, height=32, width=32,
                                    guidance_scale=gen.settings.guidance, generator=torch.Generator().manual_seed(1),
                                    output_type="latent").images[0])

    theirs = draw(reference)
    assert (theirs - draw(tiny_flux())).abs().max() > 0.05  # the LoRA shows
    torch.testing.assert_close(gen.latents["customized"], theirs, rtol=0, atol=1e-4)


def _dotted(name: str) -> str:
    """A Flux layer as kohya writes it (`double_blocks_0_img_attn_qkv`) -> the original module's name
    (`double_blocks.0.img_attn.qkv`), as Black Forest Labs' and ComfyUI's LoRA files name it."""
    for pattern, repl in ((r"^double_blocks_(\d+)_(img|txt)_(attn|mlp|mod)_(\w+)$", r"double_blocks.\1.\2_\3.\4"),
                          (r"^single_blocks_(\d+)_(linear1|linear2)$", r"single_blocks.\1.\2"),
                          (r"^single_blocks_(\d+)_modulation_lin$", r"single_blocks.\1.modulation.lin"),
                          (r"^(time|vector|guidance)_in_(in|out)_layer$", r"\1_in.\2_layer"),
                          (r"^final_layer_adaLN_modulation_1$", "final_layer.adaLN_modulation.1"),
                          (r"^final_layer_linear$", "final_layer.linear")):
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    return name  # img_in, txt_in


def test_flux_files_in_black_forest_labs_names_draw_as_kohyas(models, tmp_path):
    """The same weights as `diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight` (BFL / ComfyUI), with and
    without alphas: the drawing of kohya's file, bit for bit (that one is checked against diffusers above)."""
    model = models["flux"]
    layers = _flux_original(model)
    path, tensors = _original_file(tmp_path / "kohya.safetensors", model, layers, seed=11)
    parts = {".lora_down.weight": ".lora_A.weight", ".lora_up.weight": ".lora_B.weight", ".alpha": ".alpha"}
    bfl = {}
    for key, tensor in tensors.items():
        stem, part = next((key[: -len(p)], q) for p, q in parts.items() if key.endswith(p))
        bfl["diffusion_model." + _dotted(stem.removeprefix("lora_unet_")) + part] = tensor.clone()
    assert "diffusion_model.double_blocks.0.img_mod.lin.lora_A.weight" in bfl
    assert "diffusion_model.single_blocks.1.modulation.lin.alpha" in bfl
    save_file(bfl, str(tmp_path / "bfl.safetensors"))
    save_file({k: v for k, v in bfl.items() if not k.endswith(".alpha")}, str(tmp_path / "bfl-no-alpha.safetensors"))
    kohya = load_concept(path, model, token="sks", class_word="dog")
    ours = load_concept(tmp_path / "bfl.safetensors", model, token="sks", class_word="dog")
    bare = load_concept(tmp_path / "bfl-no-alpha.safetensors", model, token="sks", class_word="dog")
    assert ours.unet.keys() == kohya.unet.keys() == bare.unet.keys()
    assert all(bare.unet[k].scale == 1.0 and ours.unet[k].scale == 2.0 for k in ours.unet)  # no alpha: alpha = rank
    a = generate_concept(model, PROMPT, kohya, Settings(**FAST))
    b = generate_concept(model, PROMPT, ours, Settings(**FAST))
    for row in ("customized", "alignit"):
        assert torch.equal(a.latents[row], b.latents[row]), row
    with pytest.raises(ConceptError, match="names an original model's layer under diffusion_model.*tiny-sd is a UNet"):
        from alignit_core.testing import build_tiny_sd
        sd = from_components(build_tiny_sd(), "tiny-sd")
        save_file({"diffusion_model.input_blocks.1.1.proj_in.lora_A.weight": torch.zeros(2, 32),
                   "diffusion_model.input_blocks.1.1.proj_in.lora_B.weight": torch.zeros(32, 2)},
                  str(tmp_path / "unet.safetensors"))
        load_concept(tmp_path / "unet.safetensors", sd, token="sks", class_word="dog")
    save_file({"diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_A.weight": torch.zeros(2, 32),
               "diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_B.weight": torch.zeros(96, 2)},
              str(tmp_path / "sd3-on-flux.safetensors"))
    with pytest.raises(ConceptError, match="is an SD3 layer; tiny-flux is a Flux model"):
        load_concept(tmp_path / "sd3-on-flux.safetensors", model, token="sks", class_word="dog")
    save_file({"diffusion_model.nothing.0.lora_A.weight": torch.zeros(2, 32),
               "diffusion_model.nothing.0.lora_B.weight": torch.zeros(32, 2)}, str(tmp_path / "none.safetensors"))
    with pytest.raises(ConceptError, match="nothing.0 is no layer of SD3 or Flux"):
        load_concept(tmp_path / "none.safetensors", model, token="sks", class_word="dog")


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_a_fused_original_layer_is_its_diffusers_layers_with_the_ups_rows_split(models, tmp_path, name):
    """q, k, v (and Flux's single-block MLP) from one fused layer: the same drawing, bit for bit, as the
    diffusers-named file with one down copied to each layer and the up's rows split among them."""
    model = models[name]
    t = model.denoiser
    if name == "flux":
        layers = {k: v for k, v in _flux_original(model).items() if k.endswith(("_linear1", "_attn_qkv"))}
    else:
        layers = {f"joint_blocks_{i}_{part}_attn_qkv": [f"transformer_blocks.{i}.attn.{x}" for x in q]
                  for i in range(len(t.transformer_blocks))
                  for part, q in (("x_block", ("to_q", "to_k", "to_v")),
                                  ("context_block", ("add_q_proj", "add_k_proj", "add_v_proj")))}
    path, tensors = _original_file(tmp_path / "fused.safetensors", model, layers, seed=9)
    pairs = {}
    for stem, parts in layers.items():
        down, up = tensors[f"lora_unet_{stem}.lora_down.weight"], tensors[f"lora_unet_{stem}.lora_up.weight"]
        for p, rows in zip(parts, up.split([t.get_submodule(p).out_features for p in parts])):
            pairs[p] = (down.clone(), rows.clone())
    fused = load_concept(path, model, token="sks", class_word="dog")
    split = load_concept(_diffusers_file(tmp_path / "split.safetensors", pairs), model, token="sks", class_word="dog")
    assert fused.unet.keys() == split.unet.keys() == set(pairs)
    a = generate_concept(model, PROMPT, fused, Settings(**FAST))
    b = generate_concept(model, PROMPT, split, Settings(**FAST))
    plain = generate_concept(model, PROMPT, _concept(model, tmp_path, ["context_embedder"], zero=True), Settings(**FAST))
    assert (a.latents["customized"] - plain.latents["customized"]).abs().max() > 0.05  # the LoRA shows
    for row in ("customized", "alignit"):
        assert torch.equal(a.latents[row], b.latents[row]), row


def _sd3_original(state: dict) -> dict:
    """The tiny SD3 transformer's weights in the original model's names (Stability's `mmdit`): what
    diffusers' single-file loader converts; the test checks the round trip."""
    out = {"pos_embed": state["pos_embed.pos_embed"]}
    renames = {"pos_embed.proj": "x_embedder.proj", "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
               "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
               "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
               "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "context_embedder": "context_embedder",
               "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}
    swap = lambda w: torch.cat(w.chunk(2)[::-1])  # noqa: E731 - diffusers' (scale, shift) -> (shift, scale)
    for ours, theirs in renames.items():
        for x in ("weight", "bias"):
            w = state[f"{ours}.{x}"]
            out[f"{theirs}.{x}"] = swap(w) if ours == "norm_out.linear" else w
    blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")})
    for i in blocks:
        b, j = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        last = f"{b}.attn.to_add_out.weight" not in state
        for attn, where in (("attn", "x_block.attn"), ("attn2", "x_block.attn2")):
            if f"{b}.{attn}.to_q.weight" in state:
                for x in ("weight", "bias"):
                    out[f"{j}.{where}.qkv.{x}"] = torch.cat([state[f"{b}.{attn}.to_{c}.{x}"] for c in "qkv"])
                    out[f"{j}.{where}.proj.{x}"] = state[f"{b}.{attn}.to_out.0.{x}"]
                out[f"{j}.{where}.ln_q.weight"] = state[f"{b}.{attn}.norm_q.weight"]
                out[f"{j}.{where}.ln_k.weight"] = state[f"{b}.{attn}.norm_k.weight"]
        for x in ("weight", "bias"):
            out[f"{j}.context_block.attn.qkv.{x}"] = torch.cat([state[f"{b}.attn.add_{c}_proj.{x}"] for c in "qkv"])
            out[f"{j}.x_block.adaLN_modulation.1.{x}"] = state[f"{b}.norm1.linear.{x}"]
            w = state[f"{b}.norm1_context.linear.{x}"]
            out[f"{j}.context_block.adaLN_modulation.1.{x}"] = swap(w) if last else w
            out[f"{j}.x_block.mlp.fc1.{x}"] = state[f"{b}.ff.net.0.proj.{x}"]
            out[f"{j}.x_block.mlp.fc2.{x}"] = state[f"{b}.ff.net.2.{x}"]
            if not last:
                out[f"{j}.context_block.attn.proj.{x}"] = state[f"{b}.attn.to_add_out.{x}"]
                out[f"{j}.context_block.mlp.fc1.{x}"] = state[f"{b}.ff_context.net.0.proj.{x}"]
                out[f"{j}.context_block.mlp.fc2.{x}"] = state[f"{b}.ff_context.net.2.{x}"]
        out[f"{j}.context_block.attn.ln_q.weight"] = state[f"{b}.attn.norm_added_q.weight"]
        out[f"{j}.context_block.attn.ln_k.weight"] = state[f"{b}.attn.norm_added_k.weight"]
    return out


def test_kohya_sd3_files_in_the_original_block_names_are_the_lora_merged_into_the_original_weights(models, tmp_path):
    """An SD3 LoRA in the original model's names (kohya's sd-scripts: `lora_unet_joint_blocks_<i>_x_block_attn_qkv`,
    `context_block_...`, SD3.5's `attn2`, the embedders and the final layer): the customized image is the
    original weights W + scale·up·down, converted by diffusers' single-file loader and drawn by diffusers."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    model = models["sd3"]
    state = model.denoiser.state_dict()
    original = _sd3_original(state)
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)  # the names are right
    linear = [k.removesuffix(".weight") for k, w in original.items() if k.endswith(".weight") and w.ndim == 2]
    assert any("attn2" in k for k in linear) and "final_layer.adaLN_modulation.1" in linear
    g = torch.Generator().manual_seed(10)
    tensors = {}
    for name in linear:
        out_features, in_features = original[f"{name}.weight"].shape
        stem = "lora_unet_" + name.replace(".", "_")
        tensors[f"{stem}.lora_down.weight"] = torch.randn(2, in_features, generator=g) / in_features ** 0.5
        tensors[f"{stem}.lora_up.weight"] = torch.randn(out_features, 2, generator=g) * 0.5
        tensors[f"{stem}.alpha"] = torch.tensor(4.0)
        original[f"{name}.weight"] = original[f"{name}.weight"] + 2.0 * tensors[f"{stem}.lora_up.weight"] @ \
            tensors[f"{stem}.lora_down.weight"]
    path = tmp_path / "kohya-sd3.safetensors"
    save_file(tensors, str(path))
    concept = load_concept(path, model, token="sks", class_word="dog")
    assert len(concept.unet) == sum(3 if k.endswith("qkv") else 1 for k in linear)

    reference = tiny_sd3()
    merged = SD3Transformer2DModel.from_config(reference.transformer.config)
    merged.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(original))
    reference.transformer = merged
    gen = generate_concept(model, PROMPT, concept, Settings(**FAST))
    theirs = on_grid("sd3", reference("a photo of a sks dog", num_inference_steps=3, height=32, width=32,
                                      guidance_scale=gen.settings.guidance, generator=torch.Generator().manual_seed(1),
                                      output_type="latent").images[0])
    plain = on_grid("sd3", tiny_sd3()("a photo of a sks dog", num_inference_steps=3, height=32, width=32,
                                      guidance_scale=gen.settings.guidance, generator=torch.Generator().manual_seed(1),
                                      output_type="latent").images[0])
    assert (theirs - plain).abs().max() > 0.05  # the LoRA shows
    # merged weights round otherwise than an added low-rank output (a misplaced layer: 0.1 and more)
    torch.testing.assert_close(gen.latents["customized"], theirs, rtol=0, atol=1e-3)
