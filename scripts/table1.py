"""A toy Table 1 on the embedded model: customized baseline vs AlignIT for each shipped concept.

    python scripts/table1.py                 # every prompt x 10 seeds per concept, ~10 min a concept on 2 CPU cores
    python scripts/table1.py --seeds 2       # quicker look
    python scripts/table1.py --first-seed 100   # seeds 100-109: held out from README's table and the tests
    python scripts/table1.py --words         # and the base model asked for each instance in words
    python scripts/table1.py --model embedded-mmdit   # the MMDiT model's concepts (side-stream AlignIT)
    python scripts/table1.py --rows concept --only holed-star-cd --by-prompt   # Custom Diffusion's modifier row too

Text alignment: the background colour the prompt asks for is the one drawn. Concept fidelity: the
novel instance is reproduced (stripes / hole, see alignit_core.toy.evaluate.fidelity). Prompts ask for
every background except the reference images' own and the object's colours (the classifier cannot
tell an object from a background of its colour). Each figure comes with its 95 % confidence
interval from resampling seeds; AlignIT's gain in text alignment and its share of the baseline's
fidelity are paired (the same seed and prompt for both methods).

`--words` adds a reference row: the base model on each prompt with the token replaced by the
instance's words (`a photo of a orange star with a hole on a red background`). Its fidelity is how often
the base model itself draws the instance on the asked backgrounds, so AlignIT's share of it tells a
concept's row that loses the instance from a base model that cannot draw it there at all.

`--rows concept` has AlignIT take from p' every row where p' holds the concept, not only the class word's: for
Custom Diffusion (`<holed-star> star`) the modifier token's row too, written over the word before the class word
(the `positions` a user can tick in the demo or give to `generate --positions`). `--rows token` takes the class
word's row from a p' holding Custom Diffusion's token alone there (`* <holed-star> * * * *`, without its class word).
`--by-prompt` adds each prompt's text alignment and fidelity per method: where the misses are. `--parts` adds how
often each method draws each part of the instance (its shape, its colour, its stripes or hole): what a miss drops.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from alignit_core import find_concepts, load_model
from alignit_core.concepts import KIND_LABELS
from alignit_core.models import EMBEDDED, EMBEDDED_MMDIT
from alignit_core.toy.evaluate import PARTS, TABLE1_ROWS, asked_in_words, table1
from alignit_core.toy.instances import INSTANCES


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--first-seed", type=int, default=0,
                    help="seeds FIRST .. FIRST+SEEDS-1 (e.g. 100: seeds no table or test of this project uses)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--assets", type=Path, default=EMBEDDED.parent,
                    help="a folder holding embedded-shapes/ and concepts/ (what train_embedded.py --out wrote)")
    ap.add_argument("--model", default=EMBEDDED.name, choices=(EMBEDDED.name, EMBEDDED_MMDIT.name),
                    help="which embedded model (its concepts are those whose manifest names it)")
    ap.add_argument("--only", nargs="+", help="concept folder names to evaluate (default: all)")
    ap.add_argument("--words", action="store_true",
                    help="add the base model asked for the instance in words (`a orange star with a hole on a red "
                         "background`): its fidelity is what the base model itself can draw on those backgrounds")
    ap.add_argument("--write-examples", action="store_true",
                    help="set each concept's example_prompt (its manifest) to the prompt where AlignIT gains most, "
                         "and example_rates to how often each method draws it all there (the demo offers an "
                         "AlignIT example only where AlignIT does in most seeds), and example_seed to the first "
                         "seed where AlignIT draws it all and the customized baseline draws the concept on another "
                         "background (Table1.example_seed; the demo runs the example on it)")
    ap.add_argument("--rows", choices=TABLE1_ROWS, default="class",
                    help="the rows AlignIT takes from p': the class word's (the paper's AlignIT), every row where p' "
                         "holds the concept (Custom Diffusion's modifier token too, over the word before the class "
                         "word) or the class word's from a p' holding the concept's token alone there")
    ap.add_argument("--by-prompt", action="store_true", help="each prompt's text alignment and fidelity per method")
    ap.add_argument("--parts", action="store_true",
                    help="how often each method's pictures have each part of the instance (its shape, its colour, "
                         "its pattern: the stripes or the hole): what a method keeps of a concept and what it drops")
    args = ap.parse_args(argv)
    if args.write_examples and args.rows != "class":
        ap.error("--write-examples sets the demo's examples, which run the paper's AlignIT: leave --rows class")
    model = load_model(str(args.assets / args.model))
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    a = {"class": "AlignIT", "concept": "AlignIT (every row of the concept)",
         "token": "AlignIT (the token alone at the class word)"}[args.rows]
    words = f" | base model asked in words: text, fidelity | {a} / words" if args.words else ""
    print(f"| concept | kind | text alignment: customized → {a} | gain (paired) | "
          f"concept fidelity: customized → {a} | {a} / customized{words} | n |")
    print("|---|---|---|---|---|---|" + "---|" * (2 * args.words) + "---|")
    texts, examples, asked, by_prompt, tables = [], [], {}, [], {}
    for concept in find_concepts(args.assets / "concepts", model):
        if args.only and concept.name not in args.only:
            continue
        instance = INSTANCES[concept.token.strip("<>")]["scene"]
        t = table1(model, concept, instance, seeds, args.steps, args.rows)
        if args.words:  # the same for every concept of an instance
            if instance not in asked:
                asked[instance] = asked_in_words(model, concept, instance, seeds, args.steps)
            t = t.with_method("words", *asked[instance])
        texts.append(t.text["alignit"].mean())
        extra = (f" | {t.mean('text', 'words')}, {t.mean('fidelity', 'words')} | "
                 f"{t.fidelity_ratio_to('words')}" if args.words else "")
        print(f"| {concept.token} | {KIND_LABELS[concept.kind]} | {t.mean('text', 'customized')} → "
              f"{t.mean('text', 'alignit')} | {t.text_gain} | {t.mean('fidelity', 'customized')} → "
              f"{t.mean('fidelity', 'alignit')} | {t.fidelity_ratio}{extra} | {t.n} |", flush=True)
        examples.append((concept, t.best_example()))
        tables[concept.name] = t
        if args.by_prompt:
            by_prompt.append((concept, t))
    if texts:
        print(f"\nAlignIT's text alignment averaged over the concepts: {np.mean(texts):.2f}")
    for concept, t in by_prompt:
        methods = list(t.text)
        print(f"\n{concept.name}, per prompt ({args.seeds} seed{'s' * (args.seeds != 1)}): text alignment, fidelity\n")
        print("| prompt | " + " | ".join(methods) + " |")
        print("|---|" + "---|" * len(methods))
        for prompt, rates in t.by_prompt():
            print(f"| `{prompt}` | " + " | ".join(f"{rates[m][0]:.2f}, {rates[m][1]:.2f}" for m in methods) + " |")
    if args.parts and tables:
        print("\nParts of the instance drawn (customized → AlignIT; fidelity asks for all three)\n")
        print("| concept | kind | " + " | ".join(PARTS) + " |")
        print("|---|---|" + "---|" * len(PARTS))
        for concept, _ in examples:
            t = tables[concept.name]
            print(f"| {concept.token} | {KIND_LABELS[concept.kind]} | " + " | ".join(
                f"{t.part_rate(part, 'customized')} → {t.part_rate(part, 'alignit')}" for part in PARTS) + " |")
    print("\n| concept | example (most gained: concept and background both drawn) | customized | AlignIT |")
    print("|---|---|---|---|")
    for concept, (prompt, before, after) in examples:
        print(f"| {concept.name} | `{prompt}` | {before:.2f} | {after:.2f} |")
        if args.write_examples:
            manifest = args.assets / "concepts" / concept.name / "manifest.json"
            data = json.loads(manifest.read_text())
            data["example_prompt"] = prompt
            data["example_rates"] = [round(before, 3), round(after, 3)]
            seed = tables[concept.name].example_seed(prompt)
            data.pop("example_seed", None)
            if seed is not None:
                data["example_seed"] = seeds[seed]
            manifest.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
