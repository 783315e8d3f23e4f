"""Concept files: every supported on-disk layout, written here first, then loaded and compared;
the refusals (unsafe pickles, wrong model, bad manifests); and Custom Diffusion's per-row K/V."""
from __future__ import annotations

import builtins
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from alignit_core import ConceptError, Settings, find_concepts, generate_concept, load_concept
from alignit_core.conditioning import encode_prompt
from alignit_core.concept_prompts import concept_plan
from alignit_core.prompts import tokenize

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "assets" / "concepts"
WIDTH = 32  # the tiny pipelines' text-encoder width


def write_concept(folder: Path, files: dict[str, object], **manifest) -> Path:
    """A concept folder: each file written in its own format (safetensors or torch.save pickle),
    plus manifest.json. Returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if name.endswith(".safetensors"):
            save_file({k: v.contiguous() for k, v in data.items()}, str(folder / name))
        else:
            torch.save(data, folder / name)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def vec(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def cd_weights(model, scale=0.5, seed=1) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A Custom Diffusion fine-tune: every cross-attention layer's W_k/W_v plus a clear offset."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer, attn in model.cross_attention_layers.items():
        wk, wv = attn.to_k.weight.detach().cpu(), attn.to_v.weight.detach().cpu()
        out[layer] = (wk + scale * torch.randn(wk.shape, generator=g), wv + scale * torch.randn(wv.shape, generator=g))
    return out


# ------------------------------------------------------------------------------ textual inversion


def test_diffusers_learned_embeds_safetensors_loads_the_written_vectors(tiny_sd, tmp_path):
    v = vec(2, WIDTH)
    folder = write_concept(tmp_path / "toy", {"learned_embeds.safetensors": {"<cat-toy>": v}},
                           token="<cat-toy>", class_word="toy", kind="textual_inversion",
                           weights="learned_embeds.safetensors")
    c = load_concept(folder, tiny_sd)
    assert (c.token, c.class_word, c.kind, c.name) == ("<cat-toy>", "toy", "textual_inversion", "toy")
    assert c.n_vectors == 2 and len(c.vectors) == 1
    torch.testing.assert_close(c.vectors[0].cpu(), v, rtol=0, atol=0)
    assert c.key_value_edits == {} and c.text_encoders == ()


def test_sd_concepts_library_bin_single_vector_becomes_one_row(tiny_sd, tmp_path):
    v = vec(WIDTH, seed=2)  # sd-concepts-library stores (dim,), pickled
    folder = write_concept(tmp_path / "toy", {"learned_embeds.bin": {"<cat-toy>": v}},
                           token="<cat-toy>", class_word="toy", kind="textual_inversion", weights="learned_embeds.bin")
    c = load_concept(folder, tiny_sd)
    assert c.n_vectors == 1
    torch.testing.assert_close(c.vectors[0].cpu(), v.reshape(1, WIDTH), rtol=0, atol=0)


def a1111(v: torch.Tensor, name: str = "x") -> dict:
    return {"string_to_param": {"*": v}, "string_to_token": {"*": torch.tensor(265)}, "name": name, "step": 100}


def test_a1111_pt_embedding_round_trips(tiny_sd, tmp_path):
    v = vec(2, WIDTH, seed=3)
    folder = write_concept(tmp_path / "x", {"x.pt": a1111(v)}, token="<x>", class_word="cat",
                           kind="textual_inversion", weights="x.pt")
    c = load_concept(folder, tiny_sd)
    assert c.token == "<x>" and c.n_vectors == 2
    torch.testing.assert_close(c.vectors[0].cpu(), v, rtol=0, atol=0)


def test_bare_a1111_file_takes_its_token_from_the_embedding_name(tiny_sd, tmp_path):
    v = vec(1, WIDTH, seed=4)
    path = tmp_path / "kitty.pt"
    torch.save(a1111(v, name="kitty"), path)
    c = load_concept(path, tiny_sd, class_word="cat")
    assert (c.token, c.class_word, c.kind) == ("<kitty>", "cat", "textual_inversion")
    torch.testing.assert_close(c.vectors[0].cpu(), v, rtol=0, atol=0)


def test_bare_safetensors_file_takes_the_key_as_token_and_needs_a_class_word(tiny_sd, tmp_path):
    v = vec(1, WIDTH, seed=5)
    path = tmp_path / "learned_embeds.safetensors"
    save_file({"<cat-toy>": v}, str(path))
    c = load_concept(path, tiny_sd, class_word="toy")
    assert (c.token, c.class_word) == ("<cat-toy>", "toy")
    torch.testing.assert_close(c.vectors[0].cpu(), v, rtol=0, atol=0)
    assert load_concept(path, tiny_sd, token="<renamed>", class_word="toy").token == "<renamed>"
    with pytest.raises(ConceptError, match="class word"):
        load_concept(path, tiny_sd)


def test_sdxl_embedding_has_one_vector_set_per_text_encoder(tiny_sdxl, tmp_path):
    clip_l, clip_g = vec(2, WIDTH, seed=6), vec(2, WIDTH, seed=7)
    folder = write_concept(tmp_path / "xl", {"emb.safetensors": {"clip_l": clip_l, "clip_g": clip_g}},
                           token="<xl-toy>", class_word="toy", kind="textual_inversion", weights="emb.safetensors")
    c = load_concept(folder, tiny_sdxl)
    assert c.token == "<xl-toy>" and c.n_vectors == 2 and len(c.vectors) == 2
    torch.testing.assert_close(c.vectors[0].cpu(), clip_l, rtol=0, atol=0)
    torch.testing.assert_close(c.vectors[1].cpu(), clip_g, rtol=0, atol=0)


def test_sd15_embedding_is_refused_by_sdxl_which_has_two_text_encoders(tiny_sdxl, tmp_path):
    path = tmp_path / "learned_embeds.safetensors"
    save_file({"<toy>": vec(1, WIDTH)}, str(path))
    with pytest.raises(ConceptError, match="1 text encoder.*has 2"):
        load_concept(path, tiny_sdxl, class_word="toy")


def test_multi_vector_embedding_takes_three_prompt_positions(tiny_sd, tmp_path):
    v = vec(3, WIDTH, seed=8)
    folder = write_concept(tmp_path / "m", {"learned_embeds.safetensors": {"<m>": v}}, token="<m>",
                           class_word="dog", kind="textual_inversion", weights="learned_embeds.safetensors")
    c = load_concept(folder, tiny_sd)
    assert c.n_vectors == 3
    torch.testing.assert_close(c.vectors[0].cpu(), v, rtol=0, atol=0)
    p = tokenize(tiny_sd.tokenizer, "a photo of a <m>", c.token, c.n_vectors)
    assert p.vectors == {5: 0, 6: 1, 7: 2}
    assert [t.text for t in p.tokens[5:8]] == ["<m>", "<m>_1", "<m>_2"]


# ------------------------------------------------------------------------------ Custom Diffusion


def test_adobe_delta_bin_custom_diffusion_loads_kv_and_modifier_token(tiny_sd, tmp_path):
    w = cd_weights(tiny_sd)
    token_vec = vec(WIDTH, seed=9)
    unet = {}
    for layer, (wk, wv) in w.items():
        unet[f"{layer}.to_k.weight"], unet[f"{layer}.to_v.weight"] = wk, wv
    folder = write_concept(tmp_path / "cd", {"delta.bin": {"unet": unet, "modifier_token": {"<new1>": token_vec}}},
                           token="<new1>", class_word="dog", kind="custom_diffusion", custom_diffusion="delta.bin")
    c = load_concept(folder, tiny_sd)
    assert c.kind == "custom_diffusion" and c.phrase == "{token} {class_word}"
    assert set(c.key_value_edits) == set(tiny_sd.cross_attention_layers)
    for layer, (wk, wv) in w.items():
        torch.testing.assert_close(c.key_value_edits[layer][0].weight.cpu(), wk, rtol=0, atol=0)
        torch.testing.assert_close(c.key_value_edits[layer][1].weight.cpu(), wv, rtol=0, atol=0)
    torch.testing.assert_close(c.vectors[0].cpu(), token_vec.reshape(1, WIDTH), rtol=0, atol=0)


def test_custom_diffusion_rows_hold_at_every_step_when_the_swap_has_a_step_range(tiny_sd, tmp_path):
    """The customized baseline is the Custom Diffusion model at every step; only AlignIT's swap
    follows the swap step range."""
    w = cd_weights(tiny_sd)
    unet = {}
    for layer, (wk, wv) in w.items():
        unet[f"{layer}.to_k.weight"], unet[f"{layer}.to_v.weight"] = wk, wv
    folder = write_concept(tmp_path / "cd", {"delta.bin": {"unet": unet, "modifier_token": {"<new1>": vec(WIDTH, seed=9)}}},
                           token="<new1>", class_word="dog", kind="custom_diffusion", custom_diffusion="delta.bin")
    c = load_concept(folder, tiny_sd)
    seen = {}

    def on_kv(layer, step, key, value):
        seen[(layer, step)] = key.clone()

    generate_concept(tiny_sd, "a photo of a <new1> dog", c, Settings(seed=0, steps=4, swap_start=0.5), on_kv=on_kv)
    cp = concept_plan(tiny_sd.tokenizer, "a photo of a <new1> dog", c.words)
    hidden, _ = encode_prompt(tiny_sd, cp.customized, c)
    pos = cp.plan.positions[0]
    for (layer, step), key in seen.items():  # batch: [uncond customized, uncond alignit, cond customized, cond alignit]
        expected = F.linear(hidden, w[layer][0].to(hidden.dtype), tiny_sd.cross_attention_layers[layer].to_k.bias)
        torch.testing.assert_close(key[2], expected, rtol=0, atol=1e-5)
    for layer in tiny_sd.cross_attention_layers:  # AlignIT's row: base keys until the swap starts at step 2
        k = [seen[(layer, step)][3, pos] for step in range(4)]
        assert torch.equal(k[0], k[1]) and torch.equal(k[2], k[3]) and not torch.allclose(k[1], k[2])


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_diffusers_custom_diffusion_weights_with_token_in_learned_embeds(tiny_sd, tmp_path, fmt):
    w = cd_weights(tiny_sd, seed=10)
    token_vec = vec(1, WIDTH, seed=11)
    state = {}
    for layer, (wk, wv) in w.items():
        state[f"{layer}.processor.to_k_custom_diffusion.weight"] = wk
        state[f"{layer}.processor.to_v_custom_diffusion.weight"] = wv
    name = f"pytorch_custom_diffusion_weights.{fmt}"
    folder = write_concept(tmp_path / "cd", {name: state, "learned_embeds.safetensors": {"<new1>": token_vec}},
                           token="<new1>", class_word="dog", kind="custom_diffusion",
                           weights="learned_embeds.safetensors", custom_diffusion=name)
    c = load_concept(folder, tiny_sd)
    assert set(c.key_value_edits) == set(w)
    for layer, (wk, wv) in w.items():
        torch.testing.assert_close(c.key_value_edits[layer][0].weight.cpu(), wk, rtol=0, atol=0)
        torch.testing.assert_close(c.key_value_edits[layer][1].weight.cpu(), wv, rtol=0, atol=0)
    torch.testing.assert_close(c.vectors[0].cpu(), token_vec, rtol=0, atol=0)


def test_loading_custom_diffusion_leaves_the_unet_weights_untouched(tiny_sd, tmp_path):
    before = {k: (a.to_k.weight.clone(), a.to_v.weight.clone()) for k, a in tiny_sd.cross_attention_layers.items()}
    w = cd_weights(tiny_sd, seed=12)
    state = {f"{layer}.processor.to_{x}_custom_diffusion.weight": wk if x == "k" else wv
             for layer, (wk, wv) in w.items() for x in "kv"}
    folder = write_concept(tmp_path / "cd", {"cd.safetensors": state, "e.safetensors": {"<new1>": vec(1, WIDTH)}},
                           token="<new1>", class_word="dog", kind="custom_diffusion", weights="e.safetensors",
                           custom_diffusion="cd.safetensors")
    load_concept(folder, tiny_sd)
    for k, a in tiny_sd.cross_attention_layers.items():
        assert torch.equal(a.to_k.weight, before[k][0]) and torch.equal(a.to_v.weight, before[k][1])


# ------------------------------------------------------------------------------ text-encoder fine-tune


@pytest.mark.parametrize("prefix", ["text_model.", ""], ids=["transformers4-keys", "transformers5-keys"])
def test_text_encoder_fine_tune_gets_its_own_encoder_and_leaves_the_models_alone(tiny_sd, tmp_path, prefix):
    """Fine-tunes saved by transformers 4.x (SD 1.5's own text_encoder/model.safetensors layout)
    name CLIPTextModel weights `text_model.*`; transformers 5 drops that prefix. Both load."""
    te = tiny_sd.text_encoders[0]
    own_before = {k: v.clone() for k, v in te.state_dict().items()}
    names = ("encoder.layers.0.mlp.fc1.weight", "final_layer_norm.weight")

    def own_key(name):
        return next(k for k in own_before if k.removeprefix("text_model.") == name)

    changed = {}
    for name in names:
        old = own_before[own_key(name)]
        changed[name] = old + 0.25 * vec(*old.shape, seed=13)
    folder = write_concept(tmp_path / "te", {"text_encoder.safetensors": {prefix + n: v for n, v in changed.items()}},
                           token="<cv>", class_word="dog", kind="text_encoder", text_encoder="text_encoder.safetensors")
    c = load_concept(folder, tiny_sd)
    assert c.kind == "text_encoder" and len(c.text_encoders) == 1 and c.text_encoders[0] is not te
    tuned = c.text_encoders[0].state_dict()
    for name, v in changed.items():
        torch.testing.assert_close(tuned[own_key(name)].cpu(), v, rtol=0, atol=0)
    untouched = own_key("encoder.layers.1.mlp.fc1.weight")
    assert torch.equal(tuned[untouched], own_before[untouched])
    # the model's own encoder is exactly what it was
    after = te.state_dict()
    assert after.keys() == own_before.keys()
    assert all(torch.equal(after[k], own_before[k]) for k in own_before)
    # and the two stacks really encode differently
    p = tokenize(tiny_sd.tokenizer, "a photo of a dog")
    base, _ = encode_prompt(tiny_sd, p, None)
    tuned_hidden, _ = encode_prompt(tiny_sd, p, c)
    assert (base - tuned_hidden).abs().max() > 1e-3


# ------------------------------------------------------------------------------ refusals


class NotATensor:
    def __init__(self):
        self.payload = [1, 2, 3]


class WritesMarker:
    """Unpickling this would run code: write a marker file via builtins or os.system."""

    def __init__(self, marker: Path, via: str):
        self.marker, self.via = str(marker), via

    def __reduce__(self):
        if self.via == "os.system":
            return os.system, (f"touch {self.marker}",)
        return builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def test_pickled_custom_class_is_refused_as_more_than_tensors(tiny_sd, tmp_path):
    path = tmp_path / "learned_embeds.bin"
    torch.save({"<toy>": NotATensor()}, path)
    with pytest.raises(ConceptError, match="more than tensors"):
        load_concept(path, tiny_sd, class_word="toy")


def test_pickled_list_in_place_of_a_tensor_is_refused(tiny_sd, tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"string_to_param": {"*": [[0.1] * WIDTH]}, "name": "x"}, path)
    with pytest.raises(ConceptError, match="not a tensor"):
        load_concept(path, tiny_sd, class_word="cat")


@pytest.mark.parametrize("via", ["os.system", "builtins.exec"])
def test_malicious_pickle_is_refused_and_never_runs(tiny_sd, tmp_path, via):
    marker = tmp_path / "pwned"
    evil = WritesMarker(marker, via)
    path = tmp_path / "evil" / "learned_embeds.bin"
    write_concept(path.parent, {"learned_embeds.bin": {"<toy>": evil}}, token="<toy>", class_word="toy",
                  kind="textual_inversion", weights="learned_embeds.bin")
    assert not marker.exists()
    with pytest.raises(ConceptError, match="could not be loaded safely"):
        load_concept(path.parent, tiny_sd)
    with pytest.raises(ConceptError, match="could not be loaded safely"):
        load_concept(path, tiny_sd, class_word="toy")
    assert not marker.exists()


def test_pickle_is_refused_when_only_safetensors_are_allowed(tiny_sd, tmp_path):
    path = tmp_path / "learned_embeds.bin"
    torch.save({"<toy>": vec(WIDTH)}, path)
    with pytest.raises(ConceptError, match="only .safetensors"):
        load_concept(path, tiny_sd, allow_pickle=False, class_word="toy")
    safe = tmp_path / "learned_embeds.safetensors"
    save_file({"<toy>": vec(1, WIDTH)}, str(safe))
    assert load_concept(safe, tiny_sd, allow_pickle=False, class_word="toy").n_vectors == 1


@pytest.mark.parametrize("corruption", ["random bytes", "truncated"])
def test_corrupt_safetensors_is_refused(tiny_sd, tmp_path, corruption):
    path = tmp_path / "learned_embeds.safetensors"
    if corruption == "random bytes":
        path.write_bytes(random.Random(0).randbytes(4096))
    else:
        save_file({"<toy>": vec(4, WIDTH)}, str(path))
        path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ConceptError, match="not a valid safetensors file"):
        load_concept(path, tiny_sd, class_word="toy")


def test_embedding_of_another_width_is_for_another_model(tiny_sd, tmp_path):
    path = tmp_path / "learned_embeds.safetensors"
    save_file({"<toy>": vec(1, 768)}, str(path))  # an SD 1.5 embedding on a 32-wide model
    with pytest.raises(ConceptError, match="768 wide.*32 wide.*another model"):
        load_concept(path, tiny_sd, class_word="toy")


def test_custom_diffusion_weights_of_the_wrong_shape_are_refused(tiny_sd, tmp_path):
    layer = next(iter(tiny_sd.cross_attention_layers))
    wrong = torch.zeros(32, 768)  # SD 1.5's to_k shape in spirit: (inner, 768)
    folder = write_concept(tmp_path / "cd", {"delta.bin": {"unet": {f"{layer}.to_k.weight": wrong,
                                                                    f"{layer}.to_v.weight": wrong},
                                                           "modifier_token": {"<new1>": vec(WIDTH)}}},
                           token="<new1>", class_word="dog", kind="custom_diffusion", custom_diffusion="delta.bin")
    with pytest.raises(ConceptError, match=f"{layer}.*another model"):
        load_concept(folder, tiny_sd)


def test_custom_diffusion_layer_missing_from_the_unet_is_refused(tiny_sd, tmp_path):
    w = torch.zeros(32, 32)
    layer = "input_blocks.1.1.transformer_blocks.0.attn2"  # LDM naming, not this UNet's
    unet = {f"{layer}.to_k.weight": w, f"{layer}.to_v.weight": w}
    folder = write_concept(tmp_path / "cd", {"delta.bin": {"unet": unet, "modifier_token": {"<new1>": vec(WIDTH)}}},
                           token="<new1>", class_word="dog", kind="custom_diffusion", custom_diffusion="delta.bin")
    with pytest.raises(ConceptError, match="does not exist"):
        load_concept(folder, tiny_sd)


def test_manifest_path_traversal_is_refused(tiny_sd, tmp_path):
    save_file({"<toy>": vec(1, WIDTH)}, str(tmp_path / "outside.safetensors"))  # a real file, one level up
    folder = write_concept(tmp_path / "toy", {}, token="<toy>", class_word="toy", kind="textual_inversion",
                           weights="../outside.safetensors")
    with pytest.raises(ConceptError, match="outside the concept folder"):
        load_concept(folder, tiny_sd)
    refs = write_concept(tmp_path / "refs", {"e.safetensors": {"<toy>": vec(1, WIDTH)}}, token="<toy>",
                         class_word="toy", kind="textual_inversion", weights="e.safetensors",
                         references=["../../etc/passwd"])
    with pytest.raises(ConceptError, match="outside"):
        load_concept(refs, tiny_sd)


@pytest.mark.parametrize("missing", ["token", "class_word", "kind"])
def test_manifest_without_a_required_key_is_refused(tiny_sd, tmp_path, missing):
    manifest = dict(token="<toy>", class_word="toy", kind="textual_inversion", weights="e.safetensors")
    del manifest[missing]
    folder = write_concept(tmp_path / "toy", {"e.safetensors": {"<toy>": vec(1, WIDTH)}}, **manifest)
    with pytest.raises(ConceptError, match=f"needs a '{missing}' string"):
        load_concept(folder, tiny_sd)


def test_manifest_with_an_unknown_kind_is_refused(tiny_sd, tmp_path):
    folder = write_concept(tmp_path / "toy", {"e.safetensors": {"<toy>": vec(1, WIDTH)}}, token="<toy>",
                           class_word="toy", kind="hypernetwork", weights="e.safetensors")
    with pytest.raises(ConceptError, match="unknown concept kind 'hypernetwork'.*textual_inversion.*lora"):
        load_concept(folder, tiny_sd)


@pytest.mark.parametrize("seed, kept", [(7, 7), (0, 0), (2**32 - 1, 2**32 - 1), (2**32, 0), (-1, 0), ("7", 0),
                                         (True, 0), (7.0, 0), (None, 0)])
def test_a_manifests_example_seed_is_kept_only_when_it_is_a_seed(tiny_sd, tmp_path, seed, kept):
    """`example_seed` only chooses the seed the demo runs the example on: anything but a seed reads as 0."""
    folder = write_concept(tmp_path / "toy", {"e.safetensors": {"<toy>": vec(1, WIDTH)}}, token="<toy>",
                           class_word="toy", kind="textual_inversion", weights="e.safetensors",
                           example_prompt="a <toy> on the grass", example_seed=seed)
    assert load_concept(folder, tiny_sd).example_seed == kept


def test_file_over_max_bytes_is_refused_before_reading(tiny_sd, tmp_path):
    path = tmp_path / "learned_embeds.safetensors"
    save_file({"<toy>": vec(16, WIDTH)}, str(path))
    assert path.stat().st_size > 1024
    with pytest.raises(ConceptError, match="the limit is"):
        load_concept(path, tiny_sd, class_word="toy", max_bytes=1024)
    assert load_concept(path, tiny_sd, class_word="toy").n_vectors == 16


# ------------------------------------------------------------------------------ Custom Diffusion semantics


def test_custom_diffusion_rows_use_their_own_wk_and_alignit_uses_them_only_for_k_prime(tiny_sd, tmp_path):
    """Customized row: every key/value is W_k'/W_v' of its encoding. AlignIT row: base projections
    of p everywhere, except the swapped positions, which are W_k' . enc'(p')."""
    w = cd_weights(tiny_sd, seed=20)
    state = {f"{layer}.processor.to_{x}_custom_diffusion.weight": wk if x == "k" else wv
             for layer, (wk, wv) in w.items() for x in "kv"}
    embeds = {"<new1>": vec(1, WIDTH, seed=21)}
    folder = write_concept(tmp_path / "cd", {"cd.safetensors": state, "e.safetensors": embeds},
                           token="<new1>", class_word="dog", kind="custom_diffusion", weights="e.safetensors",
                           custom_diffusion="cd.safetensors")
    concept = load_concept(folder, tiny_sd)
    seen = {}

    def on_kv(layer, step, key, value):
        seen[(layer, step)] = (key.clone(), value.clone())

    prompt = "a photo of a <new1>"
    gen = generate_concept(tiny_sd, prompt, concept, Settings(steps=2), on_kv=on_kv)
    assert gen.rows == ["customized", "alignit"]
    layers = tiny_sd.cross_attention_layers
    assert set(seen) == {(layer, step) for layer in layers for step in (0, 1)}

    cp = concept_plan(tiny_sd.tokenizer, prompt, concept.words)
    p, p_dummy, swapped = cp.plan.target, cp.plan.source, cp.plan.positions
    assert cp.customized.text == "a photo of a <new1> dog" and p.text == "a photo of a dog"
    assert swapped == (5,) and gen.swapped["alignit"] == swapped
    enc_custom, _ = encode_prompt(tiny_sd, cp.customized, concept)  # (77, dim)
    enc_p, _ = encode_prompt(tiny_sd, p, None)
    enc_dummy, _ = encode_prompt(tiny_sd, p_dummy, concept)  # enc'(p')
    enc_empty, _ = encode_prompt(tiny_sd, tokenize(tiny_sd.tokenizer, ""), None)
    others = [i for i in range(enc_p.shape[0]) if i not in swapped]
    close = dict(rtol=1e-4, atol=1e-5)
    # batch: [uncond customized, uncond alignit, cond customized, cond alignit]
    for (layer, step), (key, value) in seen.items():
        attn = layers[layer]
        wk, wv = (edit.weight for edit in concept.key_value_edits[layer])
        assert key.shape[0] == 4
        for got, w_new, w_base in ((key, wk, attn.to_k.weight), (value, wv, attn.to_v.weight)):
            # customized row, both CFG halves: the concept's weights on every position
            torch.testing.assert_close(got[2], F.linear(enc_custom, w_new), **close)
            torch.testing.assert_close(got[0], F.linear(enc_empty, w_new), **close)
            assert (got[2] - F.linear(enc_custom, w_base)).abs().max() > 1e-2
            # AlignIT row: the base model's projection of p except at the swapped position ...
            torch.testing.assert_close(got[3, others], F.linear(enc_p, w_base)[others], **close)
            torch.testing.assert_close(got[1], F.linear(enc_empty, w_base), **close)  # uncond not swapped
            # ... where K' = W_k' . enc'(p'), the customized weights on the dummy prompt
            torch.testing.assert_close(got[3, list(swapped)], F.linear(enc_dummy, w_new)[list(swapped)], **close)
            assert (got[3, list(swapped)] - F.linear(enc_dummy, w_base)[list(swapped)]).abs().max() > 1e-2
            assert (got[3, list(swapped)] - F.linear(enc_p, w_base)[list(swapped)]).abs().max() > 1e-2


def test_custom_diffusion_baseline_differs_from_plain_token_embedding(tiny_sd, tmp_path):
    """The same token vector with and without the CD weights: only the K/V weights differ, and
    they change the customized image."""
    e = {"e.safetensors": {"<new1>": vec(1, WIDTH, seed=22)}}
    w = cd_weights(tiny_sd, scale=2.0, seed=23)
    state = {f"{layer}.processor.to_{x}_custom_diffusion.weight": wk if x == "k" else wv
             for layer, (wk, wv) in w.items() for x in "kv"}
    cd = load_concept(write_concept(tmp_path / "cd", {**e, "cd.safetensors": state}, token="<new1>", class_word="dog",
                                    kind="custom_diffusion", weights="e.safetensors",
                                    custom_diffusion="cd.safetensors"), tiny_sd)
    ti = load_concept(write_concept(tmp_path / "ti", e, token="<new1>", class_word="dog", kind="textual_inversion",
                                    weights="e.safetensors", phrase="{token} {class_word}"), tiny_sd)
    s = Settings(steps=2, guidance=7.5)
    a = generate_concept(tiny_sd, "a photo of a <new1>", cd, s)
    b = generate_concept(tiny_sd, "a photo of a <new1>", ti, s)
    assert a.record()["customized_prompt"] == b.record()["customized_prompt"] == "a photo of a <new1> dog"
    assert a.images["customized"].tobytes() != b.images["customized"].tobytes()


# ------------------------------------------------------------------------------ the shipped concepts


EXPECTED = {"holed-star-cd": ("custom_diffusion", "star", "<holed-star>"),
            "holed-star-ti": ("textual_inversion", "star", "<holed-star>"),
            "striped-ball-cd": ("custom_diffusion", "circle", "<striped-ball>"),
            "holed-star-te": ("text_encoder", "star", "<holed-star>"),
            "striped-ball-te": ("text_encoder", "circle", "<striped-ball>"),
            "striped-ball-ti": ("textual_inversion", "circle", "<striped-ball>")}


@pytest.fixture(scope="module")
def shipped(embedded):
    return {c.name: c for c in find_concepts(SHIPPED, embedded)}


def test_find_concepts_returns_the_six_shipped_concepts(shipped, embedded):
    assert {n: (c.kind, c.class_word, c.token) for n, c in shipped.items()} == EXPECTED
    for c in shipped.values():
        assert c.n_vectors >= 1
        assert bool(c.key_value_edits) == (c.kind == "custom_diffusion")
        if c.key_value_edits:
            assert set(c.key_value_edits) <= set(embedded.cross_attention_layers)
        assert c.references and all(r.is_file() for r in c.references)
        assert c.token in c.example_prompt


def test_the_shipped_examples_labels_are_shown_whole(shipped, embedded):
    """Gradio shows an example's label up to its 60th character and `...`: the rates that end an AlignIT
    example's label (how often the customized model and AlignIT drew it all) were cut off."""
    from alignit_core.views import ALIGNIT, LABEL_CHARS, examples_for

    rows, labels = examples_for(embedded, shipped)
    assert [r[0] for r in rows].count(ALIGNIT) == 6  # five concepts and the pair
    assert LABEL_CHARS == 60  # where Gradio cuts an example's label
    assert all(len(label) <= LABEL_CHARS for label in labels), [label for label in labels if len(label) > LABEL_CHARS]
    assert "AlignIT · <holed-star> · text-encoder fine-tune · 10% → 100%" in labels  # 60 characters
    assert "AlignIT · <striped-ball> · text encoder · 30% → 70%" in labels  # the kind's long name: 61


def test_find_concepts_skips_concepts_made_for_another_model(tiny_sd):
    assert find_concepts(SHIPPED, tiny_sd) == []


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_concept_generates_customized_and_alignit_images_that_differ(shipped, embedded, name):
    c = shipped[name]
    gen = generate_concept(embedded, c.example_prompt, c, Settings(steps=4))
    assert gen.rows == ["customized", "alignit"]
    a, b = gen.images["customized"], gen.images["alignit"]
    assert a.size == b.size == (embedded.native_size,) * 2
    assert a.tobytes() != b.tobytes()
    assert gen.record()["p"] == c.example_prompt.replace(c.token, c.class_word)
    assert gen.swapped["alignit"] and gen.record()["concept"]["kind"] == c.kind


# ------------------------------------------------------------------------------ Custom Diffusion against diffusers


def crossattn_state(model, seed=30) -> dict[str, torch.Tensor]:
    """What diffusers' Custom Diffusion training with `--freeze_model crossattn` saves: every
    cross-attention layer's trained W_q, W_k, W_v and output projection, processor-named."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for layer, attn in model.cross_attention_layers.items():
        for ours, saved in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out.0", "to_out")):
            base = attn.get_submodule(ours)
            key = f"{layer}.processor.{saved}_custom_diffusion{'.0' if saved == 'to_out' else ''}"
            state[f"{key}.weight"] = base.weight.detach().cpu() + 0.3 * torch.randn(base.weight.shape, generator=g)
            if base.bias is not None:
                state[f"{key}.bias"] = base.bias.detach().cpu() + 0.3 * torch.randn(base.bias.shape, generator=g)
    return state


def diffusers_custom_diffusion(pipe, state: dict[str, torch.Tensor]):
    """`pipe` with diffusers' own Custom Diffusion processors installed from `state` (diffusers 0.42's
    `unet.load_attn_procs` builds them but installs none when called outside a pipeline)."""
    from diffusers.models.attention_processor import AttnProcessor2_0, CustomDiffusionAttnProcessor2_0

    processors = {}
    for name in pipe.unet.attn_processors:
        own = {k.removeprefix(f"{name}."): v for k, v in state.items() if k.startswith(f"{name}.")}
        if not own:
            processors[name] = AttnProcessor2_0()
            continue
        attn = pipe.unet.get_submodule(name.removesuffix(".processor"))
        proc = CustomDiffusionAttnProcessor2_0(train_kv=True, train_q_out="to_q_custom_diffusion.weight" in own,
                                               hidden_size=attn.to_q.out_features,
                                               cross_attention_dim=attn.to_k.in_features)
        proc.load_state_dict(own)
        processors[name] = proc
    pipe.unet.set_attn_processor(processors)
    return pipe


def test_custom_diffusion_crossattn_baseline_draws_what_diffusers_draws(tiny_sd, tmp_path):
    """A file trained with `--freeze_model crossattn` holds W_q and W_out beside W_k/W_v; the
    customized baseline applies them all, so it is the image diffusers' own processors draw."""
    from alignit_core.testing import build_tiny_sd

    state = crossattn_state(tiny_sd)
    token_vec = vec(1, WIDTH, seed=31)
    folder = write_concept(tmp_path / "cd", {"cd.safetensors": state, "e.safetensors": {"<new1>": token_vec}},
                           token="<new1>", class_word="dog", kind="custom_diffusion", weights="e.safetensors",
                           custom_diffusion="cd.safetensors")
    concept = load_concept(folder, tiny_sd)
    gen = generate_concept(tiny_sd, "a photo of a <new1>", concept, Settings(seed=4, steps=4, guidance=6.0))
    assert gen.warnings == []
    pipe = diffusers_custom_diffusion(build_tiny_sd(), state)
    pipe.load_textual_inversion({"<new1>": token_vec[0]}, token="<new1>")
    latent = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(4))
    ref = pipe("a photo of a <new1> dog", num_inference_steps=4, guidance_scale=6.0, height=64, width=64,
               latents=latent, output_type="np").images[0]
    plain = build_tiny_sd()(gen.record()["customized_prompt"].replace("<new1> ", ""), num_inference_steps=4,
                            guidance_scale=6.0, height=64, width=64, latents=latent, output_type="np").images[0]
    ours = np.asarray(gen.images["customized"], dtype=np.float64) / 255
    assert np.abs(ref - plain).mean() > 8 / 255  # the weights change the picture clearly
    assert np.abs(ours - ref).max() < 2 / 255, f"max {np.abs(ours - ref).max() * 255:.1f}/255, mean {np.abs(ours - ref).mean() * 255:.1f}/255"


def test_custom_diffusion_key_the_reader_does_not_know_is_refused_not_dropped(tiny_sd, tmp_path):
    state = crossattn_state(tiny_sd)
    layer = next(iter(tiny_sd.cross_attention_layers))
    state[f"{layer}.processor.to_k_custom_diffusion.lora_A.weight"] = torch.zeros(4, WIDTH)
    folder = write_concept(tmp_path / "cd", {"cd.safetensors": state, "e.safetensors": {"<new1>": vec(1, WIDTH)}},
                           token="<new1>", class_word="dog", kind="custom_diffusion", weights="e.safetensors",
                           custom_diffusion="cd.safetensors")
    with pytest.raises(ConceptError, match="does not know.*lora_A.*rather than leaving those weights out"):
        load_concept(folder, tiny_sd)


def test_adobe_delta_with_query_and_output_weights_applies_them(tiny_sd, tmp_path):
    """Adobe's `--freeze_model crossattn` delta.bin names the layers' own to_q/to_out; they are read."""
    state = crossattn_state(tiny_sd, seed=32)
    unet = {k.replace(".processor.", ".").replace("_custom_diffusion", ""): v for k, v in state.items()}
    folder = write_concept(tmp_path / "cd", {"delta.bin": {"unet": unet, "modifier_token": {"<new1>": vec(WIDTH),
                                                                                          "<new2>": vec(WIDTH)}}},
                           token="<new1>", class_word="dog", kind="custom_diffusion", custom_diffusion="delta.bin")
    c = load_concept(folder, tiny_sd)
    layer = next(iter(tiny_sd.cross_attention_layers))
    assert {f"{layer}.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")} <= set(c.unet)
    torch.testing.assert_close(c.unet[f"{layer}.to_out.0"].bias.cpu(),
                               state[f"{layer}.processor.to_out_custom_diffusion.0.bias"], rtol=0, atol=0)
    assert c.warnings == ("the Custom Diffusion file also holds embeddings for ['<new2>'], which are not used "
                          "(this concept is <new1>)",)
    gen = generate_concept(tiny_sd, "a photo of a <new1>", c, Settings(steps=1))
    assert gen.warnings == list(c.warnings)


def test_a1111_file_with_a_key_the_reader_does_not_know_warns(tiny_sd, tmp_path):
    path = tmp_path / "x.pt"
    torch.save({**a1111(vec(1, WIDTH)), "extra_vectors": vec(2, WIDTH)}, path)
    c = load_concept(path, tiny_sd, class_word="cat")
    assert c.warnings == ("the embedding file also holds ['extra_vectors'], which is not used",)
