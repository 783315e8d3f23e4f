"""The shipped embedded model: offline loading, prompt following and K/V swap semantics,
judged by the shapes world's deterministic pixel classifier.

The thresholds are the project's targets (README, "The embedded model"): each attribute of the
held-out prompts drawn as asked in >= 90 % of samples; a colour swap draws the source colour in
>= 90 % while the shape stays (>= 90 %) and the background (>= 85 %: model v24n keeps it in 91 %, v24c
in 94 %, v4 in 86 %); a shape swap draws the source shape in >= 80 %. Below them: the concepts, the cross-attention maps and
the toy Table 1, at floors a little under README's figures.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from alignit_core import Settings, generate_swap, tokenize
from alignit_core.models import EMBEDDED
from alignit_core.toy.evaluate import (asked_in_words, held_out_quality, localisation, patterned_quality, reproduction,
                                      reproduction_hits, swap_semantics, table1, table1_prompts)
from alignit_core.toy.shapes import Scene, classify, styled

COLOUR_SWAPS = [(("red", "circle", "blue"), "red", "yellow"), (("green", "square", "white"), "green", "purple"),
                (("blue", "triangle", "orange"), "blue", "white"), (("yellow", "star", "black"), "yellow", "red"),
                (("white", "circle", "green"), "white", "orange"), (("purple", "triangle", "yellow"), "purple", "black"),
                (("orange", "square", "purple"), "orange", "green"), (("black", "star", "white"), "black", "blue")]
SHAPE_SWAPS = [(("red", "circle", "blue"), "circle", "square"), (("green", "square", "white"), "square", "star"),
               (("blue", "triangle", "orange"), "triangle", "circle"), (("yellow", "star", "black"), "star", "triangle"),
               (("white", "circle", "green"), "circle", "triangle"), (("purple", "triangle", "yellow"), "triangle", "square"),
               (("orange", "square", "purple"), "square", "circle"), (("black", "star", "white"), "star", "square")]


def test_shipped_model_is_stable_diffusion_shaped_and_small(embedded):
    assert tokenize(embedded.tokenizer, "a photo of a cat").ids == (49406, 320, 1125, 539, 320, 2368, 49407)
    assert len(embedded.tokenizer) == 49408
    assert embedded.vae_scale == 8 and embedded.unet.config.in_channels == 4
    assert embedded.native_size == 128
    assert set(embedded.attention_resolutions(128)) >= {8, 16}
    weights = sum(p.stat().st_size for p in EMBEDDED.rglob("*.safetensors"))
    assert weights <= 25 * 2**20


def test_embedded_generation_is_deterministic(embedded):
    a = generate_swap(embedded, "a red circle on a blue background", [("red", "yellow")], Settings(seed=3, steps=6))
    b = generate_swap(embedded, "a red circle on a blue background", [("red", "yellow")], Settings(seed=3, steps=6))
    assert np.array_equal(np.asarray(a.images["swapped"]), np.asarray(b.images["swapped"]))


@pytest.mark.slow
def test_held_out_prompts_are_drawn_as_asked(embedded):
    rates = held_out_quality(embedded, range(4))  # 64 samples
    print(f"held-out: {rates}")
    assert rates.colour >= 0.9 and rates.shape >= 0.9 and rates.background >= 0.9


@pytest.mark.slow
def test_colour_swap_draws_the_source_colour(embedded):
    swapped, baseline = swap_semantics(embedded, COLOUR_SWAPS, range(8))  # 64 samples
    print(f"colour swap: swapped {swapped}, baseline {baseline}")
    assert min(baseline.colour, baseline.shape, baseline.background) >= 0.9
    assert swapped.colour >= 0.9  # the drawn colour is the source colour
    # and the rest stays: the shape always; the background in 91 % on model v24n (README; v24c 94 %, v4 86 %: two of
    # the eight cases, yellow -> red and white -> orange, often turned the background green / blue)
    assert swapped.shape >= 0.9 and swapped.background >= 0.85


@pytest.mark.slow
def test_shape_swap_draws_the_source_shape(embedded):
    swapped, baseline = swap_semantics(embedded, SHAPE_SWAPS, range(4))  # 32 samples
    print(f"shape swap: swapped {swapped}, baseline {baseline}")
    assert min(baseline.colour, baseline.shape, baseline.background) >= 0.9
    assert swapped.shape >= 0.8  # the drawn shape is the source shape
    assert swapped.colour >= 0.9 and swapped.background >= 0.9


def test_a_single_colour_swap_changes_what_is_drawn(embedded):
    gen = generate_swap(embedded, "a red circle on a blue background", [("red", "yellow")], Settings(seed=1))
    base, swap = (classify(np.asarray(gen.images[k])) for k in ("baseline", "swapped"))
    assert (base.colour, base.shape, base.background) == ("red", "circle", "blue")
    assert (swap.colour, swap.shape, swap.background) == ("yellow", "circle", "blue")


@pytest.mark.slow
def test_the_base_world_draws_patterns_it_is_asked_for(embedded):
    """Stripes and holes on shapes and colours other than the concepts' instances."""
    scenes = [styled(Scene(c, s, b), pattern=p) for c, s, b, p in
              [("blue", "square", "yellow", "striped"), ("green", "triangle", "black", "holed"),
               ("yellow", "star", "red", "striped"), ("purple", "circle", "white", "holed")]]
    rate = patterned_quality(embedded, scenes, range(4))  # 16 samples
    print(f"patterned prompts drawn with their pattern: {rate:.2f}")
    assert rate >= 0.6


CONCEPTS = [f"{instance}-{kind}" for instance in ("striped-ball", "holed-star") for kind in ("ti", "cd", "te")]

# Floors a little under README's figures (model v24n; those are measured over more seeds and prompts).
# `a photo of a <token>`: how often the customized model draws the instance.
CUSTOMIZED_FLOOR = 0.2  # README: 0.25-1.00 (the striped ball's textual inversion 4 / 16)
# Target (1): among the seeds where the customized prompt draws the instance, AlignIT (the token's row from
# `* * * * <token>`) draws it too. README, through the engine over seeds 0-15: textual inversions 17 / 18, the
# last-layer text-encoder fine-tunes 13 / 18 (`concept_rows.py` over 32 seeds: 72 % and 88 %). Pooled per kind,
# as (1) counts; one concept's share over a few seeds swings (the striped ball's fine-tune: 4 / 8 here, 15 / 20
# in `concept_rows.py`). Custom Diffusion keeps its colour in every row (README) and is not held to it.
KEPT_FLOOR = {"ti": 0.6, "te": 0.6}
IOU_FLOOR = 0.7  # README: object words 0.80, pattern 0.78, background 0.92; a map hot everywhere ~0.2


def _concept(embedded, name):
    from alignit_core import load_concept
    from alignit_core.toy.instances import INSTANCES

    concept = load_concept(Path("assets/concepts") / name, embedded)
    return concept, INSTANCES[concept.token.strip("<>")]["scene"]


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in CONCEPTS if n.endswith("-cd")])
def test_each_custom_diffusion_concept_reproduces_its_instance(embedded, name):
    """The concept loads through the engine's loaders and `a photo of a <token>` draws the novel
    instance (a circle striped red and white / an orange star with a hole, `evaluate.fidelity`),
    where the base model on `a photo of a <class word>` draws it in no seed (the world never drew
    these instances). README gives each concept's rates over more seeds."""
    concept, instance = _concept(embedded, name)
    rates = reproduction(embedded, concept, instance, range(8))
    print(f"{name}: {rates}")
    assert rates["customized"] >= CUSTOMIZED_FLOOR
    assert rates["base"] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ti", "te"])
def test_alignit_keeps_each_text_side_concept_in_its_tokens_row(embedded, kind):
    """Target (1) for textual inversion and the text-encoder fine-tunes: each concept draws its instance on
    `a photo of a <token>` where the base model on the class word never does, and AlignIT, whose only
    customized row is the token's from `* * * * <token>`, draws it in most of the seeds where the customized
    prompt does, pooled over both instances (16 seeds each)."""
    kept = []
    for name in (f"striped-ball-{kind}", f"holed-star-{kind}"):
        concept, instance = _concept(embedded, name)
        hits = reproduction_hits(embedded, concept, instance, range(16))
        rates = {row: float(np.mean(v)) for row, v in hits.items()}
        mine = [a for c, a in zip(hits["customized"], hits["alignit"]) if c]  # AlignIT where the customized draws it
        print(f"{name}: {rates}, kept {sum(mine)} / {len(mine)}")
        assert rates["customized"] >= CUSTOMIZED_FLOOR and rates["base"] == 0.0, name
        kept += mine
    assert np.mean(kept) >= KEPT_FLOOR[kind], f"{sum(kept)} / {len(kept)}"


@pytest.mark.slow
def test_each_words_cross_attention_lands_on_what_it_drew(embedded):
    """DAAM-style: a word's map (mean over heads and the 16x16 layers, summed over steps, scaled
    min -> max, cut at 0.4) overlaps its object's silhouette for colour, shape and pattern words,
    and the rest of the picture for the background's colour and the word `background`; 32 maps per
    class on held-out prompts (20 for patterns). A map hot everywhere scores about 0.2 on object words."""
    result = localisation(embedded, range(2))
    print(f"localisation: {result}")
    for word_class, (iou, n) in result.items():
        assert n >= 20 and iou >= IOU_FLOOR, word_class


@pytest.mark.slow
def test_the_base_model_asked_in_words_draws_each_instance_on_table1s_backgrounds(embedded):
    """`table1.py --words`' reference row at two seeds (README, ten: text 0.95 / 0.99, fidelity 0.80 /
    0.81; here 0.92 / 1.00, 0.67 / 0.80): the instance's words in place of the token draw it on most
    asked backgrounds, where the class word never draws it."""
    for name in ("holed-star-ti", "striped-ball-ti"):
        concept, instance = _concept(embedded, name)
        text, fid = asked_in_words(embedded, concept, instance, range(2))
        print(f"{name}: asked in words, text {text.mean():.2f}, fidelity {fid.mean():.2f}")
        assert text.shape == fid.shape == (2, len(table1_prompts(concept, instance)))
        assert text.mean() >= 0.75 and fid.mean() >= 0.55, name


@pytest.mark.slow
def test_table1_alignit_follows_the_prompt_where_the_customized_model_does_not(embedded):
    """The toy Table 1 at two seeds (README: ten), against target (4). Target (2): at least half of the customized
    baselines ignore the asked background (README: three of six at 0.51-0.70; here 0.54-0.70, the other three
    0.86-0.95). AlignIT draws it at least +0.10 more often wherever the baseline draws it in 0.80 or less (README:
    +0.24 to +0.48; here +0.30 to +0.46), 0.85 or more on average (README 0.96; here 0.99). Both textual inversions
    and the striped ball's fine-tune keep most of their fidelity (README: ratios 0.89, 0.90 and 1.04; here 0.87, 0.86
    and 1.00; the holed star's fine-tune 0.79 there, its baseline here too rare for a ratio, 0.33). What AlignIT does
    not keep (Custom Diffusion's colour) is README's too, and so is which part of it (the colour, not the shape)."""
    results = {}
    for name in CONCEPTS:
        concept, instance = _concept(embedded, name)
        results[name] = t = table1(embedded, concept, instance, range(2))
        print(f"{name}: text {t.text['customized'].mean():.2f} -> {t.text['alignit'].mean():.2f}, "
              f"fidelity {t.fidelity['customized'].mean():.2f} -> {t.fidelity['alignit'].mean():.2f}")
    text = {n: (t.text["customized"].mean(), t.text["alignit"].mean()) for n, t in results.items()}
    fid = {n: (t.fidelity["customized"].mean(), t.fidelity["alignit"].mean()) for n, t in results.items()}
    assert sum(before <= 0.75 for before, _ in text.values()) >= 3
    for name in CONCEPTS:
        before, after = text[name]
        if before <= 0.8:
            assert after >= before + 0.1, name
        assert fid[name][0] >= 0.25, name  # the customized model draws its instance
    assert np.mean([after for _, after in text.values()]) >= 0.85
    for name, ratio in (("holed-star-ti", 0.7), ("striped-ball-ti", 0.7), ("striped-ball-te", 0.6)):
        assert fid[name][0] >= 0.4 and fid[name][1] >= ratio * fid[name][0], name
    # What AlignIT drops (table1.py --parts): never the shape (README: 0.94-1.00 of the samples), and of Custom
    # Diffusion's striped ball the red before the stripes (README: red 0.25, stripes 0.91; the red is in the
    # other rows' keys and values, which AlignIT takes from the base model).
    for name, t in results.items():
        assert t.parts["alignit"]["shape"].mean() >= 0.8, name
    ball = results["striped-ball-cd"].parts["alignit"]
    print(f"striped-ball-cd under AlignIT: red {ball['colour'].mean():.2f}, stripes {ball['pattern'].mean():.2f}")
    assert ball["colour"].mean() <= 0.5 and ball["pattern"].mean() >= ball["colour"].mean() + 0.3  # here 0.35, 0.95


def test_each_offered_example_shows_on_its_seed_the_failure_alignit_fixes(embedded):
    """The demo runs each AlignIT example on its manifest's `example_seed` (`table1.py --write-examples`), the
    first of Table 1's seeds where the customized model draws the concept on another background and AlignIT
    draws it on the asked one (`Table1.example_seed`; where no seed has both, the first where AlignIT draws it all
    and the customized model misses part of it): run as the demo runs it (heat maps recorded), each offered example
    shows that, and all but the striped ball's fine-tune (README: its customized model draws the ball on another
    background in no seed where AlignIT draws it all) show the baseline ignoring the asked background."""
    from alignit_core import generate_concept
    from alignit_core.toy.evaluate import fidelity
    from alignit_core.views import example_works

    offered, ignored = [], []
    for name in CONCEPTS:
        concept, instance = _concept(embedded, name)
        if not example_works(concept):
            continue
        offered.append(name)
        asked = dict(table1_prompts(concept, instance))[concept.example_prompt]
        gen = generate_concept(embedded, concept.example_prompt, concept, Settings(seed=concept.example_seed))
        customized, alignit = (classify(np.asarray(gen.images[m])) for m in ("customized", "alignit"))
        assert fidelity(alignit, instance) and alignit.background == asked, (name, alignit)
        assert not (fidelity(customized, instance) and customized.background == asked), (name, customized)
        if fidelity(customized, instance) and customized.background != asked:
            ignored.append(name)
    # five offered (README): all but the striped ball's Custom Diffusion; four show the baseline ignoring the prompt
    assert len(offered) == 5 and "striped-ball-cd" not in offered, offered
    assert sorted(ignored) == ["holed-star-cd", "holed-star-te", "holed-star-ti", "striped-ball-ti"], ignored


def test_alignit_on_every_row_of_custom_diffusion_writes_the_modifier_row_and_changes_only_alignit(embedded):
    """`table1(rows="concept")` (scripts/table1.py --rows concept) has AlignIT take Custom Diffusion's
    modifier row too: the one before the class word, which the paper's AlignIT leaves as p's."""
    from alignit_core import generate_concept

    concept, _ = _concept(embedded, "holed-star-cd")
    prompt = "a photo of a <holed-star> on a green background"
    plan = embedded.family.concept_plan(prompt, concept.words).plan
    assert plan.positions == (5,) and plan.unstarred() == (4, 5)
    settings = Settings(seed=3, steps=4, record_maps=False)
    paper = generate_concept(embedded, prompt, concept, settings)
    every = generate_concept(embedded, prompt, concept, settings, positions=list(plan.unstarred()))
    assert every.swapped["alignit"] == (4, 5) and paper.swapped["alignit"] == (5,)
    assert np.array_equal(np.asarray(every.images["customized"]), np.asarray(paper.images["customized"]))
    gap = np.abs(np.asarray(every.images["alignit"], float) - np.asarray(paper.images["alignit"], float))
    assert gap.mean() > 1.0


def test_alignit_from_custom_diffusions_token_alone_reads_the_token_at_the_class_words_position(embedded):
    """`table1(rows="token")`: p' holds Custom Diffusion's token alone at the class word's position (no class word
    after it); the class word's row comes from there, the customized baseline is the concept's own."""
    from dataclasses import replace

    from alignit_core import generate_concept

    concept, _ = _concept(embedded, "holed-star-cd")
    prompt = "a photo of a <holed-star> on a green background"
    alone = replace(concept, phrase="{token}")
    plan = embedded.family.concept_plan(prompt, alone.words).plan
    assert plan.positions == (5,) and plan.source.text == "* * * * <holed-star> * * * *"
    settings = Settings(seed=3, steps=4, record_maps=False)
    paper = generate_concept(embedded, prompt, concept, settings)
    token = generate_concept(embedded, prompt, alone, settings, include_customized=False)
    assert token.swapped["alignit"] == paper.swapped["alignit"] == (5,) and "customized" not in token.images
    gap = np.abs(np.asarray(token.images["alignit"], float) - np.asarray(paper.images["alignit"], float))
    assert gap.mean() > 1.0


def test_table1_from_the_token_alone_draws_two_images_a_sample_the_alignit_one_from_the_token_alone(embedded,
                                                                                                    monkeypatch):
    """`table1(rows="token")` draws the customized baseline and AlignIT in one batch: no discarded AlignIT image
    of the class word's rows (1.5 times the work). Its baseline is the paper's Table 1's; its AlignIT, p' with the
    token alone (within 1/255 of generate_concept's, which draws it in a batch of its own)."""
    import alignit_core.toy.evaluate as evaluate
    from dataclasses import replace

    from alignit_core import generate_concept

    concept, instance = _concept(embedded, "holed-star-cd")
    drawn, images, run = [], [], evaluate.run_rows

    def counted(model, rows, settings, *args):
        out = run(model, rows, settings, *args)
        drawn.append([r.name for r in rows])
        images.append(out[0])
        return out

    monkeypatch.setattr(evaluate, "run_rows", counted)
    token = table1(embedded, concept, instance, range(1), steps=4, rows="token")
    prompts = table1_prompts(concept, instance)
    assert drawn == [["customized", "alignit"]] * len(prompts)
    monkeypatch.setattr(evaluate, "run_rows", run)
    paper = table1(embedded, concept, instance, range(1), steps=4)
    assert np.array_equal(token.text["customized"], paper.text["customized"])
    assert np.array_equal(token.fidelity["customized"], paper.fidelity["customized"])
    settings = Settings(seed=0, steps=4, record_maps=False)
    alone = generate_concept(embedded, prompts[0][0], replace(concept, phrase="{token}"), settings,
                             include_customized=False).images["alignit"]
    assert np.abs(np.asarray(images[0][1], float) - np.asarray(alone, float)).max() <= 1
