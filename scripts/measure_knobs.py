"""What the paper's knobs do on the embedded model: swapping keys only or values only, and how much
of a LoRA concept AlignIT keeps beyond the concept's keys and values.

    python scripts/measure_knobs.py --seeds 8                    # keys / values: swaps and shipped concepts
    python scripts/measure_knobs.py --seeds 4 --only holed-star-te   # one shipped concept's row
    python scripts/measure_knobs.py --seeds 8 --loras out/lora/striped-ball out/lora/holed-star

Keys only / values only / both (token swaps, `a {colour} {shape} on a {background} background`):
*identity*: the swapped row draws the source word (the source colour, the source shape); *layout*:
the object's silhouette in the swapped image against the baseline's (IoU of the pixels that are not
background), i.e. how much of where and how big the object is stays; *background kept*. The shipped
concepts, AlignIT with keys only / values only / both, `a <token> on a {background} background`:
text alignment (the asked background drawn) and concept fidelity (alignit_core.toy.evaluate.fidelity).

The rest of a LoRA (folders from scripts/train_lora.py, whose manifest names the instance): AlignIT
with `lora_rest` 0 (the paper's definition), 0.25, 0.5 and 1 (all of the LoRA but the other tokens'
keys and values), against the customized baseline, on the same prompts. Prints markdown tables.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from alignit_core import Settings, find_concepts, generate_concept, generate_swap, load_concept, load_model
from alignit_core.toy.evaluate import fidelity, table1_prompts
from alignit_core.toy.instances import INSTANCES
from alignit_core.toy.shapes import COLOURS, classify

ROOT = Path(__file__).resolve().parents[1]

SWAP_KV = {"kv": "keys and values", "k": "keys only", "v": "values only"}
# (colour, shape, background), the swapped word, its source
CASES = {"colour": [(("red", "circle", "blue"), "red", "yellow"), (("green", "square", "white"), "green", "purple"),
                    (("blue", "star", "yellow"), "blue", "red"), (("purple", "triangle", "green"), "purple", "orange")],
         "shape": [(("red", "circle", "blue"), "circle", "square"), (("green", "square", "white"), "square", "star"),
                   (("blue", "star", "yellow"), "star", "triangle"), (("orange", "triangle", "green"), "triangle",
                                                                       "circle")]}
RESTS = (0.0, 0.25, 0.5, 1.0)


def silhouette(image: np.ndarray, background: str) -> np.ndarray:
    """(H, W) bool: the pixels that are not the background colour."""
    return np.sqrt(((image.astype(np.float32) - np.array(COLOURS[background], np.float32)) ** 2).sum(-1)) > 60


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def swaps(model, seeds: range, steps: int) -> list[str]:
    lines = ["| swap | rows swapped | identity (source drawn) | layout (silhouette IoU with baseline) | "
             "background kept | n |", "|---|---|---|---|---|---|"]
    for kind, cases in CASES.items():
        for mode, label in SWAP_KV.items():
            identity, layout, kept = [], [], []
            for (colour, shape, background), target, source in cases:
                for seed in seeds:
                    gen = generate_swap(model, f"a {colour} {shape} on a {background} background", [(target, source)],
                                        Settings(seed=seed, steps=steps, record_maps=False, swap_kv=mode))
                    base, swapped = (np.asarray(gen.images[r]) for r in ("baseline", "swapped"))
                    j = classify(swapped)
                    identity.append((j.colour if kind == "colour" else j.shape) == source)
                    layout.append(iou(silhouette(base, background), silhouette(swapped, background)))
                    kept.append(j.background == background)
            lines.append(f"| {kind} | {label} | {np.mean(identity):.2f} | {np.mean(layout):.2f} | {np.mean(kept):.2f} "
                         f"| {len(identity)} |")
    return lines


def _instance(concept, manifest: dict | None = None):
    return INSTANCES[(manifest or {}).get("instance") or concept.token.strip("<>")]["scene"]


def _prompts(concept, instance, count: int) -> list[tuple[str, str]]:
    return table1_prompts(concept, instance)[:count]


def concepts(model, seeds: range, steps: int, count: int, only: list[str] | None = None) -> list[str]:
    lines = ["| concept | kind | rows swapped | text alignment | concept fidelity | n |", "|---|---|---|---|---|---|"]
    for concept in find_concepts(ROOT / "assets" / "concepts", model):
        if only and concept.name not in only:
            continue
        instance = _instance(concept)
        for mode, label in SWAP_KV.items():
            text, fid = [], []
            for prompt, background in _prompts(concept, instance, count):
                for seed in seeds:
                    gen = generate_concept(model, prompt, concept, Settings(seed=seed, steps=steps, record_maps=False,
                                                                            swap_kv=mode), include_customized=False)
                    j = classify(np.asarray(gen.images["alignit"]))
                    text.append(j.background == background)
                    fid.append(fidelity(j, instance))
            lines.append(f"| {concept.token} | {concept.kind.replace('_', ' ')} | {label} | {np.mean(text):.2f} | "
                         f"{np.mean(fid):.2f} | {len(text)} |")
    return lines


def loras(model, folders: list[Path], seeds: range, steps: int, count: int) -> list[str]:
    lines = ["| LoRA concept | method | text alignment | concept fidelity | n |", "|---|---|---|---|---|"]
    for folder in folders:
        manifest = json.loads((folder / "manifest.json").read_text())
        concept = load_concept(folder, model)
        instance = _instance(concept, manifest)
        scores = {"customized baseline": ([], [])} | {f"AlignIT, rest {rest:g}": ([], []) for rest in RESTS}
        for prompt, background in _prompts(concept, instance, count):
            for seed in seeds:
                for rest in RESTS:
                    gen = generate_concept(model, prompt, concept, Settings(seed=seed, steps=steps, record_maps=False,
                                                                            lora_rest=rest),
                                           include_customized=rest == 0)
                    rows = {f"AlignIT, rest {rest:g}": "alignit"} | ({"customized baseline": "customized"}
                                                                     if rest == 0 else {})
                    for method, row in rows.items():
                        j = classify(np.asarray(gen.images[row]))
                        scores[method][0].append(j.background == background)
                        scores[method][1].append(fidelity(j, instance))
        for method, (text, fid) in scores.items():
            lines.append(f"| {concept.token} ({folder.name}) | {method} | {np.mean(text):.2f} | {np.mean(fid):.2f} | "
                         f"{len(text)} |")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per concept (backgrounds asked for)")
    ap.add_argument("--loras", nargs="*", type=Path, default=[], help="LoRA concept folders (scripts/train_lora.py)")
    ap.add_argument("--skip-kv", action="store_true", help="only the LoRA table")
    ap.add_argument("--only", nargs="+", help="shipped concept folder names to measure (default: all); "
                                              "the swaps' table is left out")
    args = ap.parse_args(argv)
    model = load_model("embedded", device="cpu")
    seeds = range(args.seeds)
    tables = []
    if not args.skip_kv:
        if not args.only:
            tables.append(lambda: swaps(model, seeds, args.steps))
        tables.append(lambda: concepts(model, seeds, args.steps, args.prompts, args.only))
    if args.loras:
        tables.append(lambda: loras(model, args.loras, seeds, args.steps, args.prompts))
    for table in tables:
        print("\n".join(table()) + "\n", flush=True)


if __name__ == "__main__":
    main()
