"""`python -m alignit_core ...`: scripted token swaps and AlignIT comparisons.

    python -m alignit_core tokens --model embedded --prompt "a red circle on a blue background"
    python -m alignit_core generate --model embedded --prompt "a red circle" --swap red=yellow --out out/
    python -m alignit_core generate --model embedded --concept striped-ball-ti \\
        --prompt "a <striped-ball> on a green background" --out out/
    python -m alignit_core eval --model embedded --dataset assets/eval/embedded.json --out out/eval

Bad input exits with status 2 and one line on stderr; nothing is written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import AlignITError, ConceptError
from .record import write_outputs
from .settings import add_arguments as add_settings_arguments
from .settings import from_args
from .sweep import add_arguments as add_eval_arguments

CONCEPTS = Path(__file__).resolve().parents[1] / "assets" / "concepts"


def parser() -> argparse.ArgumentParser:
    """The `python -m alignit_core` argument parser (generate, tokens, eval)."""
    ap = argparse.ArgumentParser(prog="python -m alignit_core", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("generate", "tokens"):
        p = sub.add_parser(name)
        p.add_argument("--model", default="auto",
                       help="auto | embedded | embedded-mmdit | a diffusers folder | a hub id")
        p.add_argument("--prompt", required=True)
        p.add_argument("--concept", action="append", default=[],
                       help="a concept folder name under assets/concepts, a folder, a manifest, or a bare "
                            "textual-inversion or LoRA file (then give --class-word, and a LoRA's --token unless its "
                            "metadata names them); give it again for several concepts in one prompt, each swapped "
                            "from its own customized model")
        p.add_argument("--token", help="bare embedding file: the token as written in prompts")
        p.add_argument("--class-word", help="bare embedding file: the concept's class word, e.g. cat")
        p.add_argument("--lora-scale", type=float, help="how much of a LoRA concept to apply (diffusers' adapter "
                                                        "weight; default: its manifest's scale, else 1)")
        p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
        if name == "tokens":
            add_settings_arguments(p, only=("--long-prompt",))
        else:
            p.add_argument("--swap", action="append", default=[], metavar="WORD=SOURCE|POS=SOURCE",
                           help="token swap: the rows of WORD (or position POS) come from SOURCE in p'")
            p.add_argument("--positions", type=str, nargs="+",
                           help="concept mode: swap these positions of p instead of the class word's")
            p.add_argument("--base", action="store_true", help="concept mode: add the base model on p")
            add_settings_arguments(p)
            p.add_argument("--compile", action="store_true", help="torch.compile the UNet (slow first call)")
            p.add_argument("--channels-last", action="store_true", help="channels-last memory layout for the UNet")
            p.add_argument("--out", required=True, type=Path)
    add_eval_arguments(sub.add_parser("eval", help="baseline vs AlignIT over a dataset (Table 1); "
                                                   "runs under `accelerate launch`"))
    return ap


def _concept(arg: str, model, token: str | None = None, class_word: str | None = None, lora_scale=None):
    from .concepts import load_concept

    path = Path(arg)
    if not path.exists() and (CONCEPTS / arg).is_dir():
        path = CONCEPTS / arg
    if not path.exists():
        known = sorted(p.name for p in CONCEPTS.glob("*/manifest.json") for p in [p.parent])
        raise ConceptError(f"unknown concept {arg!r}; available: {', '.join(known) or 'none'}")
    return load_concept(path, model, token=token, class_word=class_word, lora_scale=lora_scale)


def _tokens(model, prompt: str, concepts: list, long: str = "segments") -> str:
    from .generate import check_concepts, check_prompt
    from .views import token_rows

    prompt = check_prompt(prompt)
    if not concepts:
        table = [("p", model.family.prompt(prompt, long))]
    elif len(concepts) == 1:
        prompts = model.family.concept_plan(prompt, concepts[0].words, long)
        table = [("customized", prompts.customized), ("p", prompts.plan.target), ("p'", prompts.plan.source)]
    else:
        check_concepts(model, concepts)
        several = model.family.several_concepts_plan(prompt, [c.words for c in concepts])
        table = [("customized", several.customized), ("p", several.plans[0].target)]
        table += [(f"p'[{c.token}]", plan.source) for c, plan in zip(concepts, several.plans)]
    lines = []
    for label, p in table:
        lines.append(f"{label}: {p.text}")
        if p.dropped:
            lines.append(f"(over 75 tokens; not read: {p.dropped})")
        lines.append(f"{'pos':>4}  {'seg':>3}  {'local':>5}  {'token':<20} word")
        lines += [f"{pos:>4}  {segment:>3}  {local:>5}  {token:<20} {word}"
                  for pos, segment, local, token, word in token_rows(p)]
    return "\n".join(lines)


def quiet_loading() -> None:
    """No loading progress bars on stderr (diffusers' pipeline components, transformers' weights): a
    command's stderr is its `model: ...` line, any `warning: ...` lines and, on bad input, its one error line."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    quiet_loading()
    if args.command == "eval":
        from .sweep import run_command

        return run_command(args)
    try:
        from .generate import check_concepts, generate_concept, generate_swap
        from .models import load_model
        from .prompts import parse_swap

        swaps = [parse_swap(s) for s in getattr(args, "swap", [])]
        model = load_model(args.model, args.device)
        if getattr(args, "compile", False) or getattr(args, "channels_last", False):
            from .models import accelerate

            accelerate(model, compile=args.compile, channels_last=args.channels_last)
        print(f"model: {model.name} ({model.chosen_because})", file=sys.stderr)
        if len(args.concept) > 1 and (args.token or args.class_word):
            raise AlignITError("--token and --class-word name one bare embedding file; give each of several "
                               "concepts as a folder or manifest")
        concepts = [_concept(arg, model, args.token, args.class_word, args.lora_scale) for arg in args.concept]
        check_concepts(model, concepts)
        if args.command == "tokens":
            print(_tokens(model, args.prompt, concepts, args.long_prompt))
            return 0
        settings = from_args(args)
        if concepts:
            if swaps:
                raise AlignITError("--swap is for token-swap mode; with --concept use --positions")
            gen = generate_concept(model, args.prompt, concepts, settings, positions=args.positions,
                                   include_base=args.base)
        else:
            if args.positions or args.base:
                raise AlignITError("--positions and --base need --concept")
            gen = generate_swap(model, args.prompt, swaps, settings)
        for warning in gen.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        for path in write_outputs(gen, args.out):
            print(path)
        return 0
    except AlignITError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
