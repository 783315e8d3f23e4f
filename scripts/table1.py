"""A toy Table 1 on the embedded model: customized baseline vs AlignIT for each shipped concept.

    python scripts/table1.py                 # 10 prompts x 20 seeds per concept, ~10 min on 2 CPU cores
    python scripts/table1.py --seeds 2       # quicker look

Text alignment: the background colour the prompt asks for is the one drawn. Concept fidelity: the
novel instance is reproduced (stripes / hole, see alignit_core.evaluate.fidelity). Prompts ask for
every background except the reference images' own and the object's colours (the classifier cannot
tell an object from a background of its colour).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignit_core import find_concepts, load_model  # noqa: E402
from alignit_core.evaluate import table1  # noqa: E402
from scripts.train_embedded import INSTANCES  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--only", nargs="+", help="concept folder names to evaluate (default: all)")
    args = ap.parse_args(argv)
    model = load_model("embedded")
    print("| concept | kind | method | text alignment | concept fidelity | n |")
    print("|---|---|---|---|---|---|")
    for concept in find_concepts(ROOT / "assets" / "concepts", model):
        if args.only and concept.name not in args.only:
            continue
        instance = INSTANCES[concept.token.strip("<>")]["scene"]
        result = table1(model, concept, instance, range(args.seeds), args.steps)
        for method, (text, fid, n) in result.items():
            label = "customized baseline" if method == "customized" else "AlignIT"
            print(f"| {concept.token} | {concept.kind.replace('_', ' ')} | {label} | {text:.2f} | {fid:.2f} | {n} |",
                  flush=True)


if __name__ == "__main__":
    main()
