"""Several concepts in one prompt on SD3 (with and without T5) and Flux: the customized row holds every
concept's vectors, AlignIT's row runs p with one side stream per concept (its own p' through its own
vectors), each writing its own positions' keys and values (SD3: CLIP rows and the paired T5 rows; Flux:
T5's, word by word). Tiny random-weight pipelines; seconds each."""
from __future__ import annotations

import pytest
import torch
from test_mmdit_concepts import _class_vectors, _concept_folder, _random
from test_mmdit_lora import TEXT_BRANCH, _diffusers_file, _layers, _pairs

from alignit_core import Settings, generate_concept, load_concept, load_model
from alignit_core.errors import PromptError
from alignit_core.families.mmdit import MMDiTRow, MMDiTSettings, MMDiTSwap, TextBranch, generate_rows
from alignit_core.families.mmdit_score import on_grid
from alignit_core.families.mmdit_text import ConceptVectors
from alignit_core.testing import tiny_flux, tiny_sd3
from alignit_core.views import ALIGNIT, token_view

FAST = dict(seed=1, steps=3, size=32)
TWO = "a <a> next to a <b> on a table"  # p: "a dog next to a cat on a table"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmdit-several")
    builds = {"sd3": tiny_sd3, "sd3-t5": lambda: tiny_sd3(t5=True), "flux": tiny_flux}
    for name, build in builds.items():
        build().save_pretrained(root / name)
    return {name: load_model(str(root / name), device="cpu") for name in builds}


def _pair(model, root, same=False):
    """Concepts <a> (class dog) and <b> (class cat): their class words' own embeddings (`same`), else learned."""
    root.mkdir(exist_ok=True)
    a = _class_vectors(model, "dog") if same else _random(model, seed=3)
    b = _class_vectors(model, "cat") if same else _random(model, seed=4, n=2)
    return (load_concept(_concept_folder(root, "a", a, token="<a>", class_word="dog"), model),
            load_concept(_concept_folder(root, "b", b, token="<b>", class_word="cat"), model))


def _direct(model, gen, rows):
    """`rows` through generate_rows at `gen`'s settings: final latents by row (Flux's unpacked)."""
    s = gen.settings
    settings = MMDiTSettings(seed=s.seed, steps=s.steps, guidance=s.guidance, size=s.size)
    latents = generate_rows(model.family.mmdit, rows, settings).latents
    return {row: on_grid(model.family.kind, latent) for row, latent in latents.items()}


def _swaps(gen, branches):
    """The request's swaps as generate_rows takes them (Flux: p' read at its own positions)."""
    return tuple(MMDiTSwap(tuple(plan.positions), plan.source.text, branch, getattr(plan, "source_positions", None))
                 for (plan, _), branch in zip(gen.request.sources, branches))


def _positions(gen, word: str) -> list[int]:
    """The positions of p AlignIT writes for the concept of class `word`."""
    return [q for q in gen.swapped["alignit"] if gen.tokens["alignit"][q].word == word]


@pytest.mark.parametrize("name", ["sd3", "sd3-t5", "flux"])
def test_two_concepts_of_their_class_words_own_vectors_are_the_class_words_bit_for_bit(models, tmp_path, name):
    """The customized row is the base model on p; on SD3 AlignIT's is p with each concept's p' read as
    text (its class word in place of its token) through the base model (on Flux T5 reads `*` and a word
    at other positions, so AlignIT is compared with its own side streams in the next test)."""
    model = models[name]
    a, b = _pair(model, tmp_path, same=True)
    gen = generate_concept(model, TWO, [a, b], Settings(**FAST), include_base=True)
    p = gen.request.p.text
    assert p == "a dog next to a cat on a table" and gen.rows == ["customized", "alignit", "base"]
    assert [plan.source.text.count(c.token) for (plan, _), c in zip(gen.request.sources, (a, b))] == [1, 1]
    as_text = tuple(MMDiTSwap(swap.positions, swap.source.replace("<a>", "dog").replace("<b>", "cat"))
                    for swap in _swaps(gen, (None, None)))
    if name == "flux":
        as_text = _swaps(gen, [TextBranch(vectors=ConceptVectors(c.token, c.vectors)) for c in (a, b)])
    direct = _direct(model, gen, [MMDiTRow("customized", p), MMDiTRow("alignit", p, swaps=as_text),
                                  MMDiTRow("base", p)])
    for row in gen.rows:
        assert torch.equal(gen.latents[row], direct[row]), row
    assert not torch.equal(gen.latents["alignit"], gen.latents["base"])  # p' is not p


@pytest.mark.parametrize("name", ["sd3", "sd3-t5", "flux"])
def test_two_concepts_are_two_side_streams_of_generate_rows(models, tmp_path, name):
    model = models[name]
    a, b = _pair(model, tmp_path)
    gen = generate_concept(model, TWO, [a, b], Settings(**FAST), include_base=True)
    assert [t.text for t in gen.tokens["customized"] if t.text.startswith("<") and t.word] == ["<a>", "<b>", "<b>_1"]
    p = gen.request.p.text
    branches = [TextBranch(vectors=ConceptVectors(c.token, c.vectors)) for c in (a, b)]
    both = ConceptVectors("<a> <b>", tuple(torch.cat([x, y]) for x, y in zip(a.vectors, b.vectors)),
                          (("<a>", 1), ("<b>", 2)))
    direct = _direct(model, gen, [MMDiTRow("customized", gen.request.customized.text, both),
                                  MMDiTRow("alignit", p, swaps=_swaps(gen, branches)), MMDiTRow("base", p)])
    for row in gen.rows:
        assert torch.equal(gen.latents[row], direct[row]), row
    dog, cat = _positions(gen, "dog"), _positions(gen, "cat")
    assert dog and cat and gen.swapped["alignit"] == tuple(dog + cat)
    # the customized row holds both concepts: neither alone draws it
    for alone, other in (("a <a> next to a cat on a table", a), ("a dog next to a <b> on a table", b)):
        one = generate_concept(model, alone, other, Settings(**FAST))
        assert not torch.equal(one.latents["customized"], gen.latents["customized"])


@pytest.mark.parametrize("name", ["sd3", "sd3-t5", "flux"])
def test_each_concepts_side_stream_writes_only_its_own_keys_and_values(models, tmp_path, name):
    """Each concept's rows (CLIP's, and T5's paired with them) are what it writes alone."""
    model = models[name]
    a, b = _pair(model, tmp_path)
    kw = dict(settings=Settings(**FAST), include_customized=False)
    seen, alone = [], {}
    gen = generate_concept(model, TWO, [a, b], on_kv=seen.append, **kw)
    for text, concept in (("a <a> next to a cat on a table", a), ("a dog next to a <b> on a table", b)):
        alone[concept.token] = []
        generate_concept(model, text, concept, on_kv=alone[concept.token].append, **kw)
    row = 0 if name == "flux" else 1  # SD3: [uncond alignit, cond alignit]
    base = len(gen.tokens["alignit"])
    for both, ra, rb in zip(seen, alone["<a>"], alone["<b>"]):
        assert (both.block, both.step) == (ra.block, ra.step) == (rb.block, rb.step)
        changed = [(r.key != r.swapped_key).any(-1).any(-1)[row] for r in (both, ra, rb)]  # (tokens,)
        assert not (changed[1] & changed[2]).any() and torch.equal(changed[0], changed[1] | changed[2])
        clip = [[q - both.text.start for q in c.nonzero().flatten().tolist() if q - both.text.start < base]
                for c in changed[1:]]
        assert clip == [_positions(gen, "dog"), _positions(gen, "cat")]
        if name == "sd3-t5":  # and the T5 rows of the same words
            assert all(len(c.nonzero()) > 1 for c in changed[1:])
    first = seen[0]  # block 0, step 0: the side streams have met the same image tokens
    for r in (alone["<a>"][0], alone["<b>"][0]):
        rows = (r.key != r.swapped_key).any(-1).any(-1)[row]
        for mine, theirs in ((first.swapped_key, r.swapped_key), (first.swapped_value, r.swapped_value)):
            assert torch.equal(mine[row, rows], theirs[row, rows])
    if name != "flux":
        assert gen.swapped["alignit"] == (2, 6)


@pytest.mark.parametrize("name", ["sd3-t5", "flux"])
def test_one_concept_in_a_list_is_the_one_concept_api(models, tmp_path, name):
    model = models[name]
    a, _ = _pair(model, tmp_path)
    text = "a <a> next to a cat on a table"
    listed = generate_concept(model, text, [a], Settings(**FAST))
    single = generate_concept(model, text, a, Settings(**FAST))
    for row in single.rows:
        assert torch.equal(listed.latents[row], single.latents[row])


def test_bad_input_with_several_concepts_is_refused_clearly(models, tmp_path):
    sd3, flux = models["sd3"], models["flux"]
    a, b = _pair(sd3, tmp_path)
    with pytest.raises(PromptError, match="the concept token <b> must appear once in the prompt"):
        generate_concept(sd3, "a <a> on a table", [a, b], Settings(**FAST))
    with pytest.raises(PromptError, match="the concept token <a> is chosen twice"):
        generate_concept(sd3, TWO, [a, a], Settings(**FAST))
    with pytest.raises(PromptError, match=r"position\(s\) \[3\] belong to no concept"):
        generate_concept(sd3, TWO, [a, b], Settings(**FAST), positions=[2, 3])
    fa, fb = _pair(flux, tmp_path / "flux")
    with pytest.raises(PromptError, match="the concept token <a> is not in the prompt"):
        generate_concept(flux, "a <b> on a table", [fa, fb], Settings(**FAST))
    with pytest.raises(PromptError, match="the concept token <b> is chosen twice"):
        generate_concept(flux, TWO, [fb, fb], Settings(**FAST))
    view = token_view(sd3, ALIGNIT, TWO, [a, b], "")
    assert not view.problem and view.selected == (2, 6) and [t for t, _ in view.sources] == ["<a>", "<b>"]
    view = token_view(flux, ALIGNIT, TWO, [fa, fb], "")
    assert not view.problem and view.p.text == "a dog next to a cat on a table" and len(view.sources) == 2


def test_chosen_positions_on_flux_keep_each_concepts_own_p_prime_positions(models, tmp_path):
    """Choosing one concept's positions is that concept alone, bit for bit."""
    flux = models["flux"]
    a, b = _pair(flux, tmp_path)
    kw = dict(settings=Settings(**FAST), include_customized=False)
    both = generate_concept(flux, TWO, [a, b], **kw)
    dog = _positions(both, "dog")
    chosen = generate_concept(flux, TWO, [a, b], positions=dog, **kw)
    alone = generate_concept(flux, "a <a> next to a cat on a table", a, **kw)
    assert chosen.swapped["alignit"] == tuple(dog)
    assert torch.equal(chosen.latents["alignit"], alone.latents["alignit"])


def test_two_loras_leave_out_the_customized_row_and_a_lora_beside_a_vector_keeps_it(models, tmp_path):
    """No single model holds two LoRAs' transformer weights; a LoRA and a textual inversion are one model."""
    model = models["sd3"]
    loras = []
    for k, (token, word) in enumerate((("sks", "dog"), ("ohwx", "cat"))):
        path = _diffusers_file(tmp_path / f"{token}.safetensors", _pairs(model, _layers(model, TEXT_BRANCH), seed=k))
        loras.append(load_concept(path, model, token=token, class_word=word))
    gen = generate_concept(model, "a sks next to a ohwx on a table", loras, Settings(**FAST))
    assert gen.rows == ["alignit"] and any("both change the denoiser" in w for w in gen.warnings)
    assert gen.request.p.text == "a dog next to a cat on a table"
    a, _ = _pair(model, tmp_path)
    mixed = generate_concept(model, "a sks next to a <a> on a table", [loras[0], a], Settings(**FAST))
    assert mixed.rows == ["customized", "alignit"]
    assert [t.text for t in mixed.tokens["customized"]][2:7] == ["sks", "dog", "next", "to", "a"]
    assert "<a>" in [t.text for t in mixed.tokens["customized"]]
