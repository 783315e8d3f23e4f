"""The README's picture of the embedded model: what its world draws, and what each shipped concept
draws as customized baseline and with AlignIT.

    python scripts/figure_embedded.py                      # writes assets/figures/embedded.png
    python scripts/figure_embedded.py --seed 3 --out x.png
    python scripts/figure_embedded.py --model embedded-mmdit   # assets/figures/embedded_mmdit.png

Top: the base model on patterned prompts (combinations it never saw); for the MMDiT model, the demo's
token swaps (baseline | swapped). Then one row per concept:
its first three reference images, `a photo of a <token>` on the customized model, and the concept's
example prompt as customized baseline | AlignIT, both from the seed the demo runs that example on (the
manifest's `example_seed`, `scripts/table1.py --write-examples`; 0 where not measured; `--seed` with
`--same-seed`).
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from PIL import Image

from alignit_core import Settings, find_concepts, generate_concept, generate_swap, load_model, parse_swap, tokenize
from alignit_core.conditioning import Row
from alignit_core.generate import run_rows
from alignit_core.settings import resolve
from alignit_core.views import SHAPES_SWAPS
from visualize import comparison_grid

ROOT = Path(__file__).resolve().parents[1]

PATTERNED = ("a blue striped square on a yellow background", "a green triangle with a hole on a black background",
             "a black striped triangle on a orange background", "a white square with a hole on a blue background",
             "a purple circle with a hole on a white background")


def stack(parts: list[Image.Image]) -> Image.Image:
    out = Image.new("RGB", (max(p.width for p in parts), sum(p.height for p in parts)), (255, 255, 255))
    top = 0
    for p in parts:
        out.paste(p, (0, top))
        top += p.height
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--model", default="embedded", choices=("embedded", "embedded-mmdit"))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--same-seed", action="store_true", help="the examples too from --seed, not their own seeds")
    args = ap.parse_args(argv)
    name = "embedded.png" if args.model == "embedded" else "embedded_mmdit.png"
    out = args.out or ROOT / "assets" / "figures" / name
    model = load_model(args.model)
    settings = Settings(seed=args.seed, steps=args.steps, record_maps=False)
    if model.family.own_loop:  # the MMDiT model: its token swaps
        columns = []
        for prompt, swap, _ in SHAPES_SWAPS:
            gen = generate_swap(model, prompt, [parse_swap(swap)], settings)
            columns += [(prompt, gen.images["baseline"], None), (f"swapped: {swap}", gen.images["swapped"], None)]
        parts = [comparison_grid(columns, "token swaps: baseline | swapped")]
    else:
        images = run_rows(model, [Row(str(i), tokenize(model.tokenizer, t)) for i, t in enumerate(PATTERNED)],
                          resolve(model, settings))[0]
        parts = [comparison_grid([(t, im, None) for t, im in zip(PATTERNED, images)], "base model, patterned prompts")]
    for concept in find_concepts(ROOT / "assets" / "concepts", model):
        refs = [Image.open(r).convert("RGB") for r in concept.references[:3]]
        photo = generate_concept(model, f"a photo of a {concept.token}", concept, settings)
        seed = args.seed if args.same_seed else concept.example_seed
        example = generate_concept(model, concept.example_prompt, concept, replace(settings, seed=seed))
        columns = [(f"reference {i + 1}", im, None) for i, im in enumerate(refs)]
        columns += [(f"a photo of a {concept.token}", photo.images["customized"], None),
                    (f"customized: {concept.example_prompt}", example.images["customized"], None),
                    (f"AlignIT: {concept.example_prompt}", example.images["alignit"], None)]
        parts.append(comparison_grid(columns, f"{concept.name} ({concept.kind.replace('_', ' ')}); "
                                              f"its example (the last two) at seed {seed}"))
    out.parent.mkdir(parents=True, exist_ok=True)
    stack(parts).save(out, optimize=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
