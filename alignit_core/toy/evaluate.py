"""Judge the embedded model with the shapes world's pixel classifier.

Measurements, each over many seeds and prompts, used by the tests and by `scripts/table1.py`:
held-out prompt quality, swap semantics, where each word's cross-attention lands (localisation),
whether a concept's own row carries it, and a toy Table 1 (text alignment and concept fidelity of
the customized baseline vs AlignIT, with confidence intervals).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image
import torch
import torch.nn.functional as F

from ..conditioning import Row
from ..generate import generate_concept, run_rows
from ..prompts import tokenize, word_swap_plan
from ..settings import Settings, resolve
from .instances import object_colours
from .shapes import COLOURS, HELD_OUT, PATTERN_PHRASES, Judgement, classify, object_mask, pattern_template


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


def table1_prompts(concept, instance) -> list[tuple[str, str]]:
    """(prompt, asked background): every background the classifier can tell from the instance (its
    colour, and a striped one's second colour) and that none of the concept's reference images shows
    it on (the instance's own background, and any other its references were photographed on)."""
    seen = {instance.background} | {classify(np.asarray(Image.open(p).convert("RGB"))).background
                                    for p in getattr(concept, "references", ())}
    backgrounds = [c for c in COLOURS if c not in seen and c not in object_colours(instance)]
    return [(t.format(tok=concept.token, b=b), b) for t in ("a {tok} on a {b} background",
                                                            "a photo of a {tok} on a {b} background")
            for b in backgrounds]


def fidelity(j: Judgement, instance) -> bool:
    """Is the novel instance reproduced? Striped: its shape with both stripe colours each covering
    at least 20 % of the object; holed: its shape and colour, with a hole (`Judgement.hole`). Every
    part of `fidelity_parts`."""
    return all(fidelity_parts(j, instance).values())


PARTS = ("shape", "colour", "pattern")


def fidelity_parts(j: Judgement, instance) -> dict[str, bool]:
    """Which parts of the instance the picture has (`fidelity` asks for all): its shape; its colour (a
    striped one's: covering at least 20 % of the object, else the object's dominant colour); its pattern
    (a striped one's second colour covering at least 20 %, a holed one's hole; a plain one has none to
    lose). What a method keeps and what it drops of a concept."""
    striped = instance.pattern == "striped"
    return {"shape": j.shape == instance.shape,
            "colour": j.colour_shares.get(instance.colour, 0) >= 0.2 if striped else j.colour == instance.colour,
            "pattern": (j.colour_shares.get(instance.second_colour, 0) >= 0.2 if striped
                        else j.hole if instance.pattern == "holed" else True)}


def reproduction_hits(model, concept, instance, seeds: range, steps: int = 20,
                      guidance: float | None = None) -> dict[str, list[bool]]:
    """Per seed, whether the picture for `a photo of a <token>` reproduces the instance, per row
    (customized baseline, AlignIT, base model on `a photo of a <class word>`)."""
    hits = {"customized": [], "alignit": [], "base": []}
    for seed in seeds:
        gen = generate_concept(model, f"a photo of a {concept.token}", concept,
                               Settings(seed=seed, steps=steps, guidance=guidance, record_maps=False),
                               include_base=True)
        for row in hits:
            hits[row].append(fidelity(classify(np.asarray(gen.images[row])), instance))
    return hits


def reproduction(model, concept, instance, seeds: range, steps: int = 20) -> dict[str, float]:
    """Share of seeds whose picture for `a photo of a <token>` reproduces the instance, per row
    (`reproduction_hits`), and `kept`: the share of the seeds where the customized baseline
    reproduces it in which AlignIT does too (the concept's own row carries it; nan when the baseline
    never does)."""
    hits = reproduction_hits(model, concept, instance, seeds, steps)
    rates = {row: float(np.mean(v)) for row, v in hits.items()}
    both = [a for c, a in zip(hits["customized"], hits["alignit"]) if c]
    rates["kept"] = float(np.mean(both)) if both else float("nan")
    return rates


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


@dataclass(frozen=True)
class Estimate:
    """A mean and its 95 % confidence interval."""

    mean: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.mean:.2f} [{self.low:.2f}, {self.high:.2f}]"


def seed_bootstrap(values: dict[str, np.ndarray], statistic, resamples: int = 2000) -> Estimate:
    """`statistic(values)` with a 95 % percentile interval from resampling seeds with replacement.
    Each array is (seeds, prompts) with the same seeds in the same order, so differences and ratios
    of methods stay paired: a seed's prompts move together, as they share its starting noise."""
    n = next(iter(values.values())).shape[0]
    rng = np.random.default_rng(0)
    draws = [statistic({k: v[idx] for k, v in values.items()})
             for idx in rng.integers(0, n, size=(resamples, n))]
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    return Estimate(float(statistic(values)), float(low), float(high))


@dataclass(frozen=True)
class Table1:
    """One concept's row of the toy Table 1: per method (customized, alignit) text alignment (the
    asked background drawn) and concept fidelity (the instance drawn), each (seeds, prompts); `parts`:
    which of the instance's parts each picture has (`fidelity_parts`), where `table1` judged them."""

    text: dict[str, np.ndarray]
    fidelity: dict[str, np.ndarray]
    prompts: tuple[str, ...] = ()
    parts: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # method -> PARTS -> (seeds, prompts)

    @property
    def n(self) -> int:
        return int(self.text["customized"].size)

    def mean(self, measure: str, method: str) -> Estimate:
        data = getattr(self, measure)
        return seed_bootstrap({method: data[method]}, lambda v: float(v[method].mean()))

    @property
    def text_gain(self) -> Estimate:
        """AlignIT's text alignment minus the customized baseline's, paired."""
        return seed_bootstrap(self.text, lambda v: float(v["alignit"].mean() - v["customized"].mean()))

    def best_example(self) -> tuple[str, float, float]:
        """The prompt where AlignIT most often draws both the concept and the asked background while
        the customized baseline does not, with the two methods' rates of drawing both (over seeds):
        an example that works for most seeds, chosen by the protocol rather than by one picture."""
        both = {m: (self.text[m] & self.fidelity[m]).mean(axis=0) for m in self.text}
        k = int(np.argmax(both["alignit"] - both["customized"] + 1e-3 * both["alignit"]))
        return self.prompts[k], float(both["customized"][k]), float(both["alignit"][k])

    def example_seed(self, prompt: str) -> int | None:
        """The seed (an index into the table's seeds) for the demo to run `prompt`'s example on: the first
        where AlignIT draws both the concept and the asked background and the customized baseline draws the
        concept on another background (the failure the paper fixes); else the first where the baseline
        misses the background, else the first where it misses either, else the first where AlignIT draws
        both; None where AlignIT never does."""
        k = self.prompts.index(prompt)
        text, fid = self.text["customized"][:, k], self.fidelity["customized"][:, k]
        alignit = self.text["alignit"][:, k] & self.fidelity["alignit"][:, k]
        for wins in (alignit & fid & ~text, alignit & ~text, alignit & ~(text & fid), alignit):
            if wins.any():
                return int(np.argmax(wins))
        return None

    @property
    def fidelity_ratio(self) -> Estimate:
        """AlignIT's concept fidelity over the customized baseline's, paired."""
        return self.fidelity_ratio_to("customized")

    def with_method(self, method: str, text: np.ndarray, fidelity: np.ndarray) -> "Table1":
        """This table with one more method's (seeds, prompts) judgements (same seeds and prompts)."""
        if not text.shape == fidelity.shape == self.text["customized"].shape:
            raise ValueError(f"{method}: judgements {text.shape} / {fidelity.shape}, the table's are "
                             f"{self.text['customized'].shape} (seeds, prompts)")
        return Table1({**self.text, method: text}, {**self.fidelity, method: fidelity}, self.prompts, self.parts)

    def part_rate(self, part: str, method: str) -> Estimate:
        """How often `method`'s pictures have that part of the instance (`fidelity_parts`), with its interval."""
        return seed_bootstrap({method: self.parts[method][part]}, lambda v: float(v[method].mean()))

    def by_prompt(self) -> list[tuple[str, dict[str, tuple[float, float]]]]:
        """Per prompt, each method's (text alignment, fidelity) over the seeds: where the misses are."""
        return [(p, {m: (float(self.text[m][:, k].mean()), float(self.fidelity[m][:, k].mean())) for m in self.text})
                for k, p in enumerate(self.prompts)]

    def fidelity_ratio_to(self, method: str) -> Estimate:
        """AlignIT's concept fidelity over `method`'s, paired (nan where `method` never draws it)."""
        return seed_bootstrap(self.fidelity, lambda v: float(v["alignit"].mean() / v[method].mean())
                              if v[method].mean() > 0 else float("nan"))


def instance_words(instance) -> str:
    """The words the base world has for a novel instance, without its background (`orange star with
    a hole`, `red striped circle`): what the concept's token stands for."""
    return pattern_template("{c} {s}", instance.pattern).format(c=instance.colour, s=instance.shape)


# Which of p's rows AlignIT takes from p' in Table 1: the class word's (the paper's AlignIT, the engine's
# default), every row where p' holds the concept, a longer concept's spill included (Custom Diffusion's
# modifier token over the word before the class word; the same `positions` a user can tick), or the class
# word's from a p' holding the concept's token alone there (Custom Diffusion's `<token>` without its class
# word: `* <token> * * * *`).
TABLE1_ROWS = ("class", "concept", "token")


def table1(model, concept, instance, seeds: range, steps: int = 20, rows: str = "class") -> Table1:
    """The customized baseline and AlignIT on every prompt of `table1_prompts` x seeds, judged by
    the classifier. `rows`: one of TABLE1_ROWS."""
    if rows not in TABLE1_ROWS:
        raise ValueError(f"rows must be one of {', '.join(TABLE1_ROWS)}, not {rows!r}")
    prompts = table1_prompts(concept, instance)
    positions = [list(model.family.concept_plan(p, concept.words).plan.unstarred()) if rows == "concept" else None
                 for p, _ in prompts]
    alone = replace(concept, phrase="{token}") if rows == "token" else None
    text = {m: np.zeros((len(seeds), len(prompts)), bool) for m in ("customized", "alignit")}
    fid = {m: np.zeros((len(seeds), len(prompts)), bool) for m in ("customized", "alignit")}
    parts = {m: {part: np.zeros((len(seeds), len(prompts)), bool) for part in PARTS} for m in text}
    for i, seed in enumerate(seeds):
        for k, (prompt, background) in enumerate(prompts):
            settings = Settings(seed=seed, steps=steps, record_maps=False)
            if alone is None:
                images = generate_concept(model, prompt, concept, settings, positions=positions[k]).images
            else:
                images = _token_alone(model, prompt, concept, alone, settings)
            for method in text:
                j = classify(np.asarray(images[method]))
                text[method][i, k] = j.background == background
                has = fidelity_parts(j, instance)
                for part in PARTS:
                    parts[method][part][i, k] = has[part]
                fid[method][i, k] = all(has.values())  # `fidelity`
    return Table1(text, fid, tuple(p for p, _ in prompts), parts)


def _token_alone(model, prompt: str, concept, alone, settings: Settings) -> dict:
    """{customized, alignit} images in one batch: the concept's customized baseline, and AlignIT
    taking the class word's row from a p' that holds `alone` (the concept's token without its class word)."""
    mine, theirs = (model.family.concept_plan(prompt, c.words) for c in (concept, alone))
    rows = [Row("customized", mine.customized, concept=concept),
            Row("alignit", theirs.plan.target, swap=theirs.plan, swap_concept=alone)]
    return dict(zip((r.name for r in rows), run_rows(model, rows, resolve(model, settings))[0]))


def asked_in_words(model, concept, instance, seeds: range, steps: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """(text alignment, fidelity), each (seeds, prompts): the base model on `table1`'s prompts with
    the token replaced by the instance's words (`instance_words`), same seeds. How often the base
    model itself draws the instance on those backgrounds: the most AlignIT's row can be expected to
    bring (`Table1.with_method("words", ...)`). It depends on the instance only, not on the concept."""
    prompts = table1_prompts(concept, instance)
    words = instance_words(instance)
    rows = [Row(str(k), tokenize(model.tokenizer, p.replace(concept.token, words))) for k, (p, _) in enumerate(prompts)]
    text, fid = (np.zeros((len(seeds), len(prompts)), bool) for _ in range(2))
    for i, seed in enumerate(seeds):
        settings = resolve(model, Settings(seed=seed, steps=steps, record_maps=False))
        for k, image in enumerate(run_rows(model, rows, settings)[0]):
            j = classify(np.asarray(image))
            text[i, k], fid[i, k] = j.background == prompts[k][1], fidelity(j, instance)
    return text, fid


# ---------------------------------------------------------------- where each word's attention lands

# Which pixels each kind of word draws: the object's (its colour, shape and pattern words) or the
# background's (its colour and the word "background").
WORD_CLASSES = {"colour": "object", "shape": "object", "pattern": "object",
                "background colour": "background", "background": "background"}
MAP_THRESHOLD = 0.4  # DAAM's: a word's map, scaled min -> max, covers the pixels where it is >= 0.4


def localisation_prompts() -> list[tuple[str, dict[str, int]]]:
    """Held-out prompts, plain, striped and holed, with each word class's token position."""
    out = []
    for i, (c, s, b) in enumerate(HELD_OUT):
        pattern = ("plain", "striped", "holed")[i % 3]
        words = f"a {c} {PATTERN_PHRASES[pattern]} on a {b} background".format(s=s).split()
        where = {"colour": 2, "shape": words.index(s) + 1, "background colour": len(words) - 1,
                 "background": len(words)}
        if pattern != "plain":
            where["pattern"] = words.index("striped" if pattern == "striped" else "hole") + 1
        out.append((" ".join(words), where))
    return out


def word_map_iou(word_map: np.ndarray, mask: np.ndarray) -> float:
    """IoU of a word's map (side, side), upsampled to the mask's size, scaled min -> max and cut at
    MAP_THRESHOLD, with the pixels it should cover (H, W) bool."""
    m = torch.from_numpy(np.asarray(word_map, np.float32))[None, None]
    m = F.interpolate(m, size=mask.shape, mode="bilinear", align_corners=False)[0, 0].numpy()
    m = (m - m.min()) / max(float(m.max() - m.min()), 1e-12)
    covered = m >= MAP_THRESHOLD
    return float((covered & mask).sum() / max((covered | mask).sum(), 1))


def localisation(model, seeds: range, steps: int = 20) -> dict[str, tuple[float, int]]:
    """Per word class (WORD_CLASSES): mean IoU of its words' cross-attention maps (the engine's:
    head-mean, over the layers at the recording resolution, summed over steps) with the object or
    background mask of the image drawn, and the number of maps; over the held-out prompts of
    `localisation_prompts` x seeds. Images with no object found are left out."""
    prompts = localisation_prompts()
    ious: dict[str, list[float]] = {k: [] for k in WORD_CLASSES}
    for seed in seeds:
        settings = resolve(model, Settings(seed=seed, steps=steps))
        rows = [Row(str(i), tokenize(model.tokenizer, text)) for i, (text, _) in enumerate(prompts)]
        images, maps = run_rows(model, rows, settings)[:2]
        for (text, where), image, row in zip(prompts, images, rows):
            obj = object_mask(np.asarray(image))
            if obj.sum() < 0.01 * obj.size:
                continue
            for word_class, pos in where.items():
                mask = obj if WORD_CLASSES[word_class] == "object" else ~obj
                ious[word_class].append(word_map_iou(maps[row.name][pos], mask))
    return {k: (float(np.mean(v)) if v else float("nan"), len(v)) for k, v in ious.items()}
