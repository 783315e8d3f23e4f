"""The shapes world: renderer, held-out split, pixel classifier, and the training script's smoke run."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from alignit_core.toy.evaluate import fidelity
from alignit_core.toy.shapes import (COLOURS, HELD_OUT, NOVEL, PATTERNS, SHAPES, Scene, classify, random_scene,
                                     render, styled, to_uint8, training_triples)


def test_classifier_reads_rendered_scenes_exactly():
    rng = random.Random(0)
    scenes = [random_scene(rng) for _ in range(200)]
    for scene, image in zip(scenes, to_uint8(render(scenes))):
        j = classify(image)
        assert (j.colour, j.shape, j.background) == (scene.colour, scene.shape, scene.background), scene


def test_classifier_reads_patterned_scenes_and_their_pattern():
    """Striped: the object's own colour still dominates (five bands over its height) and the stripe
    colour covers >= 20 %; holed: the hole is found (and never on an unholed object). Every shape,
    both stripe colourings."""
    rng = random.Random(1)
    scenes = [random_scene(rng, patterned=1.0) for _ in range(120)]
    scenes += [styled(Scene("white", s, b), pattern="striped") for s in SHAPES for b in ("black", "blue")]
    assert {s.pattern for s in scenes} == set(PATTERNS)
    for scene, image in zip(scenes, to_uint8(render(scenes))):
        j = classify(image)
        assert (j.colour, j.shape, j.background) == (scene.colour, scene.shape, scene.background), scene
        assert j.hole == (scene.pattern == "holed"), scene
        if scene.pattern == "striped":
            assert j.colour_shares[scene.second_colour] >= 0.2, scene
            assert scene.second_colour not in (scene.colour, scene.background)


def test_training_never_draws_the_novel_instances_but_draws_their_parts():
    rng = random.Random(2)
    drawn = {(s.colour, s.shape, s.pattern) for s in (random_scene(rng, patterned=0.5) for _ in range(20000))}
    assert not drawn & NOVEL
    for colour, shape, pattern in NOVEL:  # the parts: that colour patterned so, that shape patterned so
        assert any(c == colour and p == pattern for c, _, p in drawn)
        assert any(s == shape and p == pattern for _, s, p in drawn)
        assert (colour, shape, "plain") in drawn


def test_novel_mix_makes_the_instances_part_of_the_world_and_names_them_in_words():
    """--novel-mix P: a share P of training scenes shows one of the NOVEL instances, on any training
    background, captioned in words (`a red striped circle ...`); without it no batch ever shows one."""
    from transformers import CLIPTokenizer

    from scripts.train_embedded import TOKENIZER_DIR, Vocab, sample_batch

    vocab = Vocab(CLIPTokenizer.from_pretrained(TOKENIZER_DIR))
    words = {v: k for k, v in vocab.ids.items()}

    def shown(novel_mix, seed):
        batch = sample_batch(random.Random(seed), vocab, 64, swap_mix=0.25, pattern_mix=0.3, novel_mix=novel_mix)
        return batch, [(s.colour, s.shape, s.pattern) in NOVEL for s in batch.targets]

    assert not any(any(shown(0.0, seed)[1]) for seed in range(20))
    batches = [shown(0.25, seed) for seed in range(20)]
    share = np.mean([hit for _, hits in batches for hit in hits])
    assert 0.15 < share < 0.35
    instances, backgrounds = set(), set()
    for batch, hits in batches:
        for b in np.flatnonzero(hits):
            scene = batch.targets[b]
            instances.add((scene.colour, scene.shape, scene.pattern)); backgrounds.add(scene.background)
            caption = [words[i] for i in batch.ids[b, 1:batch.eos[b]].tolist()]
            if caption and batch.swap_pos[b] < 0:
                assert scene.shape in caption and ("striped" in caption) == (scene.pattern == "striped")
    assert instances == set(NOVEL) and len(backgrounds) >= 5


def test_patterned_captions_name_the_pattern():
    star = styled(Scene("green", "star", "red"), pattern="holed")
    ball = styled(Scene("blue", "circle", "white"), pattern="striped")
    assert star.caption() == "a green star with a hole on a red background"
    assert ball.caption("a photo of a {c} {s}") == "a photo of a blue striped circle"
    assert ball.second_colour == "black" and styled(ball, background="green").second_colour == "white"


def test_held_out_combinations_never_appear_in_training_but_their_parts_do():
    train = set(training_triples())
    assert not train & set(HELD_OUT)
    for c, s, b in HELD_OUT:
        assert any(t[0] == c for t in train) and any(t[1] == s for t in train) and any(t[2] == b for t in train)


def test_fidelity_tells_the_novel_instances_from_plain_shapes():
    ball = Scene("red", "circle", "blue", pattern="striped", second_colour="white")
    star = Scene("orange", "star", "purple", pattern="holed")
    images = to_uint8(render([ball, Scene("red", "circle", "blue"), star, Scene("orange", "star", "purple")]))
    judged = [classify(im) for im in images]
    assert fidelity(judged[0], ball) and not fidelity(judged[1], ball)
    assert fidelity(judged[2], star) and not fidelity(judged[3], star)


def test_fidelity_parts_name_the_part_of_the_instance_a_picture_drops():
    """`fidelity_parts` (table1.py --parts): a picture that drops one part of an instance misses exactly that
    part, and `fidelity` is all three."""
    from alignit_core.toy.evaluate import PARTS, fidelity_parts
    ball = Scene("red", "circle", "blue", pattern="striped", second_colour="white")
    star = Scene("orange", "star", "purple", pattern="holed")
    cases = [(ball, ball, set()), (ball, Scene("red", "circle", "blue"), {"pattern"}),
             (ball, Scene("green", "circle", "blue", pattern="striped", second_colour="white"), {"colour"}),
             (ball, Scene("red", "square", "blue", pattern="striped", second_colour="white"), {"shape"}),
             (star, star, set()), (star, Scene("orange", "star", "purple"), {"pattern"}),
             (star, Scene("green", "star", "purple", pattern="holed"), {"colour"}),
             (star, Scene("orange", "square", "purple", pattern="holed"), {"shape"})]
    images = to_uint8(render([drawn for _, drawn, _ in cases]))
    for (instance, drawn, dropped), image in zip(cases, images):
        parts = fidelity_parts(classify(image), instance)
        assert set(parts) == set(PARTS) and {p for p, has in parts.items() if not has} == dropped, (drawn, parts)
        assert fidelity(classify(image), instance) == (not dropped)


def test_a_judgement_says_what_the_picture_shows_in_the_worlds_words():
    """`Judgement.words`, which the demo's image boxes show on the embedded models: the colours over a fifth of the
    object (the striped ball's two), its shape, its hole, and the background; nothing drawn, nothing named."""
    scenes = [Scene("orange", "star", "yellow", pattern="holed"), Scene("red", "circle", "blue", pattern="striped",
              second_colour="white"), Scene("green", "triangle", "black")]
    said = [classify(im).words for im in to_uint8(render(scenes))]
    assert said[0] == "orange star with a hole on yellow" and said[2] == "green triangle on black"
    assert said[1] in ("red and white circle on blue", "white and red circle on blue"), said[1]
    assert classify(np.full((128, 128, 3), 245, np.uint8)).words == "nothing on white"


def test_references_on_several_backgrounds_keep_the_instance_and_table1_asks_none_of_them(tmp_path):
    """`--reference-backgrounds 3`: the instance itself in every picture, on its own background and
    two others that are none of its colours; Table 1 then asks for none of the backgrounds its
    references show (the classifier reads them off the pictures a concept folder holds)."""
    from types import SimpleNamespace

    from PIL import Image

    from alignit_core.toy.evaluate import table1_prompts
    from alignit_core.toy.instances import INSTANCES, references
    for name in INSTANCES:
        instance = INSTANCES[name]["scene"]
        assert {s.background for s in references(name)} == {instance.background}
        scenes = references(name, backgrounds=3)
        assert len({s.background for s in scenes}) == 3 and scenes[0].background == instance.background
        images = to_uint8(render(scenes))
        assert all(fidelity(classify(im), instance) for im in images)
        assert {classify(im).background for im in images} == {s.background for s in scenes}
        paths = []
        for i, im in enumerate(images):
            Image.fromarray(im).save(tmp_path / f"{name}-{i}.png")
            paths.append(tmp_path / f"{name}-{i}.png")
        concept = SimpleNamespace(token=f"<{name}>", references=tuple(paths))
        asked = {b for _, b in table1_prompts(concept, instance)}
        one_place = {b for _, b in table1_prompts(SimpleNamespace(token=f"<{name}>", references=()), instance)}
        assert asked == one_place - {s.background for s in scenes} and len(asked) >= 3


def test_classifier_reports_no_object_on_a_blank_image():
    blank = np.zeros((128, 128, 3), np.uint8) + np.array([40, 70, 220], np.uint8)
    j = classify(blank)
    assert j.background == "blue" and j.colour is None and j.shape is None


def test_custom_diffusions_class_prior_shows_only_its_class_and_names_it():
    """--cd-prior class: Custom Diffusion's regularization batch is scenes of the concept's class
    (every one a star, captioned with the word unless the caption was dropped); templates: those scenes
    captioned with the concept prompts' phrasings; world: any shape."""
    from types import SimpleNamespace

    from transformers import CLIPTokenizer

    from scripts.train_embedded import CONCEPT_TEMPLATES, TOKENIZER_DIR, Vocab, cd_prior

    vocab = Vocab(CLIPTokenizer.from_pretrained(TOKENIZER_DIR))
    words = {v: k for k, v in vocab.ids.items()}
    args = SimpleNamespace(cd_prior="class", pattern_mix=0.3, novel_mix=0.04, template_mix=0.0)
    ids, scenes = cd_prior(args, random.Random(0), vocab, 32, "star")
    assert ids.shape == (32, 77) and len(scenes) == 32
    assert {s.shape for s in scenes} == {"star"}
    named = [vocab.ids["star"] in row.tolist() for row in ids]
    assert 0.75 <= np.mean(named) < 1.0  # caption dropout (10 %) leaves some empty
    args.cd_prior = "templates"  # the same scenes, captioned as the concept prompts are phrased
    ids, scenes = cd_prior(args, random.Random(0), vocab, 32, "star")
    assert {s.shape for s in scenes} == {"star"}
    captions = {" ".join(words[i] for i in row.tolist() if i in words) for row in ids}
    assert len(captions) > 5 and captions <= {t.format("star") for t in CONCEPT_TEMPLATES}
    args.cd_prior = "world"
    assert len({s.shape for s in cd_prior(args, random.Random(0), vocab, 32, "star")[1]}) > 1


def test_template_mix_captions_the_world_as_concept_prompts_and_changes_nothing_else():
    """--template-mix 1: every caption begins as a concept prompt does (`a cropped photo of the`), then
    names the scene as before; its new words draw nothing (word class 0). At 0 the captions stay in the
    world's own words (`a`, `a photo of a`)."""
    from transformers import CLIPTokenizer

    from scripts.train_embedded import CONCEPT_TEMPLATES, TOKENIZER_DIR, TEMPLATES, Vocab, sample_batch

    vocab = Vocab(CLIPTokenizer.from_pretrained(TOKENIZER_DIR))
    words = {v: k for k, v in vocab.ids.items()}
    prefixes = {t.split("{}")[0].strip() for t in CONCEPT_TEMPLATES}
    world_words = set(" ".join(TEMPLATES).split()) | {"striped", "with", "hole"}

    def batch(mix):
        return sample_batch(random.Random(3), vocab, 48, 0.0, 0.3, template_mix=mix)

    plain, phrased = batch(0.0), batch(1.0)
    seen = set()
    for ids, scene, kinds in zip(phrased.ids.tolist(), phrased.targets, phrased.word_class.tolist()):
        caption = [words[i] for i in ids[1:] if i in words]
        if not caption:  # caption dropout
            continue
        first = next(i for i, w in enumerate(caption) if w in (scene.colour, scene.shape, "striped"))
        assert " ".join(caption[:first]) in prefixes, caption
        seen.add(" ".join(caption[:first]))
        assert kinds[1:first + 1] == [0] * first  # the phrasing's words draw nothing
        assert scene.shape in caption
    assert len(seen) >= 6  # many phrasings, not one
    for ids in plain.ids.tolist():
        assert {words[i] for i in ids if i in words} <= world_words | set(COLOURS) | set(SHAPES)


def test_training_script_smoke_run_exports_a_loadable_model_and_concepts(tmp_path, monkeypatch):
    from alignit_core import find_concepts, generate_swap, load_model, Settings
    import scripts.train_embedded as train
    from scripts.train_embedded import main

    main(["--smoke", "--out", str(tmp_path / "assets"), "--work", str(tmp_path / "work")])
    model = load_model(str(tmp_path / "assets" / "embedded-shapes"), device="cpu")
    assert model.native_size == 128
    gen = generate_swap(model, "a red circle", [("red", "blue")], Settings(seed=0, steps=2))
    assert set(gen.images) == {"baseline", "swapped"}
    concepts = find_concepts(tmp_path / "assets" / "concepts", model)
    assert sorted(c.name for c in concepts) == [f"{i}-{k}" for i in ("holed-star", "striped-ball") for k in ("cd", "te", "ti")]
    # resuming from the finished checkpoints trains nothing more and exports again
    main(["--smoke", "--out", str(tmp_path / "again"), "--work", str(tmp_path / "work")])
    assert (tmp_path / "again" / "embedded-shapes" / "unet").is_dir()
    # continuing the exported UNet (--unet-init) trains it further, with the mixes, attention losses and
    # latent pool of models v4 and v5, and exports only the concepts asked for
    exported = tmp_path / "assets" / "embedded-shapes"
    main(["--smoke", "--unet-init", str(exported), "--cosine", "--concepts", "holed-star-cd",
          "--pure-mix", "0.5", "--eot-mix", "1", "--attention-weight", "0.05", "--eot-attention-weight", "0.1",
          "--row-consistency-weight", "1", "--latent-pool", "1", "--cd-kv-lr", "5e-5", "--cd-prior", "class",
          "--out", str(tmp_path / "more"), "--work", str(tmp_path / "work-more")])
    before, after = (load_model(str(d / "embedded-shapes"), device="cpu") for d in (tmp_path / "assets", tmp_path / "more"))
    assert not torch.equal(before.unet.conv_in.weight, after.unet.conv_in.weight)
    assert torch.equal(before.vae.decoder.conv_out.weight, after.vae.decoder.conv_out.weight)
    assert sorted(p.name for p in (tmp_path / "more" / "concepts").iterdir()) == ["holed-star-cd"]
    assert not torch.equal(before.text_encoders[0].get_input_embeddings().weight, after.text_encoders[0].get_input_embeddings().weight)
    # --freeze-text trains the UNet only, as Stable Diffusion's UNet learns to read a frozen CLIP
    main(["--smoke", "--unet-init", str(exported), "--freeze-text", "--compound-mix", "0.5", "--row-noise", "0.3", "--concepts",
          "--filler-weight", "0.1", "--reading-weight", "0.1", "--out", str(tmp_path / "frozen"), "--work", str(tmp_path / "work-frozen")])
    frozen = load_model(str(tmp_path / "frozen" / "embedded-shapes"), device="cpu")
    assert not torch.equal(before.unet.conv_in.weight, frozen.unet.conv_in.weight)
    assert all(torch.equal(a, b) for a, b in zip(before.text_encoders[0].parameters(), frozen.text_encoders[0].parameters()))
    # --concept-eval-every: the concept exported is the checkpoint whose validation pictures reproduced the
    # instance most often, not the last one (the rates here are scripted; the real measure runs first)
    seen, rates = [], iter([0.9, 0.1])

    def scripted(args, device, name, kind, model, encoder, vae, scale, vocab, vec):
        rate = real(args, device, name, kind, model, encoder, vae, scale, vocab, vec)
        assert 0.0 <= rate <= 1.0 and rate * args.concept_eval_n == round(rate * args.concept_eval_n)
        seen.append(vec.detach().clone())
        return next(rates)

    real = train.validation_reproduction
    monkeypatch.setattr(train, "validation_reproduction", scripted)
    main(["--smoke", "--init-from", str(exported), "--concepts", "holed-star-ti", "--concept-eval-every", "1",
          "--concept-eval-n", "2", "--out", str(tmp_path / "chosen"), "--work", str(tmp_path / "work-chosen")])
    from safetensors.torch import load_file
    kept = load_file(tmp_path / "chosen" / "concepts" / "holed-star-ti" / "learned_embeds.safetensors")["<holed-star>"]
    assert len(seen) == 2 and not torch.equal(seen[0], seen[1])
    assert torch.equal(kept.view(-1), seen[0].view(-1).half())
    # --decoder-init fine-tunes only the VAE's decoder (the latent space stays) and exports only the VAE
    main(["--smoke", "--decoder-init", str(exported), "--out", str(tmp_path / "dec"), "--work", str(tmp_path / "work-dec")])
    assert sorted(p.name for p in (tmp_path / "dec" / "embedded-shapes").iterdir()) == ["vae"]
    from diffusers import AutoencoderKL
    old, new = (AutoencoderKL.from_pretrained(d / "embedded-shapes" / "vae") for d in (tmp_path / "assets", tmp_path / "dec"))
    assert torch.equal(old.encoder.conv_in.weight, new.encoder.conv_in.weight)
    assert not torch.equal(old.decoder.conv_out.weight, new.decoder.conv_out.weight)
    assert new.config.scaling_factor == old.config.scaling_factor


def test_a_textual_inversion_of_several_vectors_trains_each_and_loads_as_diffusers_num_vectors(tmp_path):
    """--ti-vectors N: the token is N placeholders in every caption (diffusers' --num_vectors), each
    vector starting as the class word; the file holds (N, dim) and the engine spells the token out."""
    from safetensors.torch import load_file
    from transformers import CLIPTokenizer

    from alignit_core import Settings, generate_concept, load_concept, load_model
    from alignit_core.models import EMBEDDED
    from scripts.train_embedded import STAR, TOKENIZER_DIR, Vocab, concept_ids, main, vector_rows

    vocab = Vocab(CLIPTokenizer.from_pretrained(TOKENIZER_DIR))
    ids, pos = concept_ids(vocab, ["a", "photo", "of", "a", "<x>", "circle"], "<x>", 3)
    assert pos == 5 and ids[5:8] == [vocab.ids[STAR]] * 3 and ids[8] == vocab.ids["circle"]
    vec = torch.arange(6.0).view(3, 2)
    vectors, mask = vector_rows(vec, [1, 4], 9)
    assert mask.nonzero().tolist() == [[0, 1], [0, 2], [0, 3], [1, 4], [1, 5], [1, 6]]
    assert torch.equal(vectors[1, 4:7], vec) and torch.equal(vectors[0, 1:4], vec) and vectors[~mask].abs().sum() == 0
    main(["--smoke", "--init-from", str(EMBEDDED), "--concepts", "holed-star-ti", "--ti-vectors", "2",
          "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    folder = tmp_path / "out" / "concepts" / "holed-star-ti"
    vectors = load_file(folder / "learned_embeds.safetensors")["<holed-star>"]
    assert vectors.shape[0] == 2 and not torch.equal(vectors[0], vectors[1])
    model = load_model("embedded", device="cpu")
    concept = load_concept(folder, model)
    gen = generate_concept(model, "a <holed-star> on a red background", concept, Settings(seed=0, steps=2))
    assert [t.text for t in gen.tokens["customized"]][2:4] == ["<holed-star>", "<holed-star>_1"]
    # right alignment: the last vector lands on `star`, the first over the `a` before it (AlignIT leaves that row)
    assert gen.swapped["alignit"] == (2,)
    plan = model.family.concept_plan("a <holed-star> on a red background", concept.words).plan
    assert plan.source.vectors == {1: 0, 2: 1} and plan.unstarred() == (1, 2)


def test_a_text_encoder_fine_tune_tunes_and_writes_only_the_layers_asked(tmp_path):
    """--te-layers: which layers' self-attention keys and values a text-encoder concept fine-tunes; its
    file holds those and no others (the shipped ones: the last of three layers), and it loads."""
    from safetensors.torch import load_file

    from alignit_core import load_concept, load_model
    from alignit_core.models import EMBEDDED
    from scripts.train_embedded import main

    def layers(path):
        return {(int(k.split("layers.")[1].split(".")[0]), k.split(".")[-2]) for k in load_file(path)}

    for name in ("striped-ball-te", "holed-star-te"):
        assert layers(EMBEDDED.parent / "concepts" / name / "text_encoder.safetensors") == {
            (2, "k_proj"), (2, "v_proj")}
    main(["--smoke", "--init-from", str(EMBEDDED), "--concepts", "holed-star-te", "--te-layers", "2",
          "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    folder = tmp_path / "out" / "concepts" / "holed-star-te"
    assert layers(folder / "text_encoder.safetensors") == {(2, "k_proj"), (2, "v_proj")}
    model = load_model("embedded", device="cpu")
    tuned = load_concept(folder, model).text_encoders[0]
    base = dict(model.text_encoders[0].named_parameters())
    changed = {n for n, p in tuned.named_parameters() if not torch.equal(p.to(base[n]), base[n])}
    assert changed and all("layers.2.self_attn." in n for n in changed)


def test_mmdit_training_smoke_run_exports_an_sd3_folder_and_concepts_that_load(tmp_path):
    """scripts/train_mmdit.py beside an exported UNet model: the SD3 folder it writes links the UNet
    model's VAE, encoder and tokenizer files (relative links), loads in the engine, swaps, and its
    textual-inversion concepts load for it and draw AlignIT's rows."""
    import shutil

    from alignit_core import find_concepts, generate_concept, generate_swap, load_model, Settings
    from alignit_core.models import EMBEDDED
    from scripts.train_mmdit import main

    assets = tmp_path / "assets"
    shutil.copytree(EMBEDDED, assets / "embedded-shapes")
    main(["--smoke", "--concepts", "--out", str(assets), "--work", str(tmp_path / "work")])
    folder = assets / "embedded-mmdit"
    links = [p for p in folder.rglob("*") if p.is_symlink()]
    assert links and all(not p.readlink().is_absolute() for p in links)
    model = load_model(str(folder), device="cpu")
    assert model.family.defaults().text_rows == 1 and model.native_size == 128
    gen = generate_swap(model, "a red circle", [("red", "blue")], Settings(seed=0, steps=2))
    assert set(gen.images) == {"baseline", "swapped"}
    concepts = find_concepts(assets / "concepts", model)
    assert sorted(c.name for c in concepts) == ["holed-star-ti-mmdit", "striped-ball-ti-mmdit"]
    gen = generate_concept(model, "a <holed-star> on a red background", concepts[0], Settings(seed=0, steps=2))
    assert set(gen.images) == {"customized", "alignit"}
    # --concepts-only retrains the concepts on the exported model and leaves the model as it is
    weights = (folder / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    main(["--smoke", "--concepts-only", "--ti-steps", "3", "--out", str(assets), "--work", str(tmp_path / "work2")])
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() == weights


def test_end_share_is_the_attention_given_to_the_end_and_padding_rows():
    from scripts.train_embedded import end_share

    probs = torch.zeros(2, 4, 6)  # (batch, pixels, tokens); end tokens at 3 and 2
    probs[0, :, 0], probs[0, :, 3] = 0.75, 0.25  # a quarter on the end row
    probs[1, :, 1], probs[1, :, 4] = 0.5, 0.5  # half on padding
    assert end_share([probs], torch.tensor([3, 2])).item() == pytest.approx(0.375)
    probs[0, :, 3], probs[0, :, 0] = 0.0, 1.0  # all on the start token
    probs[1, :, 4], probs[1, :, 1] = 0.0, 1.0
    assert end_share([probs, probs], torch.tensor([3, 2])).item() == 0.0


def test_filler_share_is_the_attention_given_to_the_words_that_draw_nothing():
    from scripts.train_embedded import filler_share

    # `<start> a red circle <end> <pad>`: `a` draws nothing (class 0), `red circle` the object (class 1)
    word_class = torch.tensor([[0, 0, 1, 1, 0, 0]])
    probs = torch.zeros(1, 4, 6)
    probs[0, :2, 1], probs[0, :2, 2] = 0.5, 0.5  # two pixels give half to `a`
    probs[0, 2:, 0], probs[0, 2:, 4] = 0.5, 0.5  # two read the start and end rows only: not filler
    assert filler_share([probs], word_class, torch.tensor([4])).item() == pytest.approx(0.25)
    probs[0, :2, 1], probs[0, :2, 3] = 0.0, 0.5  # `a`'s share moved to `circle`
    assert filler_share([probs, probs], word_class, torch.tensor([4])).item() == 0.0


def test_reading_shortfall_is_what_each_pixel_gives_to_words_that_did_not_draw_it():
    from scripts.train_embedded import reading_shortfall

    # `<start> a red circle on blue <end>`: `red circle` the object's words, `blue` the background's;
    # the object covers the left half of the 16x16 latent
    word_class = torch.tensor([[0, 0, 1, 1, 0, 2, 0]])
    mask = torch.zeros(1, 16, 16)
    mask[0, :, :8] = 1.0
    mask = mask.flatten(1)
    obj = mask[0] > 0
    probs = torch.zeros(1, 16 * 16, 7)
    probs[0, :, 0] = 1.0  # every pixel reads the start of text only
    assert reading_shortfall([probs], word_class, mask).item() == pytest.approx(1.0)
    probs[0, obj, 0], probs[0, obj, 2] = 0.25, 0.75  # the object's pixels give 3/4 to `red`
    assert reading_shortfall([probs], word_class, mask).item() == pytest.approx(1 - 0.75 / 2)
    assert reading_shortfall([probs], word_class, mask, "object").item() == pytest.approx(0.25)
    probs[0, ~obj, 0], probs[0, ~obj, 3] = 0.0, 1.0  # the background's pixels read `circle`: not theirs
    assert reading_shortfall([probs], word_class, mask).item() == pytest.approx(1 - 0.75 / 2)
    probs[0, ~obj, 3], probs[0, ~obj, 5] = 0.0, 1.0  # now `blue`
    assert reading_shortfall([probs], word_class, mask).item() == pytest.approx(1 - 1.75 / 2)
    # "balanced" counts the object's words as read only as far as the least-read one: `circle` gets nothing
    assert reading_shortfall([probs], word_class, mask, "balanced").item() == pytest.approx(1 - 1.0 / 2)
    probs[0, obj, 2], probs[0, obj, 3] = 0.25, 0.5  # `red` 1/4, `circle` 1/2: read as 2 x 1/4
    assert reading_shortfall([probs], word_class, mask, "balanced").item() == pytest.approx(1 - 1.5 / 2)
    assert reading_shortfall([probs], word_class, mask).item() == pytest.approx(1 - 1.75 / 2)
    # a dropped caption (no words of either region) leaves no infinite least share behind, nor a NaN gradient
    logits = torch.zeros(2, 16 * 16, 7, requires_grad=True)
    both = torch.cat([word_class, torch.zeros_like(word_class)])
    lost = reading_shortfall([logits.softmax(-1)], both, mask.repeat(2, 1), "balanced")
    lost.backward()
    # uniform reading, 1/7 a row: the first sample's object pixels 2 x 1/7, its background's 1/7; the
    # dropped caption's object pixels count with nothing read (128 + 128 + 128 pixels)
    assert lost.item() == pytest.approx(1 - (128 * 2 / 7 + 128 / 7) / 384)
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # at 8x8 the silhouette is pooled from 16x16: every pixel reading `circle` reads its own words on the left half
    probs8 = torch.zeros(1, 64, 7)
    probs8[0, :, 3] = 1.0
    assert reading_shortfall([probs8], word_class, mask).item() == pytest.approx(0.5)
    # a caption naming no background asks the object's pixels only
    assert reading_shortfall([probs8], torch.tensor([[0, 0, 1, 1, 0, 0, 0]]), mask).item() == pytest.approx(0.0)


def test_the_attention_probe_sits_on_the_cross_attention_layers_of_the_sides_asked():
    """The training losses read the 16x16 layers (outer down and up blocks), or every side asked;
    the side of a layer is the engine's (MapLayers), so losses and heat maps mean the same layers."""
    from diffusers import UNet2DConditionModel

    from scripts.train_embedded import ROOT, probe_cross_attention

    unet = UNet2DConditionModel.from_pretrained(ROOT / "assets" / "embedded-shapes" / "unet")

    def probed(probe):
        return {n.split(".transformer")[0] for n, m in unet.named_modules() if n.endswith("attn2") and m.processor is probe}

    fine = {"down_blocks.0.attentions.0", "up_blocks.2.attentions.0", "up_blocks.2.attentions.1"}
    assert probed(probe_cross_attention(unet)) == fine
    coarse = {"down_blocks.1.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1",
              "mid_block.attentions.0"}
    assert probed(probe_cross_attention(unet, (8, 4))) == coarse
    assert probed(probe_cross_attention(unet, (16, 8, 4))) == fine | coarse
    assert probed(probe_cross_attention(unet, (4,))) == {"mid_block.attentions.0"}


def test_row_drift_is_zero_for_rows_that_ignore_the_words_before_them():
    """The base model's prefix loss: 1 - cosine between an off-vocabulary vector's row after some words
    (a caption's first words, or the start of one of textual inversion's phrasings) and after as many
    `*`. An encoder whose self-attention adds nothing reads each row from its own token and position
    alone (drift 0); the shipped encoder's rows move with their prefix."""
    import random

    from transformers import CLIPTokenizer

    from alignit_core.models import EMBEDDED
    from alignit_core.toy.sampling import load_exported
    from scripts.train_embedded import TOKENIZER_DIR, Vocab, row_drift, sample_batch

    te = load_exported(EMBEDDED, torch.device("cpu"))[2].float()
    vocab = Vocab(CLIPTokenizer.from_pretrained(TOKENIZER_DIR))
    batch = sample_batch(random.Random(0), vocab, 16, swap_mix=0.0)
    shipped = {p: row_drift(te, batch, vocab, torch.Generator().manual_seed(0), p) for p in ("phrasings", "captions")}
    for name, p in te.named_parameters():
        if "self_attn.out_proj" in name:
            p.data.zero_()
    assert min(shipped.values()) > 0.01
    for prefixes in shipped:
        assert row_drift(te, batch, vocab, torch.Generator().manual_seed(0), prefixes).item() == pytest.approx(0.0, abs=1e-6)


def test_compound_captions_fold_the_object_into_one_row_read_from_its_own_prompt():
    """--compound-mix: the object's words (colour, pattern, shape) become one vector made of their
    embeddings at one position, the picture unchanged; its row comes from the caption or from `*`s
    around it, and no other row changes."""
    import random
    from dataclasses import replace

    from transformers import CLIPTokenizer

    from alignit_core.models import EMBEDDED
    from alignit_core.toy.sampling import load_exported
    from scripts.train_embedded import STAR, TOKENIZER_DIR, Vocab, compound_rows, condition, sample_batch

    te = load_exported(EMBEDDED, torch.device("cpu"))[2].float()
    vocab = Vocab(CLIPTokenizer.from_pretrained(TOKENIZER_DIR))
    words = {v: k for k, v in vocab.ids.items()}
    batch = sample_batch(random.Random(3), vocab, 24, swap_mix=0.0, pattern_mix=0.5, compound_mix=1.0)
    assert len(batch.compound) > 12 and {c.dummy for c in batch.compound} == {True, False}
    for c in batch.compound:
        caption = [words[i] for i in batch.ids[c.sample, 1:batch.eos[c.sample]].tolist()]
        scene = batch.targets[c.sample]
        assert caption[c.pos - 1] == STAR and scene.shape not in caption and scene.colour not in caption[:c.pos]
        parts = [words[w] for w in c.words]
        assert scene.shape in parts and ("striped" in parts or "hole" in parts) == (scene.pattern != "plain")
        assert batch.word_class[c.sample, c.pos] == 1
        assert c.ids == (vocab.ids_of([STAR] * len(caption)) if c.dummy else batch.ids[c.sample].tolist())
    with torch.no_grad():
        folded, plain = condition(te, batch), condition(te, replace(batch, compound=[]))
        rows = compound_rows(te, batch.compound)
    changed = (folded - plain).abs().amax(-1) > 0
    assert changed.sum() == len(batch.compound)
    for c, row in zip(batch.compound, rows):
        assert changed[c.sample, c.pos] and torch.equal(folded[c.sample, c.pos], row)
    c = next(c for c in batch.compound if c.dummy)  # among `*`s: the same row whatever the caption around it
    other = replace(c, ids=vocab.ids_of([STAR] * (c.pos + 3)))
    with torch.no_grad():
        assert torch.allclose(compound_rows(te, [c]), compound_rows(te, [other]), atol=1e-5)


def test_absorbed_captions_leave_the_colour_to_the_shape_word_s_row_after_it():
    """--absorb-mix: Custom Diffusion's AlignIT case with a word for its modifier. The caption is p without the
    object's colour word (`a photo of a star on ...`), the shape word's row comes from `* * * red star` (the
    shape word where it stands in p), the picture shows the colour; a colour not just before the shape word
    (`a red striped circle`) is never absorbed, and share 0 draws exactly as before."""
    import random

    from transformers import CLIPTokenizer

    from alignit_core.toy.shapes import Scene
    from scripts.train_embedded import STAR, TOKENIZER_DIR, Vocab, absorb_colour, sample_batch

    star = Scene("orange", "star", "blue", 0.0, 0.0, 0.5)
    p, dummy, pos = absorb_colour("a photo of a orange star on a blue background".split(), star)
    assert p == "a photo of a star on a blue background".split() and dummy == [STAR] * 3 + ["orange", "star"]
    assert pos == 5 and dummy[pos - 1] == p[pos - 1] == "star"
    assert absorb_colour("a orange striped star".split(), star) is None
    assert absorb_colour("orange star".split(), star) is None  # no word before it for the colour to stand on
    vocab = Vocab(CLIPTokenizer.from_pretrained(TOKENIZER_DIR))
    words = {v: k for k, v in vocab.ids.items()}
    batch = sample_batch(random.Random(3), vocab, 48, swap_mix=0.0, pattern_mix=0.3, absorb_mix=1.0)
    absorbed = (batch.swap_pos >= 0).nonzero().squeeze(1).tolist()
    assert len(absorbed) > 12
    for b in absorbed:
        caption = [words[i] for i in batch.ids[b, 1:batch.eos[b]].tolist()]
        scene, pos = batch.targets[b], int(batch.swap_pos[b])
        source = [words[i] for i in batch.dummy[b, 1:].tolist() if i != vocab.eos]
        assert caption[pos - 1] == scene.shape and scene.colour not in caption[:pos]
        assert source == [STAR] * (pos - 2) + [scene.colour, scene.shape]
    kept = [b for b in range(48) if b not in absorbed and int(batch.eos[b]) > 1]
    assert any(batch.targets[b].pattern == "striped" for b in kept)
    before = sample_batch(random.Random(3), vocab, 48, swap_mix=0.5, pattern_mix=0.3)
    same = sample_batch(random.Random(3), vocab, 48, swap_mix=0.5, pattern_mix=0.3, absorb_mix=0.0)
    assert torch.equal(before.ids, same.ids) and torch.equal(before.dummy, same.dummy)


def test_compound_class_captions_are_alignit_s_p_with_the_vector_s_row_from_stars():
    """--compound-class: a folded object's caption holds its bare shape word where the vector's row
    goes (AlignIT's p: `a circle on a blue background`, every later row computed after it), that row
    computed among `*`s (AlignIT's p'), the picture the whole object; share 0 draws exactly as before."""
    import random

    from transformers import CLIPTokenizer

    from scripts.train_embedded import STAR, TOKENIZER_DIR, Vocab, sample_batch

    vocab = Vocab(CLIPTokenizer.from_pretrained(TOKENIZER_DIR))
    words = {v: k for k, v in vocab.ids.items()}
    batch = sample_batch(random.Random(3), vocab, 24, swap_mix=0.0, pattern_mix=0.5, compound_mix=1.0,
                         compound_class=1.0)
    assert len(batch.compound) > 12 and {c.dummy for c in batch.compound} == {True}
    for c in batch.compound:
        caption = [words[i] for i in batch.ids[c.sample, 1:batch.eos[c.sample]].tolist()]
        scene = batch.targets[c.sample]
        assert caption[c.pos - 1] == scene.shape and STAR not in caption
        assert scene.colour not in caption[:c.pos] and not {"striped", "hole"} & set(caption)
        assert c.ids == vocab.ids_of([STAR] * len(caption)) and batch.word_class[c.sample, c.pos] == 1
    patterned = [c for c in batch.compound if batch.targets[c.sample].pattern != "plain"]
    assert patterned and all({"striped", "hole"} & {words[w] for w in c.words} for c in patterned)
    before = sample_batch(random.Random(3), vocab, 24, swap_mix=0.0, pattern_mix=0.5, compound_mix=1.0)
    same = sample_batch(random.Random(3), vocab, 24, swap_mix=0.0, pattern_mix=0.5, compound_mix=1.0,
                        compound_class=0.0)
    assert torch.equal(before.ids, same.ids) and before.compound == same.compound


def test_compound_modifier_folds_stand_before_the_bare_shape_word_as_custom_diffusion_s_token():
    """--compound-modifier: AlignIT's folded objects in Custom Diffusion's form. The vector stands just before the
    shape word in `* * <vector> circle`, the row read is the shape word's, computed after it; the caption is p
    with the bare shape word; share 0 draws exactly as before."""
    import random

    from transformers import CLIPTokenizer

    from scripts.train_embedded import STAR, TOKENIZER_DIR, Vocab, sample_batch

    vocab = Vocab(CLIPTokenizer.from_pretrained(TOKENIZER_DIR))
    words = {v: k for k, v in vocab.ids.items()}
    args = dict(swap_mix=0.0, pattern_mix=0.5, compound_mix=1.0, compound_class=1.0)
    batch = sample_batch(random.Random(3), vocab, 24, **args, compound_modifier=1.0)
    assert len(batch.compound) > 12
    for c in batch.compound:
        caption = [words[i] for i in batch.ids[c.sample, 1:batch.eos[c.sample]].tolist()]
        shape = batch.targets[c.sample].shape
        assert caption[c.pos - 1] == shape and c.at == c.pos - 1
        assert c.ids == vocab.ids_of([STAR] * (c.pos - 1) + [shape] + [STAR] * (len(caption) - c.pos))
    half = sample_batch(random.Random(3), vocab, 24, **args, compound_modifier=0.5).compound
    assert {c.at for c in half} >= {None} and any(c.at is not None for c in half)
    before = sample_batch(random.Random(3), vocab, 24, **args)
    same = sample_batch(random.Random(3), vocab, 24, **args, compound_modifier=0.0)
    assert torch.equal(before.ids, same.ids) and before.compound == same.compound


def test_fold_noise_moves_folded_vectors_off_their_words_and_draws_nothing_else():
    """--fold-noise R: each folded vector moves off its words' mix by a random direction of up to R x
    its norm (a textual inversion's vector has cosine 0.1-0.4 with its words); the captions, the
    pictures and every other draw stay those of the default 0.3."""
    from dataclasses import replace

    from transformers import CLIPTokenizer

    from scripts.train_embedded import TOKENIZER_DIR, Vocab, compound_vector, sample_batch

    vocab = Vocab(CLIPTokenizer.from_pretrained(TOKENIZER_DIR))
    emb = torch.randn(max(vocab.ids.values()) + 1, 64, generator=torch.Generator().manual_seed(0))
    kw = dict(swap_mix=0.0, pattern_mix=0.5, compound_mix=1.0, compound_class=1.0)
    near = sample_batch(random.Random(5), vocab, 32, **kw)
    far = sample_batch(random.Random(5), vocab, 32, fold_noise=8.0, **kw)
    assert torch.equal(near.ids, far.ids) and near.targets == far.targets and len(far.compound) > 16
    cos = []
    for a, b in zip(near.compound, far.compound):
        assert replace(a, noise=0.0) == replace(b, noise=0.0) and b.noise == pytest.approx(a.noise * 8.0 / 0.3)
        words = compound_vector(emb, replace(a, noise=0.0))  # the words' mix alone
        vectors = [compound_vector(emb, c) for c in (a, b)]
        for c, v in zip((a, b), vectors):
            assert (v - words).norm() == pytest.approx(c.noise * words.norm().item(), rel=1e-4)
        cos.append([torch.cosine_similarity(v, words, 0).item() for v in vectors])
    near_cos, far_cos = zip(*cos)
    assert min(near_cos) > 0.95 and min(far_cos) < 0.4  # nearly its words; mostly off them


def test_fold_background_folds_another_backgrounds_words_into_alignits_case_and_draws_nothing_else():
    """--fold-background P: that share of AlignIT's folded objects (the caption holding the bare shape word,
    the row computed among `*`s) also folds in a background the caption does not ask for and the word
    `background`, as a textual inversion learns its references' background; captions, pictures and every
    other draw stay those without it."""
    from transformers import CLIPTokenizer

    from scripts.train_embedded import TOKENIZER_DIR, Vocab, sample_batch
    from alignit_core.toy.shapes import COLOURS

    vocab = Vocab(CLIPTokenizer.from_pretrained(TOKENIZER_DIR))
    word = {i: w for w, i in vocab.ids.items()}
    kw = dict(swap_mix=0.0, pattern_mix=0.5, compound_mix=1.0, compound_class=1.0)
    plain = sample_batch(random.Random(7), vocab, 64, **kw)
    mixed = sample_batch(random.Random(7), vocab, 64, fold_background=1.0, **kw)
    assert torch.equal(plain.ids, mixed.ids) and plain.targets == mixed.targets
    grown = 0
    for a, b in zip(plain.compound, mixed.compound):
        caption = [word[int(i)] for i in plain.ids[a.sample] if int(i) not in (vocab.bos, vocab.eos, vocab.pad)]
        if "background" not in caption:
            assert a == b
            continue
        grown += 1
        extra = [word[w] for w in b.words[len(a.words):]]
        assert b.words[:len(a.words)] == a.words and len(b.mix) == len(b.words) and extra[1] == "background"
        asked = caption[caption.index("background") - 1]
        assert extra[0] in COLOURS and extra[0] != asked and extra[0] not in [word[w] for w in a.words]
        assert a.pos == b.pos and a.ids == b.ids and a.seed == b.seed
    assert grown > 16


def test_a_concept_bank_inverts_objects_of_the_world_never_a_novel_one(tmp_path):
    """scripts/concept_bank.py: each entry is an object the world draws (never a NOVEL instance), on a
    background that is none of its colours and makes a training triple, inverted into one vector by textual
    inversion's objective; the vectors move off the shape word they start from."""
    from alignit_core import load_model
    from alignit_core.models import EMBEDDED
    from alignit_core.toy.instances import object_colours
    from scripts.concept_bank import bank_instances, main

    scenes = bank_instances(24, 0)
    assert len({(s.colour, s.shape) for s in scenes}) == 24 and {s.pattern for s in scenes} == {"plain", *PATTERNS}
    for s in scenes:
        assert (s.colour, s.shape, s.pattern) not in NOVEL
        assert (s.colour, s.shape, s.background) in training_triples() and s.background not in object_colours(s)
    assert bank_instances(24, 0) == scenes and bank_instances(24, 1) != scenes
    main(["--init", str(EMBEDDED), "--out", str(tmp_path / "bank.pt"), "--smoke"])
    bank = torch.load(tmp_path / "bank.pt", weights_only=False)
    model = load_model(str(EMBEDDED), device="cpu")
    emb = model.text_encoders[0].get_input_embeddings().weight
    tok = model.tokenizers[0]
    assert bank["scenes"] == bank_instances(3, 0) and bank["vectors"].shape == (3, emb.shape[1])
    for s, v in zip(bank["scenes"], bank["vectors"]):
        start = emb[tok.convert_tokens_to_ids(s.shape + "</w>")]
        assert not torch.allclose(v, start)


def _bank_world():
    """(vocab, id -> word, the embedded text encoder, its width): what the bank's tests build on."""
    from transformers import CLIPTokenizer

    from alignit_core.models import EMBEDDED
    from alignit_core.toy.sampling import load_exported
    from scripts.train_embedded import TOKENIZER_DIR, Vocab

    vocab = Vocab(CLIPTokenizer.from_pretrained(TOKENIZER_DIR))
    _, _, te, _ = load_exported(EMBEDDED, torch.device("cpu"))
    return vocab, {i: w for w, i in vocab.ids.items()}, te, te.get_input_embeddings().weight.shape[1]


def _two_entries(dim: int) -> dict:
    return dict(scenes=[Scene("green", "star", "red", pattern="holed"), Scene("white", "circle", "yellow")],
                vectors=2 * torch.randn(2, dim, generator=torch.Generator().manual_seed(1)))


def _encode_with(te, ids: list[int], at: int, vector: torch.Tensor) -> torch.Tensor:
    """The rows (77, dim) of `ids` encoded with `vector` in place of the token at `at`."""
    from alignit_core.encoding import encode

    t = torch.tensor([ids])
    mask = torch.zeros(t.shape, dtype=torch.bool)
    mask[0, at] = True
    return encode(te, t, vector.view(1, 1, -1).expand(1, t.shape[1], -1), mask).hidden[0]


def test_fold_bank_shows_a_bank_object_in_alignits_case_its_row_the_entrys_inversion():
    """--fold-bank with --bank-mix P: that share of captions is AlignIT's case (the bare shape word in the
    caption, the row computed among `*`s) with the row from a bank entry's vector, the picture that entry's
    object on the caption's background (another where that would be a held-out prompt or the object's own
    colour); with P = 0 every draw is that of a run without a bank."""
    from scripts.train_embedded import STAR, condition, sample_batch

    vocab, word, te, dim = _bank_world()
    scenes = [styled(Scene("blue", "square", "black"), pattern="striped"), Scene("green", "star", "red", pattern="holed"),
              Scene("white", "circle", "yellow")]
    bank = dict(scenes=scenes, vectors=torch.randn(3, dim, generator=torch.Generator().manual_seed(0)))
    kw = dict(swap_mix=0.3, pattern_mix=0.3, pure_mix=0.3, eot_mix=1.0, compound_mix=0.5, compound_class=1.0)
    none = sample_batch(random.Random(3), vocab, 32, **kw)
    idle = sample_batch(random.Random(3), vocab, 32, bank=bank, bank_mix=0.0, bank_seed=5, **kw)
    assert torch.equal(none.ids, idle.ids) and none.targets == idle.targets
    batch = sample_batch(random.Random(3), vocab, 48, bank=bank, bank_mix=1.0, bank_seed=5, **kw)
    assert len(batch.compound) == 48 and torch.all(batch.swap_pos == -1) and len(batch.pure_ids) == 0
    entries = []
    for c in batch.compound:
        shown = batch.targets[c.sample]
        k = next(i for i, v in enumerate(bank["vectors"]) if torch.equal(c.vector, v))
        entries.append(k)
        assert (shown.colour, shown.shape, shown.pattern) == (scenes[k].colour, scenes[k].shape, scenes[k].pattern)
        assert (shown.colour, shown.shape, shown.background) not in HELD_OUT and shown.background != shown.colour
        caption = [word[int(i)] for i in batch.ids[c.sample] if int(i) not in (vocab.bos, vocab.eos, vocab.pad)]
        assert caption[c.pos - 1] == shown.shape and shown.colour not in caption[:c.pos]
        if "background" in caption:
            assert caption[caption.index("background") - 1] == shown.background
        assert {word[i] for i in c.ids if i not in (vocab.bos, vocab.eos, vocab.pad)} == {STAR}
    assert set(entries) == {0, 1, 2}
    cond = condition(te, batch)
    c = batch.compound[0]
    own = _encode_with(te, c.ids, c.pos, c.vector)[c.pos]
    assert torch.allclose(cond[c.sample, c.pos], own, atol=1e-5)


def test_bank_context_is_the_customized_models_case_the_vector_in_the_caption_every_later_row_after_it():
    """--bank-context Q: that share of the bank's captions hold the entry's vector in the caption itself
    (`a <vector> on a blue background`), and the conditioning's rows from the vector to the end token are
    those of the caption encoded with the vector in place; the rows before it stay the caption's."""
    from alignit_core.encoding import encode
    from scripts.train_embedded import STAR, condition, sample_batch

    vocab, word, te, dim = _bank_world()
    bank = _two_entries(dim)
    kw = dict(swap_mix=0.3, pattern_mix=0.3, pure_mix=0.3, eot_mix=0.0, bank=bank, bank_mix=1.0, bank_seed=2)
    half = sample_batch(random.Random(4), vocab, 64, bank_context=0.5, **kw)
    assert 16 < sum(c.whole for c in half.compound) < 48
    batch = sample_batch(random.Random(4), vocab, 32, bank_context=1.0, **kw)
    assert len(batch.compound) == 32 and all(c.whole and not c.dummy for c in batch.compound)
    later = 0
    cond, plain = condition(te, batch), encode(te, batch.ids).hidden
    for c in batch.compound:
        assert c.ids == batch.ids[c.sample].tolist() and word[c.ids[c.pos]] == STAR
        own = _encode_with(te, c.ids, c.pos, c.vector)
        end = int(batch.eos[c.sample])
        assert torch.allclose(cond[c.sample, c.pos:end], own[c.pos:end], atol=1e-5)
        if end > c.pos + 1:  # words after the vector (`on a blue background`) read it
            later += 1
            assert not torch.allclose(own[c.pos + 1:end], plain[c.sample, c.pos + 1:end], atol=1e-3)
        assert torch.equal(cond[c.sample, :c.pos], plain[c.sample, :c.pos])
    assert later >= 4


def test_bank_modifier_is_custom_diffusions_case_the_class_words_row_after_the_vector():
    """--bank-modifier Q: that share of AlignIT's bank cases take the class word's row as Custom Diffusion's
    concept gives it (`* * <vector> star`, the vector before the bare shape word among `*`s), not the
    vector's own row; the customized case stays as it was, and with Q = 0 no case takes that form."""
    from scripts.train_embedded import STAR, condition, sample_batch

    vocab, word, te, dim = _bank_world()
    kw = dict(swap_mix=0.3, pattern_mix=0.3, pure_mix=0.3, eot_mix=0.0, bank=_two_entries(dim), bank_mix=1.0,
              bank_seed=2)
    plain = sample_batch(random.Random(4), vocab, 32, bank_context=0.5, **kw)
    assert plain.compound and all(c.at is None for c in plain.compound)
    half = sample_batch(random.Random(4), vocab, 64, bank_modifier=0.5, **kw)
    assert 16 < sum(c.at is not None for c in half.compound) < 48
    mixed = sample_batch(random.Random(4), vocab, 32, bank_context=0.5, bank_modifier=1.0, **kw)
    assert all((c.at is None) == c.whole for c in mixed.compound)
    batch = sample_batch(random.Random(4), vocab, 32, bank_modifier=1.0, **kw)
    cond, held = condition(te, batch), 0
    for c in batch.compound:
        caption = [word.get(int(i)) for i in batch.ids[c.sample]]
        assert c.at == c.pos - 1 and c.dummy and caption[c.pos] in SHAPES
        assert [word[i] for i in c.ids[1:int(batch.eos[c.sample])]] == [
            caption[c.pos] if i == c.pos else STAR for i in range(1, int(batch.eos[c.sample]))]
        row = _encode_with(te, c.ids, c.at, c.vector)[c.pos]
        assert torch.allclose(cond[c.sample, c.pos], row, atol=1e-5)
        alone = _encode_with(te, c.ids, c.pos, c.vector)[c.pos]  # the textual inversion's case
        held += not torch.allclose(row, alone, atol=1e-3)
    assert held == len(batch.compound)


def test_training_script_reads_steps_per_concept_kind():
    import argparse

    from scripts.train_embedded import concept_steps

    assert concept_steps("300") == {"ti": 300, "cd": 300, "te": 300}
    assert concept_steps("ti=1200,te=800") == {"ti": 1200, "cd": 400, "te": 800}
    with pytest.raises(argparse.ArgumentTypeError, match="unknown concept kind 'lora'"):
        concept_steps("lora=5")


def test_object_mask_is_the_silhouette_with_its_hole_filled():
    from alignit_core.toy.shapes import object_mask

    plain, holed = to_uint8(render([Scene("orange", "star", "purple"), Scene("orange", "star", "purple", pattern="holed")]))
    mask = object_mask(plain)
    assert 0.05 < mask.mean() < 0.5 and not mask[0].any()  # the object, not the border
    assert mask[64, 64]  # the star's centre
    held = object_mask(holed)
    assert held[64, 64] and classify(holed).hole  # the hole shows the background, the mask covers it
    assert abs(int(held.sum()) - int(mask.sum())) < 0.05 * mask.sum()
    assert not object_mask(np.zeros((128, 128, 3), np.uint8) + np.array([40, 70, 220], np.uint8)).any()


def test_word_map_iou_scores_a_map_on_its_mask_high_and_a_map_elsewhere_or_everywhere_low():
    from alignit_core.toy.evaluate import word_map_iou

    mask = np.zeros((128, 128), bool)
    mask[32:96, 32:96] = True
    on = np.zeros((16, 16), np.float32)
    on[4:12, 4:12] = 1.0
    assert word_map_iou(on, mask) > 0.9
    assert word_map_iou(1 - on, mask) < 0.05  # only the upsampled edge touches it
    everywhere = np.random.default_rng(0).uniform(0.9, 1.0, (16, 16)).astype(np.float32)  # hot everywhere, noisy
    assert word_map_iou(everywhere, mask) < 0.4


def test_table1_intervals_are_paired_over_seeds_and_the_example_is_where_alignit_gains():
    from alignit_core.toy.evaluate import Table1

    rng = np.random.default_rng(1)
    base = rng.random((10, 3)) < 0.5  # seeds x prompts, noisy per seed
    text = {"customized": base & np.array([True, True, False]), "alignit": base | np.array([False, False, True])}
    fid = {"customized": np.ones((10, 3), bool), "alignit": np.ones((10, 3), bool)}
    t = Table1(text, fid, ("a", "b", "c"))
    gain = t.text_gain
    assert gain.mean == pytest.approx(text["alignit"].mean() - text["customized"].mean())
    assert gain.low <= gain.mean <= gain.high
    assert t.fidelity_ratio.mean == 1.0 and t.fidelity_ratio.low == t.fidelity_ratio.high == 1.0  # paired: no spread
    assert t.best_example()[0] == "c"  # the prompt where only AlignIT draws the background
    # the seed the demo runs it on: the first where AlignIT draws it all and the customized baseline does not
    assert t.example_seed("c") == 0
    # the seed the demo opens the example on: AlignIT draws it all where the baseline draws the concept on
    # another background (seed 3) before one where the baseline misses both (2) or only the concept (1)
    seeds = {"text": {"customized": [True, True, False, False], "alignit": [True, True, True, True]},
             "fidelity": {"customized": [True, False, False, True], "alignit": [True, True, True, True]}}
    def example_seed():
        arrays = ({m: np.array(v)[:, None] for m, v in seeds[k].items()} for k in ("text", "fidelity"))
        return Table1(*arrays, ("d",)).example_seed("d")

    assert example_seed() == 3
    seeds["fidelity"]["customized"][3] = False
    assert example_seed() == 2
    seeds["text"]["customized"][2:] = [True, True]
    assert example_seed() == 1
    # where the baseline draws it whenever AlignIT does: the first seed AlignIT draws it; where AlignIT never does, none
    assert base[:, 0].any() and t.example_seed("a") == int(np.argmax(base[:, 0]))
    assert Table1(text, {**fid, "alignit": np.zeros((10, 3), bool)}, ("a", "b", "c")).example_seed("c") is None
    assert t.n == 30
    rates = dict(t.by_prompt())
    assert list(rates) == ["a", "b", "c"]
    assert rates["c"]["customized"] == (0.0, 1.0)  # this prompt's column, over the seeds
    assert rates["c"]["alignit"] == (1.0, 1.0) and rates["a"]["alignit"] == (pytest.approx(base[:, 0].mean()), 1.0)


def test_table1_refuses_rows_it_does_not_know_before_drawing_anything():
    from alignit_core.toy.evaluate import table1

    with pytest.raises(ValueError, match="class, concept"):
        table1(None, None, None, range(1), rows="end")


def test_instance_words_are_the_world_caption_of_the_instance_without_its_background():
    from alignit_core.toy.evaluate import Table1, instance_words
    from alignit_core.toy.instances import INSTANCES
    from alignit_core.toy.shapes import styled

    assert instance_words(INSTANCES["holed-star"]["scene"]) == "orange star with a hole"
    assert instance_words(INSTANCES["striped-ball"]["scene"]) == "red striped circle"
    for inst in INSTANCES.values():
        scene = styled(inst["scene"], background="green")
        assert scene.caption() == f"a {instance_words(inst['scene'])} on a green background"
    ones, half = np.ones((4, 2), bool), np.array([[True, False]] * 4)
    t = Table1({m: ones for m in ("customized", "alignit")}, {"customized": ones, "alignit": half})
    assert t.fidelity_ratio.mean == 0.5
    t = t.with_method("words", ones, half)
    assert t.fidelity_ratio_to("words").mean == 1.0 and t.fidelity_ratio.mean == 0.5
    with pytest.raises(ValueError, match="seeds, prompts"):
        t.with_method("words", ones[:3], ones[:3])


def test_row_noise_moves_only_word_rows_of_the_captions_picked_and_by_at_most_its_share_of_their_norm():
    from scripts.train_embedded import noisy_rows

    g = torch.Generator().manual_seed(0)
    cond, eos = torch.randn(64, 77, 16), torch.randint(2, 20, (64,))
    moved = noisy_rows(cond, eos, 0.5, 0.3, g)
    shift = (moved - cond).norm(dim=-1) / cond.norm(dim=-1)
    pos = torch.arange(77).view(1, -1)
    words = (pos >= 1) & (pos < eos.view(-1, 1))
    assert torch.all(shift[~words] == 0)  # start token, end token and padding untouched
    picked = shift.amax(dim=1) > 0
    assert 16 <= picked.sum() <= 48  # about half the captions
    assert torch.all(shift[picked.view(-1, 1) & words] > 0) and shift.max() <= 0.3 + 1e-5
    assert shift[picked.view(-1, 1) & words].max() > 0.2  # sizes spread up to the scale
    assert torch.equal(noisy_rows(cond, eos, 0.0, 0.3, g), cond)


def test_end_noise_moves_the_end_rows_of_the_captions_picked_together_and_nothing_else():
    from scripts.train_embedded import noisy_end_rows

    g = torch.Generator().manual_seed(0)
    cond, eos = torch.randn(64, 77, 16), torch.randint(2, 20, (64,))
    eos[:4] = 1  # captions dropped for guidance: never moved
    moved = noisy_end_rows(cond, eos, 0.5, 1.0, g)
    delta = moved - cond
    pos = torch.arange(77).view(1, -1)
    end = pos >= eos.view(-1, 1)
    assert torch.all(delta[~end] == 0)  # start token and words untouched
    picked = delta.norm(dim=-1).amax(dim=1) > 0
    assert not picked[:4].any() and 16 <= picked.sum() <= 48  # about half the captions
    for b in picked.nonzero().flatten().tolist():  # one direction and one size for all of a caption's end rows
        rows = delta[b, int(eos[b]):]
        assert torch.allclose(rows, rows[:1].expand_as(rows), atol=1e-6)
        assert rows[0].norm() <= cond[b].norm(dim=-1).mean() + 1e-5
    sizes = torch.stack([delta[b, -1].norm() / cond[b].norm(dim=-1).mean() for b in picked.nonzero().flatten()])
    assert sizes.max() > 0.7  # sizes spread up to the scale
    assert torch.equal(noisy_end_rows(cond, eos, 0.0, 1.0, g), cond)


def test_prefix_noise_moves_the_start_and_nothing_drawing_rows_together_and_leaves_the_drawing_words():
    from scripts.train_embedded import noisy_prefix_rows

    g = torch.Generator().manual_seed(0)
    cond, eos = torch.randn(64, 77, 16), torch.full((64,), 8)  # `a red circle on a blue background`
    eos[:4] = 1  # captions dropped for guidance: never moved
    word_class = torch.zeros(64, 77, dtype=torch.long)
    word_class[:, [2, 3]], word_class[:, [6, 7]] = 1, 2  # red circle: the object; blue background
    delta = noisy_prefix_rows(cond, eos, word_class, 0.5, 1.0, g) - cond
    prefix = torch.zeros(77, dtype=torch.bool)
    prefix[[0, 1, 4, 5]] = True  # start, `a`, `on`, `a`
    assert torch.all(delta[:, ~prefix] == 0)  # the drawing words, the end token and the padding untouched
    picked = delta.norm(dim=-1).amax(dim=1) > 0
    assert not picked[:4].any() and 16 <= picked.sum() <= 48  # about half the captions
    for b in picked.nonzero().flatten().tolist():  # one direction and one size for all of a caption's moved rows
        rows = delta[b, prefix]
        assert torch.allclose(rows, rows[:1].expand_as(rows), atol=1e-6)
        assert rows[0].norm() <= cond[b].norm(dim=-1).mean() + 1e-5
    assert torch.equal(noisy_prefix_rows(cond, eos, word_class, 0.0, 1.0, g), cond)


def test_neutral_star_tunes_only_the_star_so_rows_after_stars_read_as_after_phrasings():
    """--neutral-star: the `*` token's embedding alone is tuned so that a token's row after `* * * *`
    lies where it lies after textual inversion's phrasings; the drift falls on held-out samples, and
    every other embedding (and so every prompt without `*`) stays as it was."""
    from transformers import CLIPTokenizer

    from alignit_core.encoding import encode, token_embeddings
    from alignit_core.models import EMBEDDED
    from alignit_core.toy.sampling import load_exported
    from scripts.train_embedded import STAR, TOKENIZER_DIR, Vocab, neutral_star, star_drift

    te = load_exported(EMBEDDED, torch.device("cpu"))[2].float().requires_grad_(False)
    vocab = Vocab(CLIPTokenizer.from_pretrained(TOKENIZER_DIR))
    emb = token_embeddings(te).weight
    before = emb.detach().clone()
    ids = torch.tensor([vocab.ids_of(["a", "red", "circle", "on", "a", "blue", "background"])])
    plain = encode(te, ids).hidden
    shipped = star_drift(te, vocab, emb[vocab.ids[STAR]].detach(), random.Random(1), 256).mean().item()
    tuned = neutral_star(te, vocab, steps=60, seed=0)
    assert tuned < 0.8 * shipped  # the shipped model: 0.39 -> 0.21 after 400 steps (same samples)
    changed = (emb.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [vocab.ids[STAR]]
    assert torch.equal(encode(te, ids).hidden, plain)


def test_custom_diffusions_start_of_text_rows_pass_forward_but_carry_no_gradient():
    """`--cd-detach-start` trains Custom Diffusion as its authors' code does: the start token's keys and
    values reach the picture unchanged, and no gradient reaches the projections through them. With
    every row but the start token's zero (the projections have no bias), the projections' whole
    gradient comes through that row: none with the hooks, some without; the output is the same."""
    from diffusers import UNet2DConditionModel

    from scripts.train_embedded import ROOT, detach_start_rows

    unet = UNet2DConditionModel.from_pretrained(ROOT / "assets" / "embedded-shapes" / "unet")
    kv = {n: p for n, p in unet.named_parameters() if "attn2.to_k" in n or "attn2.to_v" in n}
    assert kv and all(n.endswith("weight") for n in kv)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 16, 16, generator=g)
    rows = torch.zeros(1, 77, unet.config.cross_attention_dim)
    rows[:, 0] = torch.randn(unet.config.cross_attention_dim, generator=g)

    def run():
        unet.zero_grad(set_to_none=True)
        out = unet(z, 500, rows).sample
        (out ** 2).sum().backward()
        return out.detach(), {n: p.grad for n, p in kv.items()}

    plain, plain_grads = run()
    handles = detach_start_rows(unet)
    assert len(handles) == len(kv)
    detached, grads = run()
    assert torch.equal(plain, detached)
    assert all(plain_grads[n] is not None and plain_grads[n].abs().sum() > 0 for n in kv)
    assert all(grads[n] is None or not grads[n].any() for n in kv)
    for h in handles:
        h.remove()
