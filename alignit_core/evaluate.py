"""Judge the embedded model with the shapes world's pixel classifier.

Three measurements, each over many seeds and prompts, used by the tests and by
`scripts/table1.py`: held-out prompt quality, swap semantics, and a toy Table 1 (text alignment
and concept fidelity of the customized baseline vs AlignIT).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .generate import Row, Settings, generate_concept, resolve, run_rows
from .prompts import tokenize, word_swap_plan
from .shapes import COLOURS, HELD_OUT, Judgement, classify


@dataclass(frozen=True)
class Rates:
    colour: float
    shape: float
    background: float
    n: int


def _rates(judged: list[tuple[Judgement, tuple[str, str, str]]]) -> Rates:
    return Rates(float(np.mean([j.colour == c for j, (c, _, _) in judged])),
                 float(np.mean([j.shape == s for j, (_, s, _) in judged])),
                 float(np.mean([j.background == b for j, (_, _, b) in judged])), len(judged))


def held_out_quality(model, seeds: range, steps: int = 20) -> Rates:
    """Held-out (colour, shape, background) prompts, all 16 in one batch per seed."""
    judged = []
    for seed in seeds:
        settings = resolve(model, Settings(seed=seed, steps=steps, record_maps=False))
        rows = [Row(str(i), tokenize(model.tokenizer, f"a {c} {s} on a {b} background"))
                for i, (c, s, b) in enumerate(HELD_OUT)]
        images = run_rows(model, rows, settings)[0]
        judged += [(classify(np.asarray(im)), t) for im, t in zip(images, HELD_OUT)]
    return _rates(judged)


def swap_semantics(model, cases: list[tuple[tuple[str, str, str], str, str]], seeds: range,
                   steps: int = 20) -> tuple[Rates, Rates]:
    """For each ((colour, shape, background), target word, source word): generate the swapped
    row and judge it against the triple with the target replaced by the source. Returns the rates
    of the swapped rows against that expectation and of the baseline rows against the prompt."""
    swapped, baseline = [], []
    for seed in seeds:
        settings = resolve(model, Settings(seed=seed, steps=steps, record_maps=False))
        rows, expected = [], []
        for i, ((c, s, b), target, source) in enumerate(cases):
            plan = word_swap_plan(model.tokenizer, f"a {c} {s} on a {b} background", [(target, source)])
            rows += [Row(f"b{i}", plan.target), Row(f"s{i}", plan.target, swap=plan)]
            expected.append(((c, s, b), tuple(source if v == target else v for v in (c, s, b))))
        images = run_rows(model, rows, settings)[0]
        for k, (asked, want) in enumerate(expected):
            baseline.append((classify(np.asarray(images[2 * k])), asked))
            swapped.append((classify(np.asarray(images[2 * k + 1])), want))
    return _rates(swapped), _rates(baseline)


def table1_prompts(concept, reference_background: str, object_colours: set[str]) -> list[tuple[str, str]]:
    """(prompt, asked background): every background the classifier can tell from the object and
    that is not the reference images' own background."""
    backgrounds = [c for c in COLOURS if c != reference_background and c not in object_colours]
    return [(t.format(tok=concept.token, b=b), b) for t in ("a {tok} on a {b} background",
                                                            "a photo of a {tok} on a {b} background")
            for b in backgrounds]


def fidelity(j: Judgement, instance) -> bool:
    """Is the novel instance reproduced? Striped: its shape with both stripe colours each covering
    at least 20 % of the object; holed: its shape and colour, with a hole (`Judgement.hole`)."""
    if j.shape != instance.shape:
        return False
    if instance.pattern == "striped":
        return all(j.colour_shares.get(c, 0) >= 0.2 for c in (instance.colour, instance.second_colour))
    if instance.pattern == "holed":
        return j.hole and j.colour == instance.colour
    return j.colour == instance.colour


def reproduction(model, concept, instance, seeds: range, steps: int = 20) -> dict[str, float]:
    """Share of seeds whose picture for `a photo of a <token>` reproduces the instance, per row
    (customized baseline, AlignIT, base model on `a photo of a <class word>`)."""
    hits = {"customized": [], "alignit": [], "base": []}
    for seed in seeds:
        gen = generate_concept(model, f"a photo of a {concept.token}", concept,
                               Settings(seed=seed, steps=steps, record_maps=False), include_base=True)
        for row in hits:
            hits[row].append(fidelity(classify(np.asarray(gen.images[row])), instance))
    return {row: float(np.mean(v)) for row, v in hits.items()}


def patterned_quality(model, scenes, seeds: range, steps: int = 20) -> float:
    """Share of samples of each scene's caption (`a blue striped square on a ...`) that draw it,
    pattern included (`fidelity`); all scenes in one batch per seed."""
    hits = []
    for seed in seeds:
        settings = resolve(model, Settings(seed=seed, steps=steps, record_maps=False))
        rows = [Row(str(i), tokenize(model.tokenizer, sc.caption())) for i, sc in enumerate(scenes)]
        images = run_rows(model, rows, settings)[0]
        for image, scene in zip(images, scenes):
            j = classify(np.asarray(image))
            hits.append(fidelity(j, scene) and j.background == scene.background)
    return float(np.mean(hits))


def table1(model, concept, instance, seeds: range, steps: int = 20):
    """Per method: (text alignment, concept fidelity, n) over prompts x seeds."""
    colours = {instance.colour} | ({instance.second_colour} if instance.pattern == "striped" else set())
    scores = {"customized": [], "alignit": []}
    for text, background in table1_prompts(concept, instance.background, colours):
        for seed in seeds:
            gen = generate_concept(model, text, concept, Settings(seed=seed, steps=steps, record_maps=False))
            for row in scores:
                j = classify(np.asarray(gen.images[row]))
                scores[row].append((j.background == background, fidelity(j, instance)))
    return {row: (float(np.mean([a for a, _ in v])), float(np.mean([f for _, f in v])), len(v))
            for row, v in scores.items()}
