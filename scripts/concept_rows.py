"""Where does a concept live in the conditioning? Swap groups of rows between the customized
prompt and the base model's prompt and see which carry the novel instance.

    python scripts/concept_rows.py                    # every concept, 16 seeds
    python scripts/concept_rows.py --seeds 32 --noise-seed 1 --only holed-star-te   # held-out seeds, one concept

For each textual-inversion and text-encoder concept (their UNet is the base model's, so only the 77
conditioning rows differ), `a photo of a <token>` is drawn from five conditionings, each judged by the pixel
classifier (`evaluate.fidelity`): the customized prompt; it with the rows after the token (end of
text and padding) taken from the base prompt `a photo of a <class word>`; the base prompt with only
the token's row from the customized prompt; AlignIT (the base prompt with the token's row from
`* * * * <token>`); and the base prompt with the token's and all later rows from the customized one.
The last column counts, among the seeds whose customized prompt draws the instance, those where
each conditioning draws it too (same noise). Guidance is the engine's: the customized prompt against the empty
prompt through the concept's own text encoder (a fine-tune's), every conditioning built on the base prompt
against the base encoder's.

A Custom Diffusion concept differs in the UNet's cross-attention key/value weights, not in the rows, so
its rows are the engine's (one seed at a time): the customized model on `a photo of a <token> <class word>`;
AlignIT, the base model on `a photo of a <class word>` with the class word's keys and values from the
customized model's `* * * <token> <class word>`; AlignIT with the start of text's row, the token's row or the
end rows from there too (which of the rows AlignIT leaves as p's hold the instance); the class word's keys and
values from `* * * * <token>` instead (the token alone, as target (1) words it); and the base model alone.

`--table1-prompts` asks where a text-side concept's fidelity goes on Table 1's own prompts (`a <token> on a
blue background`, ...): text alignment and fidelity of the customized prompt, AlignIT (`p` with the token's
row from `p'`), AlignIT with the rows after the last word (end of text, padding) also from `p'`, AlignIT with
them from the customized prompt, and the base model on `p`; for each, how often the instance's colour and its
pattern are drawn. For Custom Diffusion, from the engine (one seed at a time): the customized model, AlignIT,
AlignIT with more of `p'`'s rows (the token's; the token's, start of text's and end rows), `p` through the
customized keys and values with the class word's row from `p'` and without it, and the base model.

`--reads` asks where the object's pixels read the prompt: on `a photo of a <class word> on a {b} background`
(four backgrounds), the base model's and each Custom Diffusion concept's share of the object pixels' cross-attention
that goes to each group of rows (the start of text; the words that draw nothing, `a photo of a` and `on a`; the class
word; the background's words; the end rows), per latent side, and for Custom Diffusion the share of its value change
(customized minus base projection of each row, weighted by that attention) that reaches the object through each group.
AlignIT takes only the class word's row from the customized model: what reaches the object through the others is lost.

`--colour-row` asks whether the class word's row after a word carries that word (the row AlignIT takes for a
Custom Diffusion concept): the base model on `a photo of a <shape> on a <background> background` with the shape
word's row from `* * * <colour> <shape>`, how often the colour is drawn (eight cases).

`--levels` asks at which resolution the UNet reads a text-side concept: `a photo of a <token>` drawn with the
base prompt's rows at every cross-attention layer but some, where the layer reads rows of the customized prompt
instead (the token's row, the end rows, or both), at every level, at the 16x16 layers only, or at the 8x8 and
4x4 ones only.
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from alignit_core import find_concepts, generate_swap, load_model, positions_plan, read_prompt
from alignit_core.concepts import KIND_LABELS
from alignit_core.encoding import encode
from alignit_core.families.sd_unet import cross_attention_sides
from alignit_core.conditioning import Row
from alignit_core.generate import run_rows
from alignit_core.settings import Settings, resolve
from alignit_core.toy.evaluate import fidelity, fidelity_parts, table1_prompts
from alignit_core.toy.instances import INSTANCES
from alignit_core.toy.sampling import MAX_LEN, load_exported, sample
from alignit_core.toy.shapes import classify, object_mask

ROOT = Path(__file__).resolve().parents[1]


def splice(base: torch.Tensor, rows: torch.Tensor, start: int, stop: int = MAX_LEN) -> torch.Tensor:
    """`base`'s conditioning rows, (1, 77, dim), with rows [start, stop) from `rows`."""
    return torch.cat([base[:, :start], rows[:, start:stop], base[:, stop:]], 1)


def unconditional_encoder(label: str, custom_te, te):
    """The text encoder of a conditioning's empty prompt, as the engine guides: the concept's own (a fine-tune's)
    for a customized prompt (a label starting `customized`), the base one for every conditioning built on `p`."""
    return custom_te if label.startswith("customized") else te


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--noise-seed", type=int, default=0,
                    help="another set of seeds (held out from README's tables and the tests): the seed of "
                         "the batch's noise generator, and Custom Diffusion's first engine seed")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=10.0)
    ap.add_argument("--assets", type=Path, default=ROOT / "assets",
                    help="a folder holding embedded-shapes/ and concepts/ (what train_embedded.py --out wrote)")
    ap.add_argument("--only", nargs="+", help="concept folder names to measure (default: all)")
    ap.add_argument("--levels", action="store_true",
                    help="text-side concepts: the customized rows read at some cross-attention levels only")
    ap.add_argument("--table1-prompts", action="store_true",
                    help="every concept on Table 1's prompts: a text-side one with the end-of-text rows from p' "
                         "or the customized prompt, Custom Diffusion with more of p's rows or weights customized")
    ap.add_argument("--reads", action="store_true",
                    help="where the object's pixels read the prompt (attention per group of rows), base model and "
                         "each Custom Diffusion, and through which rows Custom Diffusion's value change reaches it")
    ap.add_argument("--colour-row", action="store_true",
                    help="the base model alone: how often the class word's row from `* * * <colour> <shape>` makes "
                         "`a photo of a <shape> on a <background> background` draw that colour")
    args = ap.parse_args(argv)
    folder = args.assets / "embedded-shapes"
    if args.colour_row:
        colour_row(load_model(str(folder), device="cpu"), args)
        return
    # on the CPU where a GPU is present too: its noise (and so every seed) is README's, and the concepts'
    # text encoders sit beside the rows they are spliced into
    vae, unet, te, scale = load_exported(folder, torch.device("cpu"))
    model = load_model(str(folder), device="cpu")
    tok = model.tokenizer

    def ids(text: str) -> torch.Tensor:
        return torch.tensor([tok(text, padding="max_length", max_length=MAX_LEN).input_ids])

    if args.reads:
        reads(model, (vae, unet, te, scale), ids, args)
        return
    if args.table1_prompts:
        print("| concept | kind | conditioning | text alignment | fidelity | its colour | its pattern | n |")
        print("|---|---|---|---|---|---|---|---|")
    else:
        print("| concept | kind | conditioning | instance drawn | where the customized prompt draws it |")
        print("|---|---|---|---|---|")
    for concept in find_concepts(args.assets / "concepts", model):
        if args.only and concept.name not in args.only:
            continue
        inst = INSTANCES[concept.token.strip("<>")]
        if concept.kind == "custom_diffusion" and not args.levels:
            (weights_table1 if args.table1_prompts else weights_rows)(model, concept, inst, args)
            continue
        if concept.kind not in ("textual_inversion", "text_encoder"):
            continue
        vec = concept.vectors[0][0].float().view(1, 1, -1).expand(1, MAX_LEN, -1)
        custom_te = concept.text_encoders[0].float() if concept.text_encoders else te
        if args.table1_prompts:
            end_rows(concept, inst, vec, custom_te, (vae, unet, te, scale), ids, args)
            continue
        if args.levels:
            level_rows(concept, inst, vec, custom_te, (vae, unet, te, scale), ids, args)
            continue
        pos = 5  # the token's row in `a photo of a <token>` and in `* * * * <token>`

        def with_token(text: str) -> torch.Tensor:
            mask = torch.zeros(1, MAX_LEN, dtype=torch.bool)
            mask[0, pos] = True
            return encode(custom_te, ids(text.replace(concept.token, "*")), vec, mask).hidden

        with torch.no_grad():
            custom = with_token(f"a photo of a {concept.token}")
            dummy = with_token(f"* * * * {concept.token}")
            base = encode(te, ids(f"a photo of a {inst['class_word']}")).hidden
        variants = {
            "customized prompt": custom,
            "customized, rows after the token from the base prompt": splice(base, custom, 0, pos + 1),
            "base prompt, the token's row from the customized prompt": splice(base, custom, pos, pos + 1),
            "AlignIT: base prompt, the token's row from `* * * * <token>`": splice(base, dummy, pos, pos + 1),
            "base prompt, the token's and later rows from the customized prompt": splice(base, custom, pos),
        }
        drawn = None  # per seed, by the customized prompt (the first variant)
        for label, cond in variants.items():
            empty = unconditional_encoder(label, custom_te, te)
            images = sample(vae, unet, empty, scale, cond.expand(args.seeds, -1, -1), args.guidance, args.noise_seed, args.steps)
            drawn = report(concept, inst, label, images, drawn)


def report(concept, inst, label, images, drawn: list[bool] | None) -> list[bool]:
    """Print one table row: how many images draw the instance, and how many of the seeds in `drawn`
    (those where the customized prompt drew it; None: these images are the customized prompt's)."""
    hits = [fidelity(classify(im), inst["scene"]) for im in images]
    drawn = hits if drawn is None else drawn
    kept = sum(h and d for h, d in zip(hits, drawn))
    print(f"| {concept.token} | {KIND_LABELS[concept.kind]} | {label} | {sum(hits)} / {len(hits)} | "
          f"{kept} / {sum(drawn)} |", flush=True)
    return drawn


def end_rows(concept, inst, vec, custom_te, parts, ids, args) -> None:
    """Table 1's prompts, raw conditioning: which rows hold what AlignIT loses of a text-side concept."""
    vae, unet, te, scale = parts
    scene = inst["scene"]
    labels = ("customized prompt", "AlignIT: `p`, the token's row from `p'`",
              "AlignIT, and the rows after the last word from `p'`",
              "AlignIT, and the rows after the last word from the customized prompt", "base model on `p`")
    judged = {k: [] for k in labels}
    for prompt, background in table1_prompts(concept, scene):
        words = prompt.split()
        pos, end = words.index(concept.token) + 1, len(words) + 1  # the token's row; the end of text's
        mask = torch.zeros(1, MAX_LEN, dtype=torch.bool)
        mask[0, pos] = True
        with torch.no_grad():
            custom = encode(custom_te, ids(" ".join("*" if w == concept.token else w for w in words)), vec, mask).hidden
            dummy = encode(custom_te, ids(" ".join(["*"] * len(words))), vec, mask).hidden
            base = encode(te, ids(" ".join(inst["class_word"] if w == concept.token else w for w in words))).hidden
        alignit = splice(base, dummy, pos, pos + 1)
        conds = (custom, alignit, splice(alignit, dummy, end), splice(alignit, custom, end), base)
        for label, cond in zip(labels, conds):
            empty = unconditional_encoder(label, custom_te, te)
            for image in sample(vae, unet, empty, scale, cond.expand(args.seeds, -1, -1), args.guidance, args.noise_seed, args.steps):
                judged[label].append(judge(classify(image), background, scene))
    for label in labels:
        table1_row(concept, label, judged[label])


def judge(j, background: str, scene) -> tuple[bool, bool, bool, bool]:
    """(the asked background drawn, the instance drawn, its colour, its pattern) of one picture."""
    parts = fidelity_parts(j, scene)
    return j.background == background, all(parts.values()), parts["colour"], parts["pattern"]


def table1_row(concept, label: str, judged: list) -> None:
    means = " | ".join(f"{m:.2f}" for m in np.mean(judged, 0))
    print(f"| {concept.token} | {KIND_LABELS[concept.kind]} | {label} | {means} | {len(judged)} |", flush=True)


def weights_table1(model, concept, inst, args) -> None:
    """Custom Diffusion on Table 1's prompts, from the engine: which of the customized model's rows and
    weights AlignIT's picture needs to keep the instance. The customized model; AlignIT (`p`, the class word's
    keys and values from `p'`); AlignIT with the token's row too (over the word before the class word); and
    with the start of text's and the end rows too; `p` with the customized model's keys and values on every
    row and the class word's from `p'`; the customized model on `p` without a swap; the base model on `p`."""
    scene, labels = inst["scene"], {
        "customized": "customized prompt", "class": "AlignIT: `p`, the class word's row from `p'`",
        "concept": "AlignIT, and the token's row from `p'`",
        "every": "AlignIT, and the token's, start of text's and end rows from `p'`",
        "weights": "`p` through the customized keys and values, the class word's row from `p'`",
        "plain": "`p` through the customized keys and values, no swap", "base": "base model on `p`"}
    judged = {k: [] for k in labels}
    for seed in range(args.noise_seed, args.noise_seed + args.seeds):
        settings = resolve(model, Settings(seed=seed, steps=args.steps, guidance=args.guidance, record_maps=False))
        for prompt, background in table1_prompts(concept, scene):
            prompts = model.family.concept_plan(prompt, concept.words)
            plan, end = prompts.plan, len(prompts.plan.target.ids) - 1
            token, every = plan.unstarred(), (0, *plan.unstarred(), *range(end, MAX_LEN))
            rows = [Row("customized", prompts.customized, concept=concept),
                    Row("class", plan.target, swap=plan, swap_concept=concept),
                    Row("concept", plan.target, swap=replace(plan, positions=token), swap_concept=concept),
                    Row("every", plan.target, swap=replace(plan, positions=every), swap_concept=concept),
                    Row("weights", plan.target, concept=concept, swap=plan, swap_concept=concept),
                    Row("plain", plan.target, concept=concept), Row("base", plan.target)]
            for row, image in zip(rows, run_rows(model, rows, settings)[0]):
                judged[row.name].append(judge(classify(np.asarray(image)), background, scene))
    for name, label in labels.items():
        table1_row(concept, label, judged[name])


class LevelRows:
    """A cross-attention processor that reads `rows` (n, 77, dim) instead of the conditional half of
    the batch it is given (classifier-free guidance: [unconditional, conditional]) when set."""

    def __init__(self, inner):
        self.inner, self.rows = inner, None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kwargs):
        if self.rows is not None:
            encoder_hidden_states = torch.cat([encoder_hidden_states[:len(self.rows)], self.rows.to(encoder_hidden_states)])
        return self.inner(attn, hidden_states, encoder_hidden_states, **kwargs)


def level_processors(unet) -> dict[int, list[LevelRows]]:
    """One LevelRows on every cross-attention layer, grouped by the latent side it works at (16, 8, 4)."""
    levels: dict[int, list[LevelRows]] = {}
    for _, side, module in cross_attention_sides(unet):
        proc = module.processor  # installed once, for every concept
        if not isinstance(proc, LevelRows):
            proc = LevelRows(proc)
            module.set_processor(proc)
        levels.setdefault(side, []).append(proc)
    return levels


def level_rows(concept, inst, vec, custom_te, parts, ids, args) -> None:
    """`a photo of a <token>`: the base prompt's rows, and at some levels the customized prompt's."""
    vae, unet, te, scale = parts
    pos = 5  # the token's row
    mask = torch.zeros(1, MAX_LEN, dtype=torch.bool)
    mask[0, pos] = True
    with torch.no_grad():
        custom = encode(custom_te, ids("a photo of a *"), vec, mask).hidden
        base = encode(te, ids(f"a photo of a {inst['class_word']}")).hidden
    token, end, both = splice(base, custom, pos, pos + 1), splice(base, custom, pos + 1), splice(base, custom, pos)
    levels = level_processors(unet)
    fine, coarse = [s for s in levels if s == max(levels)], [s for s in levels if s != max(levels)]
    variants = {
        "customized prompt": dict.fromkeys(levels, custom),
        "base prompt": {},
        "the token's row from the customized prompt, every level": dict.fromkeys(levels, token),
        "the end rows from the customized prompt, every level": dict.fromkeys(levels, end),
        "the token's and end rows from the customized prompt, every level": dict.fromkeys(levels, both),
        "the token's and end rows, at the 16x16 layers only": dict.fromkeys(fine, both),
        "the token's and end rows, at the 8x8 and 4x4 layers only": dict.fromkeys(coarse, both),
    }
    drawn = None
    try:
        for label, rows in variants.items():
            for side, procs in levels.items():
                for proc in procs:
                    proc.rows = rows[side].expand(args.seeds, -1, -1) if side in rows else None
            empty = unconditional_encoder(label, custom_te, te)
            images = sample(vae, unet, empty, scale, base.expand(args.seeds, -1, -1), args.guidance, args.noise_seed, args.steps)
            drawn = report(concept, inst, label, images, drawn)
    finally:
        for procs in levels.values():
            for proc in procs:
                proc.rows = None


def weights_rows(model, concept, inst, args) -> None:
    """The rows of a concept that lives in the UNet's weights (Custom Diffusion), from the engine: the
    customized model on `a photo of a <token> <class word>`; AlignIT, the base model on `a photo of a
    <class word>` with the class word's keys and values from the customized model's `* * * <token>
    <class word>`; AlignIT with one more group of rows from there (the start of text, which every
    prompt shares; the token's, written over the `a` before the class word; the end of text and
    padding), which AlignIT as the paper defines it leaves as p's; the class word's keys and values from
    `* * * * <token>` instead (the token alone at the class word's position, the row target (1) names); and
    the base model alone."""
    prompts = model.family.concept_plan(f"a photo of a {concept.token}", concept.words)
    plan = prompts.plan
    (cls,) = plan.positions
    end = len(plan.target.ids) - 1
    more = {"start": (0, cls), "token": (cls - 1, cls), "end": (cls, *range(end, MAX_LEN))}
    rows = [Row("customized", prompts.customized, concept=concept), Row("alignit", plan.target, swap=plan, swap_concept=concept)]
    rows += [Row(k, plan.target, swap=replace(plan, positions=v), swap_concept=concept) for k, v in more.items()]
    alone = model.family.concept_plan(f"a photo of a {concept.token}", replace(concept.words, phrase="{token}")).plan
    rows.append(Row("alone", plan.target, swap=alone, swap_concept=concept))
    rows.append(Row("base", plan.target))
    hits = {row.name: [] for row in rows}
    for seed in range(args.noise_seed, args.noise_seed + args.seeds):
        settings = resolve(model, Settings(seed=seed, steps=args.steps, guidance=args.guidance, record_maps=False))
        for row, image in zip(rows, run_rows(model, rows, settings)[0]):
            hits[row.name].append(fidelity(classify(np.asarray(image)), inst["scene"]))
    drawn = hits["customized"]
    labels = {"customized": "customized prompt",
              "alignit": "AlignIT: base prompt, the class word's keys and values from the customized model "
                         "on `* * * <token> <class>`",
              "start": "AlignIT, and the start of text's row from there",
              "token": "AlignIT, and the token's row from there (over the `a` before the class word)",
              "end": "AlignIT, and the rows after the class word (end of text, padding) from there",
              "alone": "the class word's keys and values from `* * * * <token>` instead (the token alone)",
              "base": "base model on the base prompt"}
    for row, label in labels.items():
        kept = sum(h and d for h, d in zip(hits[row], drawn))
        print(f"| {concept.token} | {KIND_LABELS[concept.kind]} | {label} | {sum(hits[row])} / {args.seeds} | "
              f"{kept} / {sum(drawn)} |", flush=True)


READ_GROUPS = ("start of text", "`a photo of a`, `on a`", "class word", "background's words", "end rows")


class ReadProbe:
    """Cross-attention as diffusers' plain processor computes it; while `state["on"]`, it adds the object
    pixels' share of attention per row group and, given `base` (the base model's layer), the norm of the
    value change of each row weighted by that attention, to `state["totals"][side]` (with a count)."""

    def __init__(self, side: int, base, state: dict):
        self.side, self.base, self.state = side, base, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        b, n, _ = hidden_states.shape
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        values = attn.to_v(encoder_hidden_states)
        probs = attn.get_attention_scores(q, attn.head_to_batch_dim(attn.to_k(encoder_hidden_states)), None)
        st = self.state
        if st["on"] and st["masks"][self.side].any():
            share = probs.view(b, attn.heads, n, -1).mean(1)[-1][st["masks"][self.side]].mean(0)  # conditional: (77,)
            change = (values[-1] - self.base.to_v(encoder_hidden_states[-1])).norm(dim=-1) if self.base else None
            tot = st["totals"].setdefault(self.side, np.zeros((2, len(READ_GROUPS) + 1)))
            tot[0, -1] += 1  # (layer, step, picture) probed
            for g, rows in enumerate(st["groups"]):
                tot[0, g] += float(share[rows].sum())
                if change is not None:
                    tot[1, g] += float((share * change)[rows].sum())
        out = attn.batch_to_head_dim(torch.bmm(probs, attn.head_to_batch_dim(values)))
        return attn.to_out[1](attn.to_out[0](out))


def reads(model, parts, ids, args) -> None:
    """`--reads`: the object pixels' attention per group of rows at steps 4, 10 and 16 of 20 (as many
    of `args.steps`), over `args.seeds` seeds x four of Table 1's backgrounds, for the base model and
    each Custom Diffusion concept, on `a photo of a <class word> on a {b} background`."""
    vae, unet, te, scale = parts
    base_layers = {name: m for name, _, m in cross_attention_sides(unet)}
    print("| concept | model | side | what | " + " | ".join(READ_GROUPS) + " | n |")
    print("|---|---|---|---|" + "---|" * (len(READ_GROUPS) + 1))
    for concept in find_concepts(args.assets / "concepts", model):
        if concept.kind != "custom_diffusion" or (args.only and concept.name not in args.only):
            continue
        custom = copy.deepcopy(unet)
        weights = custom.state_dict()
        for name, edit in concept.unet.items():
            weights[f"{name}.weight"] = edit.weight.float()
            if edit.bias is not None:
                weights[f"{name}.bias"] = edit.bias.float()
        custom.load_state_dict(weights)
        backgrounds = [b for _, b in table1_prompts(concept, INSTANCES[concept.token.strip("<>")]["scene"])][:4]
        for label, net in (("base model", unet), ("Custom Diffusion", custom)):
            state = {"on": False, "totals": {}, "masks": {}, "groups": ()}
            for name, side, module in cross_attention_sides(net):
                module.set_processor(ReadProbe(side, base_layers[name] if net is custom else None, state))
            n = 0
            for b in backgrounds:
                text = f"a photo of a {concept.class_word} on a {b} background"
                prompt = ids(text)
                if len(model.tokenizer(text).input_ids) != 11:  # one token a word: the groups are positions
                    raise ValueError(f"{text!r} is not one token a word")
                state["groups"] = ([0], [1, 2, 3, 4, 6, 7], [5], [8, 9], list(range(10, MAX_LEN)))
                rows = encode(te, prompt).hidden
                n += sum(read_once(net, (vae, te, scale), rows, seed, args, state)
                         for seed in range(args.noise_seed, args.noise_seed + args.seeds))
            for side, tot in sorted(state["totals"].items(), reverse=True):
                print(f"| {concept.token} | {label} | {side}x{side} | attention of the object's pixels | "
                      + " | ".join(f"{x / tot[0, -1]:.2f}" for x in tot[0, :-1]) + f" | {n} |")
                if net is custom:
                    print(f"| {concept.token} | {label} | {side}x{side} | its value change reaching them | "
                          + " | ".join(f"{x / max(tot[1, :-1].sum(), 1e-12):.2f}" for x in tot[1, :-1]) + f" | {n} |")


COLOUR_ROW_CASES = [("star", "orange", "green"), ("circle", "red", "yellow"), ("square", "purple", "white"),
                    ("triangle", "blue", "red"), ("star", "white", "blue"), ("circle", "green", "black"),
                    ("square", "yellow", "blue"), ("triangle", "black", "white")]


def colour_row(model, args) -> None:
    """Does the row AlignIT takes for a Custom Diffusion concept (the class word's, computed after the word before
    it) carry what that word says? The engine's swap of the class word's row alone, from `* * * <colour> <shape>`
    into `a photo of a <shape> on a <background> background`: the colour drawn, against the base model on `p`."""
    hits = {"swapped": 0, "baseline": 0}
    n = 0
    for shape, colour, background in COLOUR_ROW_CASES:
        text = f"a photo of a {shape} on a {background} background"
        plan = positions_plan(read_prompt(model.tokenizer, text),
                              read_prompt(model.tokenizer, f"* * * {colour} {shape} * * * *"), [5])
        for seed in range(args.noise_seed, args.noise_seed + args.seeds):
            gen = generate_swap(model, text, plan=plan, settings=Settings(seed=seed, steps=args.steps,
                                                                         guidance=args.guidance, record_maps=False))
            n += 1
            for row in hits:
                hits[row] += classify(np.asarray(gen.images[row])).colour == colour
    print(f"the class word's row from `* * * <colour> <shape>` draws that colour: {hits['swapped']} / {n}; "
          f"the base model on `p` draws it: {hits['baseline']} / {n}")


@torch.no_grad()
def read_once(net, parts, rows, seed: int, args, state: dict) -> int:
    """Draw one picture twice from `seed` (`sample`'s loop): first to find the object's pixels, then with
    the probes on at steps 4, 10 and 16 of 20 (scaled to `args.steps`). 1 if an object was drawn (and
    counted), else 0."""
    vae, te, scale = parts
    mask = torch.from_numpy(object_mask(sample(vae, net, te, scale, rows, args.guidance, seed, args.steps)[0]))
    if mask.float().mean() < 0.02:
        return 0
    state["masks"] = {side: F.adaptive_avg_pool2d(mask.float()[None, None], side).flatten() > 0.5
                      for side in (16, 8, 4)}
    probed, step = {round(k * args.steps / 20) for k in (4, 10, 16)}, iter(range(args.steps))

    def count(*_):  # one UNet call a step (guidance batches both halves)
        state["on"] = next(step) in probed

    hook = net.register_forward_pre_hook(count)
    try:
        sample(vae, net, te, scale, rows, args.guidance, seed, args.steps)
    finally:
        hook.remove()
        state["on"] = False
    return 1


if __name__ == "__main__":
    main()
