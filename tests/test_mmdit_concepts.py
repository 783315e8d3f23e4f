"""Textual-inversion concepts on SD3 and Flux: files in the SD3 (`clip_l`, `clip_g` (, `t5`)) and Flux
(`clip_l`, `t5`) layouts, the customized row (the concept's vectors written into each text encoder's
token embeddings), AlignIT through the side stream, and the clear refusals (wrong widths, other
concept kinds). Tiny random-weight pipelines saved to temporary folders; seconds each."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import assert_writes_only
from safetensors.torch import save_file

from alignit_core import Settings, generate_concept, load_concept, load_model
from alignit_core.cli import main
from alignit_core.concepts import Concept
from alignit_core.conditioning import Row
from alignit_core.encoding import token_embeddings
from alignit_core.errors import ConceptError, PromptError
from alignit_core.families.mmdit import MMDiTModel, MMDiTSettings
from alignit_core.families.mmdit_text import ConceptVectors, encode_flux, encode_sd3
from alignit_core.generate import run_rows
from alignit_core.testing import tiny_flux, tiny_sd3

FAST = dict(seed=1, steps=3, size=32)
PROMPT = "a <tok> on the beach"  # p: "a dog on the beach" (dog: one CLIP and one T5 token)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmdit-ti")
    tiny_sd3().save_pretrained(root / "sd3")
    tiny_sd3(t5=True).save_pretrained(root / "sd3-t5")
    tiny_flux().save_pretrained(root / "flux")
    return root


@pytest.fixture(scope="module")
def models(folders):
    return {name: load_model(str(folders / name), device="cpu") for name in ("sd3", "sd3-t5", "flux")}


def _keys(model) -> tuple[str, ...]:
    return model.family.concept_keys


def _class_vectors(model, word: str = "dog") -> dict[str, torch.Tensor]:
    """Each text encoder's own token embedding of `word` (one token in each), by file entry."""
    pipe, out = model.family.pipe, {}
    t5_tokenizer = pipe.tokenizer_2 if model.family.kind == "flux" else pipe.tokenizer_3
    for key, encoder in zip(_keys(model), model.concept_encoders):
        if key == "t5":
            ids = t5_tokenizer(word).input_ids[:-1]  # no start token; </s> last
            table = encoder.get_input_embeddings()
        else:
            ids = (pipe.tokenizer if key == "clip_l" else pipe.tokenizer_2)(word).input_ids[1:-1]
            table = token_embeddings(encoder)
        assert len(ids) == 1, (key, ids)
        out[key] = table.weight[ids[0]].detach().clone().reshape(1, -1)
    return out


def _concept_folder(root, name: str, vectors: dict, kind: str = "textual_inversion", **extra):
    folder = root / name
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in vectors.items()}, str(folder / "learned_embeds.safetensors"))
    manifest = {"name": name, "token": "<tok>", "class_word": "dog", "kind": kind,
                "weights": "learned_embeds.safetensors", **extra}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _random(model, seed: int = 3, n: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, v.shape[1], generator=g) * v.norm() / v.shape[1] ** 0.5
            for k, v in _class_vectors(model).items()}


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_a_concept_whose_vectors_are_the_class_words_own_draws_the_base_model_on_p(models, tmp_path, name):
    model = models[name]
    concept = load_concept(_concept_folder(tmp_path, "same", _class_vectors(model)), model)
    assert concept.n_vectors == 1 and len(concept.vectors) == len(_keys(model))
    gen = generate_concept(model, PROMPT, concept, Settings(**FAST), include_base=True)
    assert gen.rows == ["customized", "alignit", "base"]
    p = gen.request.p
    assert p.text == "a dog on the beach" and len(gen.tokens["customized"]) == len(p.ids)
    assert gen.maps["customized"].shape[0] == len(gen.tokens["customized"])
    # the same batch with the customized row on p instead: bit for bit (a CPU batch rounds each of its
    # rows a little differently, so like is compared with like); the base row of the batch: close
    plan, _ = gen.request.sources[0]
    images, _, _, latents = run_rows(model, [Row("customized", p), Row("alignit", p, swap=plan, swap_concept=concept),
                                             Row("base", p)], gen.settings)
    assert torch.equal(gen.latents["customized"], latents[0])
    assert np.array_equal(np.asarray(gen.images["customized"]), np.asarray(images[0]))
    assert torch.allclose(gen.latents["customized"], gen.latents["base"], atol=1e-4)


def test_without_the_token_the_encodings_are_the_pipelines_bit_for_bit(models):
    """A concept's vectors change nothing of a prompt that does not hold its token."""
    for name in ("sd3-t5", "flux"):
        model = models[name]
        mmdit: MMDiTModel = model.family.mmdit
        vectors = ConceptVectors("<tok>", tuple(v for v in _random(model).values()))
        run = encode_sd3 if name.startswith("sd3") else encode_flux
        plain = run(mmdit.pipe, "a dog on the beach", mmdit.text_encoders, 16)
        held = run(mmdit.pipe, "a dog on the beach", mmdit.text_encoders, 16, vectors)
        for a, b in zip(plain, held):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name, n", [("sd3", 1), ("sd3-t5", 2), ("flux", 1), ("flux", 3)])
def test_a_learned_concept_changes_the_customized_image_and_alignit_runs(models, tmp_path, name, n):
    model = models[name]
    concept = load_concept(_concept_folder(tmp_path, "learned", _random(model, n=n)), model)
    gen = generate_concept(model, PROMPT, concept, Settings(**FAST), include_base=True)
    tokens = gen.tokens["customized"]
    assert [t.text for t in tokens if t.word == "<tok>"] == ["<tok>"] + [f"<tok>_{k}" for k in range(1, n)]
    assert len(tokens) == len(gen.tokens["base"]) + n - 1 and gen.maps["customized"].shape[0] == len(tokens)
    assert not torch.equal(gen.latents["customized"], gen.latents["base"])
    assert not torch.equal(gen.latents["alignit"], gen.latents["base"])
    dog = [t.position for t in gen.tokens["base"] if t.word == "dog"]
    assert gen.swapped["alignit"] == tuple(dog) and gen.swapped["base"] == ()
    assert "<tok>" in gen.request.sources[0][0].source.text
    record = gen.record()
    assert record["p"] == "a dog on the beach"


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_alignit_writes_only_the_class_words_keys_and_values(models, tmp_path, name):
    model = models[name]
    concept = load_concept(_concept_folder(tmp_path, "kv", _random(model)), model)
    seen = []
    gen = generate_concept(model, PROMPT, concept, Settings(**FAST), include_base=True, include_customized=False,
                           on_kv=seen.append)
    assert gen.rows == ["alignit", "base"]
    dog = [t.position for t in gen.tokens["base"] if t.word == "dog"]
    half = 2 if name == "sd3" else 0  # SD3: [uncond alignit, uncond base, cond alignit, cond base]
    assert {(r.block, r.step) for r in seen} == {(b, i) for b in range(model.family.mmdit.blocks) for i in range(3)}
    first = next(r for r in seen if r.block == 0 and r.step == 0)
    assert_writes_only(seen, half, dog)
    for after, base in ((first.swapped_key, first.key), (first.swapped_value, first.value)):
        rows = [first.text.start + q for q in dog]
        gap = (after[half] - base[half + 1]).abs().amax((-1, -2))  # the AlignIT row against the base row
        others = [i for i in range(len(gap)) if i not in rows]
        assert (gap[rows] > 1e-3).all() and (gap[others] < 1e-4).all()


def test_chosen_positions_on_flux_are_among_the_concepts_own(models, tmp_path):
    flux = models["flux"]
    concept = load_concept(_concept_folder(tmp_path, "chosen", _random(flux, n=2)), flux)
    whole = generate_concept(flux, "a fluffy <tok>", concept, Settings(**FAST), include_customized=False)
    own = list(whole.swapped["alignit"])
    chosen = generate_concept(flux, "a fluffy <tok>", concept, Settings(**FAST), positions=own,
                              include_customized=False)
    assert torch.equal(chosen.latents["alignit"], whole.latents["alignit"])
    with pytest.raises(PromptError, match=re.escape(f"choose among its positions {own}, not [0]")):
        generate_concept(flux, "a fluffy <tok>", concept, Settings(**FAST), positions=[0])


def test_files_of_the_wrong_layout_or_width_are_refused_clearly(models, tmp_path):
    sd3, flux, with_t5 = models["sd3"], models["flux"], models["sd3-t5"]
    wide = {**_class_vectors(sd3), "clip_g": torch.randn(1, 48)}
    with pytest.raises(ConceptError, match=r"48 wide but sd3's text encoder 2 \(CLIPTextModelWithProjection\) "
                                           r"is 32 wide"):
        load_concept(_concept_folder(tmp_path, "wide", wide), sd3)
    with pytest.raises(ConceptError, match="no 't5' entry; this model's text encoders read clip_l, clip_g, t5"):
        load_concept(_concept_folder(tmp_path, "no-t5", _class_vectors(sd3)), with_t5)
    with pytest.raises(ConceptError, match="no 't5' entry; this model's text encoders read clip_l, t5"):
        load_concept(_concept_folder(tmp_path, "sdxl-style", _class_vectors(sd3)), flux)
    one = tmp_path / "one.safetensors"
    save_file({"<tok>": torch.randn(1, 32)}, str(one))
    with pytest.raises(ConceptError, match="embeddings for 1 text encoder"):
        load_concept(one, sd3, class_word="dog")
    # SD3's `t5` entry on a pipeline without T5: read, not used, said so
    extra = load_concept(_concept_folder(tmp_path, "sd3-file", {**_class_vectors(sd3), "t5": torch.randn(1, 64)}),
                         sd3)
    assert len(extra.vectors) == 2 and "not used" in extra.warnings[0]


def test_other_concept_kinds_are_refused_on_mmdit(models, tmp_path):
    sd3 = models["sd3"]
    message = "Custom Diffusion and text-encoder concepts on SD3/Flux are not supported yet; textual inversion"
    cd = tmp_path / "cd"
    cd.mkdir()
    (cd / "manifest.json").write_text(json.dumps({"kind": "custom_diffusion", "custom_diffusion": "nothing.bin",
                                                   "token": "<new1>", "class_word": "dog"}))
    with pytest.raises(ConceptError, match=message):
        load_concept(cd, sd3)  # before the file is read
    with pytest.raises(ConceptError, match=message):
        load_concept(_concept_folder(tmp_path, "te", _class_vectors(sd3), kind="text_encoder",
                                     text_encoder="te.safetensors"), sd3)
    with pytest.raises(ConceptError, match=message):
        generate_concept(sd3, "a sks on the beach", Concept("x", "sks", "dog", "custom_diffusion"), Settings(**FAST))
    same = load_concept(_concept_folder(tmp_path, "same", _class_vectors(sd3)), sd3)
    with pytest.raises(PromptError, match="the concept token <tok> is chosen twice"):  # test_mmdit_several.py
        generate_concept(sd3, "a <tok> and a <tok>", [same, same], Settings(**FAST))


def test_the_cli_draws_a_concept_on_sd3(folders, models, tmp_path):
    concept = _concept_folder(tmp_path, "cli-ti", _random(models["sd3"]))
    out = tmp_path / "out"
    assert main(["generate", "--model", str(folders / "sd3"), "--prompt", PROMPT, "--concept", str(concept),
                 "--steps", "2", "--size", "32", "--device", "cpu", "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"customized.png", "alignit.png", "settings.json"} <= names
    settings = json.loads((out / "settings.json").read_text())
    assert settings["p"] == "a dog on the beach"


def test_generate_rows_keeps_generate_mmdit(models):
    """The token-swap path is unchanged by rows: generate_mmdit's rows are 'baseline' and 'swapped'."""
    from alignit_core.families.mmdit import MMDiTRow, MMDiTSwap, generate_mmdit, generate_rows

    mmdit = models["sd3"].family.mmdit
    swap = MMDiTSwap((5,), "* * * * cat")
    a = generate_mmdit(mmdit, "a photo of a dog", [swap], MMDiTSettings(**FAST))
    b = generate_rows(mmdit, [MMDiTRow("baseline", "a photo of a dog"), MMDiTRow("swapped", "a photo of a dog",
                                                                                 swaps=(swap,))], MMDiTSettings(**FAST))
    for row in ("baseline", "swapped"):
        assert torch.equal(a.latents[row], b.latents[row])


def test_the_demo_takes_an_uploaded_textual_inversion_on_sd3(tmp_path):
    """On an SD3 model the page accepts a textual-inversion upload and draws the customized baseline,
    AlignIT (the concept's rows at the class word's position) and the base model on p."""
    import app
    from alignit_core.models import from_components
    from alignit_core.testing import tiny_sd3

    model = from_components(tiny_sd3(), "tiny-sd3")
    widths = [e.get_input_embeddings().weight.shape[1] for e in model.text_encoders[:2]]
    g = torch.Generator().manual_seed(0)
    save_file({"clip_l": torch.randn(1, widths[0], generator=g), "clip_g": torch.randn(1, widths[1], generator=g)},
              str(tmp_path / "tok.safetensors"))
    uploaded, *_, prompt = app.add_concept(model, {}, {}, str(tmp_path / "tok.safetensors"), "<tok>", "dog")
    assert prompt == "a photo of a <tok>"
    *shown, grid, settings, line, gen, pair, maps = app.generate(
        model, {}, uploaded, app.ALIGNIT, "uploaded:<tok>", "a photo of a <tok> on the grass", [], "", 1, 3, 7.0, 32,
        "euler", False, 0.0, 1.0, None, True, "overlay", progress=lambda *a, **k: None)
    assert gen.rows == ["customized", "alignit", "base"] and gen.swapped["alignit"] == (5,)
    pixels = [np.asarray(gen.images[r]).astype(int) for r in gen.rows]
    assert np.abs(pixels[0] - pixels[1]).mean() > 0.5  # AlignIT is not the customized baseline
    assert "--concept tok.safetensors" in line
