"""The shipped embedded model: offline loading, prompt following and K/V swap semantics,
judged by the shapes world's deterministic pixel classifier.

The thresholds are the project's targets (README, "The embedded model"): each attribute of the
held-out prompts drawn as asked in >= 90 % of samples; a colour swap draws the source colour in
>= 90 % while shape and background stay (>= 90 %); a shape swap draws the source shape in >= 80 %.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from alignit_core import Settings, generate_concept, generate_swap, tokenize
from alignit_core.evaluate import held_out_quality, patterned_quality, reproduction, swap_semantics
from alignit_core.models import EMBEDDED
from alignit_core.shapes import Scene, classify, styled

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
    assert swapped.shape >= 0.9 and swapped.background >= 0.9  # and the rest stays


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


@pytest.mark.slow
@pytest.mark.parametrize("name", ["striped-ball-ti", "striped-ball-cd", "holed-star-ti", "holed-star-cd"])
def test_each_shipped_concept_reproduces_its_instance(embedded, name):
    """The concept loads through the engine's loaders and `a photo of a <token>` draws the novel
    instance (a circle striped red and white / an orange star with a hole, `evaluate.fidelity`) in
    at least 2 of 8 seeds, where the base model on `a photo of a <class word>` draws it in none (the
    world never drew these instances). README gives each concept's rate."""
    from alignit_core import load_concept
    from scripts.train_embedded import INSTANCES

    concept = load_concept(Path("assets/concepts") / name, embedded)
    instance = INSTANCES[concept.token.strip("<>")]["scene"]
    rates = reproduction(embedded, concept, instance, range(8))
    print(f"{name}: {rates}")
    assert rates["customized"] >= 0.25
    assert rates["base"] == 0.0
