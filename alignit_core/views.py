"""What the demo shows of its inputs, computed without gradio: the page's texts, the swaps box and
the position boxes kept in step, the token view and its table, the p / p′ / swapped-rows text, the
concept card and pickers, the examples, the request the page's inputs make (the examples' cache
key), and how long a run may hold a ZeroGPU GPU.

Plain values in, plain values out (text, tuples, a DataFrame, HTML); `app.py` turns them into gradio
components and updates. `python -m alignit_core tokens` prints the same token table (`token_rows`).
What the demo shows of a generation (heat maps, the score table, the reproduce line): `result_views`.
"""
from __future__ import annotations

import html
import re
from dataclasses import dataclass, replace

import pandas as pd
from visualize import swap_diagram, token_chips

from .concepts import KIND_LABELS, SHORT_KIND_LABELS, Concept
from .errors import AlignITError, ConceptError, PromptError, short
from .generate import check_prompt, size_warning
from .prompts import Prompt, check_swaps, parse_swap
from .settings import Settings, resolve

PAPER = "https://arxiv.org/abs/2406.18893"
ALIGNIT, SWAP = "AlignIT (customized concept)", "Token swap"
# A concept without an example prompt starts from this one
DEFAULT_PROMPT = "a photo of a {token}"
# The paper's token swaps (Fig. 3/6/7) for Stable Diffusion and kin, the shapes world's for the embedded
# model: (prompt, swaps, label); the first is what a page without concepts starts with.
PAPER_SWAPS = [("a jumping dog", "dog=zebra", "a jumping dog · dog ← zebra"),
               ("banana in a white plate", "4=black", "banana in a white plate · position 4 (white) ← black")]
SHAPES_SWAPS = [("a red circle on a blue background", "red=yellow", "colour swap · red ← yellow"),
                ("a green square on a white background", "square=circle", "shape swap · square ← circle"),
                ("a blue star on a yellow background", "yellow=green", "background swap · yellow ← green"),
                ("a green triangle with a hole on a black background", "triangle=circle",
                 "shape swap, the hole kept · triangle ← circle")]
LABEL_CHARS = 60  # the page shows an example label up to its 60th character, then "..."
TABLE_COLUMNS = ["position", "segment", "local", "token of p", "word", "token of p′"]
# ZeroGPU lends a GPU for a stated time; a shorter claim is queued sooner, one too short is cut off.
# Per UNet evaluation of one 512x512 image: 13.5 ms measured on a whole H200 (SD 1.5, fp16, README),
# doubled for a ZeroGPU slice of one and again for margin; plus the set-up (weights onto the GPU,
# text encoding, decoding). Larger images cost in proportion to their pixels.
GPU_UNET_S = 0.05
GPU_SETUP_S = 15
GPU_MAX_S = 120


def header_markdown(model) -> str:
    if model.is_embedded and model.family.own_loop:
        about = (" — the shapes world's small SD3-architecture model (an MMDiT: text and image tokens attend "
                 "jointly, 8×8 image tokens at 128 px). A swap writes the swapped word's keys and values in every "
                 "block and step, from a side stream that carries p′ (README, \"SD3 and Flux\"). No concepts ship "
                 "for it: token swaps, or upload a textual-inversion file.")
    elif model.is_embedded:
        about = (" — a small offline model of a shapes world: coloured circles, squares, triangles and stars, plain, "
                 "striped or with a hole, on coloured backgrounds, 128 px. What AlignIT fixes on it: half of the "
                 "customized concepts ignore the asked background (drawn in 51-70 % of samples); AlignIT draws it in "
                 "94-100 %, keeping 0.9 of a textual inversion, under half of Custom Diffusion (README, toy Table 1).")
    else:
        about = ""
    return (
        "# AlignIT Studio\n"
        "AlignIT makes a customized text-to-image model follow the rest of the prompt: it generates with "
        "the **base** model on *p* (the concept token replaced by its class word) and, in every "
        "cross-attention layer, overwrites only the concept's key/value rows with those the **customized** "
        "model computes for a dummy prompt *p′* (all other tokens `*`). "
        "The same mechanism swaps any word for free: `a jumping dog` with dog's K/V from `* * zebra` "
        f"draws a jumping zebra. Paper: [Agarwal et al., arXiv 2406.18893]({PAPER}).\n\n"
        f"**Model:** `{model.name}` ({model.chosen_because}){about} Pick an example below: its result is shown "
        "at once, and every setting can then be changed."
    )


# The "What am I looking at?" box
WHAT = """\
**The images** start from the same noise. *Customized baseline*: the customized model alone, on the prompt
with the concept's token. *AlignIT*: the base model on *p* (the token replaced by its class word) whose
cross-attention takes, at the swapped positions only, the keys and values the customized model computes
for *p′* (every other word `*`): the concept comes from the customization, the rest of the prompt from the
base model. *Base model on p*: what the class word alone gives. In token-swap mode the same mechanism swaps
any word (*baseline* vs *swapped*).

**Kinds of concept.** *Textual inversion* learns only a new word's embedding; *Custom Diffusion* also
fine-tunes the cross-attention key/value weights; a *DreamBooth-LoRA* adds low-rank updates to the model.

**The heat maps** show where each word's cross-attention lands, each map scaled from its own minimum to its
own maximum (the colour bar); click a tile for a large map. **The MI score** in AlignIT mode scores *p*:
the class word, so the concept's own look counts against an image, not for it.
"""


def as_html(text: str) -> str:
    """`text` shown as written where HTML is rendered (toasts): `<striped-ball>` is not read as a tag,
    which hid it and everything after it."""
    return html.escape(str(text), quote=False)


def plain(text: str) -> str:
    """`text` shown as written in Markdown: no HTML tags (as `as_html`), and `*`, `_`, `|` do not turn
    into emphasis or table cells."""
    return re.sub(r"([\\`*_\[\]|])", r"\\\1", as_html(text))


def size_note(model, size) -> str:
    warning = size_warning(model, int(size))
    return f"**Note:** {plain(warning)}" if warning else ""


def map_resolutions(model, size) -> dict:
    """Choices and default of the heat-map resolution dropdown for images of `size` px."""
    size = int(size)
    return {"choices": [(f"{r}×{r}", r) for r in model.attention_resolutions(size)],
            "value": model.default_map_resolution(size)}


# ------------------------------------------------------------------------------ the swaps box

def parse_swaps(text: str) -> list[tuple[str | int, str]]:
    """The swaps box: one `word=source` or `pos=source` per line (or comma-separated)."""
    return [parse_swap(line) for line in _swap_lines(text)]


def _swap_lines(text: str) -> list[str]:
    """The swaps box's lines; PromptError when there are more than the engine takes, or a line is too long."""
    lines = [line.strip() for line in (text or "").replace(",", "\n").splitlines() if line.strip()]
    check_swaps(lines)
    return lines


def _line_positions(model, prompt: str, line: str, long: str = "segments") -> tuple[int, ...]:
    """Positions of p (the model's own token table) that one swap line writes to; a half-typed
    `pos=` line counts as `pos`; a line that names nothing in the prompt writes to none."""
    target = line.split("=", 1)[0].strip()
    try:
        return model.family.swap_plan(prompt, [parse_swap(line)], long).positions
    except AlignITError:
        return (int(target),) if target.isdigit() else ()


def swap_positions(model, prompt: str, swaps: str, long: str = "segments") -> list[int]:
    """Every position the swaps box currently writes to, sorted."""
    return sorted({p for line in _swap_lines(swaps) for p in _line_positions(model, prompt, line, long)})


def sync_swaps(model, prompt: str, swaps: str, selected: list[int], long: str = "segments") -> str:
    """The swaps box after the position checkboxes changed to `selected`: lines whose positions
    were all unchecked go, a `pos=` template comes for each newly checked position."""
    chosen = set(selected)
    kept, covered = [], set()
    for line in _swap_lines(swaps):
        positions = set(_line_positions(model, prompt, line, long))
        if positions and not positions & chosen:
            continue  # the user unchecked it
        kept.append(line)
        covered |= positions
    kept += [f"{pos}=" for pos in sorted(chosen - covered)]
    return "\n".join(kept)


# ------------------------------------------------------------------------------ the token view

@dataclass(frozen=True)
class TokenView:
    """What the token table shows for the current inputs."""

    p: Prompt | None  # the prompt the base model reads
    sources: tuple[tuple[str, Prompt], ...] = ()  # (whose, p′) when it can be built: one, or one per concept
    customized: Prompt | None = None  # AlignIT mode: the prompt as the customization reads it
    selected: tuple[int, ...] = ()  # positions pre-selected (concepts', or those the swaps write)
    problem: str = ""  # why no p′ could be built, in the engine's words

    @property
    def source(self) -> Prompt | None:
        return self.sources[0][1] if self.sources else None


def token_view(model, mode: str, prompt: str, concept: Concept | list[Concept] | None, swaps: str,
               long: str = "segments") -> TokenView:
    """Tokenize the current prompt for the table; never raises (the problem is shown instead).
    `concept`: one, or several in one prompt. `long`: how a prompt over 75 tokens is read (segments
    or truncate)."""
    try:
        text = check_prompt(prompt)
    except AlignITError as e:  # an empty box needs no warning; one too long does
        return TokenView(None, problem=str(e) if isinstance(prompt, str) and prompt.strip() else "")
    chosen = [concept] if isinstance(concept, Concept) else list(concept or [])
    try:
        if mode == ALIGNIT:
            if not chosen:
                return TokenView(model.family.prompt(text, long), problem="choose or upload a concept")
            if len(chosen) == 1:
                prompts = model.family.concept_plan(text, chosen[0].words, long)
                return TokenView(prompts.plan.target, (("", prompts.plan.source),), prompts.customized,
                                 prompts.plan.positions)
            several = model.family.several_concepts_plan(text, [c.words for c in chosen])
            return TokenView(several.plans[0].target, tuple((c.token, plan.source) for c, plan in zip(chosen, several.plans)),
                             several.customized, tuple(sorted(pos for plan in several.plans for pos in plan.positions)))
        p = model.family.prompt(text, long)
    except AlignITError as e:
        try:
            return TokenView(model.family.prompt(text, long), problem=str(e))
        except AlignITError:
            return TokenView(None, problem=str(e))
    try:  # only positions the checkboxes offer: `99=`, `0=` or a half-typed `12=` must not reach them
        selected = tuple(pos for pos in swap_positions(model, text, swaps, long) if pos in p.content)
    except AlignITError as e:  # too many swaps, or one too long
        return TokenView(p, problem=str(e))
    try:
        return TokenView(p, (("", model.family.swap_plan(text, parse_swaps(swaps), long).source),),
                         selected=selected)
    except AlignITError as e:
        return TokenView(p, selected=selected, problem=str(e) if _swap_lines(swaps) else "")


def token_rows(p: Prompt) -> list[tuple[int, int, int, str, str]]:
    """(position, segment counted from 1, position inside the segment, token, word) for each token of `p`:
    the token table of the demo and of `python -m alignit_core tokens`."""
    return [(t.position, segment + 1, local, t.text, t.word)
            for t in p.tokens for segment, local in [p.locate(t.position)]]


def token_table(view: TokenView) -> pd.DataFrame:
    """Position, segment, token of p and its word, and each p′'s token (a column per concept)."""
    columns = TABLE_COLUMNS[:-1] + [f"{TABLE_COLUMNS[-1]} ({whose})" if whose else TABLE_COLUMNS[-1]
                                    for whose, _ in view.sources or (("", None),)]
    if view.p is None:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    sources = [source.tokens for _, source in view.sources] or [[None] * len(view.p.tokens)]
    return pd.DataFrame([(*row, *(s[i].text if s[i] is not None else "" for s in sources))
                         for i, row in enumerate(token_rows(view.p))], columns=columns)


def position_choices(view: TokenView) -> list[tuple[str, int]]:
    """("pos: token", pos) for every position that can be swapped (not start or end)."""
    return [] if view.p is None else [(f"{view.p.tokens[i].position}: {view.p.tokens[i].text}", i)
                                      for i in view.p.content]


def swapped_rows(view: TokenView, selected) -> list[tuple[int, str, str]]:
    """(position, token of p, token of p′ it takes its keys and values from) for each selected position."""
    if view.p is None or not view.sources:
        return []
    out = []
    for pos in sorted(set(selected or ()) & set(view.p.content)):
        from_source = [source.tokens[pos].text for _, source in view.sources if pos < len(source.tokens)]
        out.append((pos, view.p.tokens[pos].text, next((t for t in from_source if t != "*"), "*")))
    return out


def prompts_markdown(view: TokenView, selected=None) -> str:
    """p, each p′, the rows that will be swapped (`selected`, default the view's) and any problem, in
    Markdown; a row that would take `*` from p′ is called out (that word is replaced by nothing)."""
    lines = []
    if view.customized is not None:
        lines.append(f"**customized prompt** (baseline): `{view.customized.text}`")
    if view.p is not None:
        lines.append(f"**p** (base model): `{view.p.text}`")
        if view.p.parts:
            lines.append(f"long prompt: {len(view.p.parts)} segments, each encoded on its own (LongAlign); "
                         f"positions count through all of them")
        if view.p.dropped:
            lines.append(f"**Note:** over 75 tokens: the model will not read `{view.p.dropped}` "
                         f"(choose segments under Advanced to keep it)")
    for whose, source in view.sources:
        lines.append(f"**p′**{f' of `{whose}`' if whose else ''} (K/V source): `{source.text}`")
    rows = swapped_rows(view, view.selected if selected is None else selected)
    if rows:
        lines.append("**swapped rows** (p ← p′): " + ", ".join(f"`{pos} {mine} ← {theirs}`"
                                                          for pos, mine, theirs in rows))
    emptied = [f"`{mine}` ({pos})" for pos, mine, theirs in rows if theirs == "*"]
    if emptied:
        lines.append(f"**Note:** {', '.join(emptied)} will take the keys and values of `*` from p′: "
                     f"{'that word is' if len(emptied) == 1 else 'those words are'} replaced by nothing and "
                     f"drop out of the image")
    if view.problem:
        lines.append(f"**Problem:** {plain(view.problem)}")
    return "  \n".join(lines)


def chips_html(view: TokenView, selected) -> str:
    if view.p is None:
        return ""
    return token_chips([(t.position, t.text) for t in view.p.tokens], set(selected or ()))


def diagram_html(view: TokenView, selected) -> str:
    """p over each p′, the swapped columns marked (the "what am I looking at" box)."""
    if view.p is None or not view.sources:
        return ""
    return swap_diagram([(t.position, t.text) for t in view.p.tokens],
                        [(f"p′ {whose}".strip(), [t.text for t in source.tokens]) for whose, source in view.sources],
                        set(selected or ()) & set(view.p.content))


# ------------------------------------------------------------------------------ concepts

def find_concept(concepts: dict, uploaded: dict, key) -> Concept | None:
    """The concept named `key`: a visitor's upload, else a shipped one; None for an unknown key."""
    return (uploaded or {}).get(key) or concepts.get(key)


def chosen_concepts(concepts: dict, uploaded: dict, key, second) -> list[Concept]:
    """The concept picked, and the second one when a second is picked too."""
    return [c for c in (find_concept(concepts, uploaded, key), find_concept(concepts, uploaded, second))
            if c is not None]


def concepts_asked(concepts: dict, uploaded: dict, key, second, kept_s: int) -> list[Concept]:
    """The concepts an AlignIT run asks for. Raises ConceptError for a name not known (or an upload no longer
    kept: uploads are kept for `kept_s` seconds), PromptError when none is picked."""
    for name in (key, second):
        if not name or find_concept(concepts, uploaded, name) is not None:
            continue
        if str(name).startswith("uploaded:"):
            raise ConceptError(f"the uploaded concept {short(name.removeprefix('uploaded:'))} is no longer "
                               f"kept (uploads are kept for {kept_s // 60} minutes); upload it again")
        raise ConceptError(f"unknown concept {short(str(name))!r}; available: "
                           f"{', '.join(list(concepts) + list(uploaded or {})) or 'none'}")
    chosen = chosen_concepts(concepts, uploaded, key, second)
    if not chosen:
        raise PromptError("choose or upload a concept first")
    return chosen


def starting_prompt(c: Concept) -> str:
    """The prompt a concept starts with: its example, else DEFAULT_PROMPT."""
    return c.example_prompt or DEFAULT_PROMPT.format(token=c.token)


def concept_card(c: Concept | None) -> tuple[str, list[str]]:
    """The concept's line (token, kind, class word, how the customized model reads it) and its reference images."""
    if c is None:
        return "No concept for this model yet: upload one below.", []
    phrase = c.phrase.format(token=c.token, class_word=c.class_word)
    info = (f"`{c.token}` · {KIND_LABELS[c.kind]} · class word `{c.class_word}` · "
            f"the customized model reads it as `{phrase}`")
    return info, [str(p) for p in c.references]


def concept_choices(concepts: dict, uploaded: dict) -> list[tuple[str, str]]:
    return ([(c.label, key) for key, c in concepts.items()] +
            [(f"{c.token} (uploaded) — {KIND_LABELS[c.kind]}, class '{c.class_word}'", key)
             for key, c in (uploaded or {}).items()])


def second_choices(concepts: dict, uploaded: dict) -> list[tuple[str, str]]:
    """The second-concept picker: none, or any concept (each is swapped from its own model)."""
    return [("none", "")] + concept_choices(concepts, uploaded)


def mode_switched(concepts, uploaded, mode, concept_key, prompt, swaps, drafts, swap_example):
    """The mode changed by hand: the prompt and swaps typed in the other mode are kept for when the
    visitor comes back, and this mode's own come back; a mode visited for the first time keeps the
    prompt when it fits and otherwise gets an example that does. Returns (prompt, swaps, drafts)."""
    drafts = {**(drafts or {}), (SWAP if mode == ALIGNIT else ALIGNIT): (prompt, swaps)}
    if mode in drafts:
        return (*drafts[mode], drafts)
    c = find_concept(concepts, uploaded, concept_key)
    tokens = [k.token for k in list(concepts.values()) + list((uploaded or {}).values())]
    if mode == SWAP and (not prompt or any(t in prompt for t in tokens)):
        return (*swap_example, drafts)
    if mode == ALIGNIT and c is not None and c.token not in (prompt or ""):
        return starting_prompt(c), swaps, drafts
    return prompt, swaps, drafts


# ------------------------------------------------------------------------------ examples and requests

def examples_for(model, concepts: dict) -> tuple[list[list], list[str]]:
    """The paper's experiments on the loaded model: [mode, concept, prompt, swaps, seed, second concept] rows and
    labels (of at most LABEL_CHARS); with two concepts of different tokens, one example holds both."""
    swaps = SHAPES_SWAPS if model.is_embedded else PAPER_SWAPS
    concept_key = next(iter(concepts), None)  # swap examples leave the concept picker on a valid choice
    rows = [[SWAP, concept_key, prompt, swap, 0, ""] for prompt, swap, _ in swaps]
    labels = [label for _, _, label in swaps]
    drawn = {key: [-r for r in reversed(c.example_rates or (0, 0))] for key, c in concepts.items()}  # -AlignIT, -customized
    shown = sorted(((key, c) for key, c in concepts.items() if c.example_prompt and example_works(c)),
                   key=lambda kc: (drawn[kc[0]][0], drawn[kc[0]][0] - drawn[kc[0]][1]))  # drawn most, then gained most
    for key, c in shown:  # the page opens on the first
        rows.append([ALIGNIT, key, c.example_prompt, "", c.example_seed, ""])
        rates = f" · {c.example_rates[0]:.0%} → {c.example_rates[1]:.0%}" if c.example_rates else ""
        label = f"AlignIT · {c.token} · {KIND_LABELS[c.kind]}{rates}"  # the kind named shorter where it is cut
        labels.append(label if len(label) <= LABEL_CHARS else f"AlignIT · {c.token} · {SHORT_KIND_LABELS[c.kind]}{rates}")
    pairs = [(a, b) for a, _ in shown for b in concepts if concepts[a].token != concepts[b].token]
    # kinds mixed first, then the second concept whose own example AlignIT, then its customized model, drew most
    pair = min(pairs, key=lambda ab: (concepts[ab[0]].kind == concepts[ab[1]].kind, *drawn[ab[1]]), default=None)
    if pair is not None:
        first, other = concepts[pair[0]], concepts[pair[1]]
        rows.append([ALIGNIT, pair[0], first.example_prompt.replace(first.token, f"{first.token} and a {other.token}", 1),
                     "", 0, pair[1]])
        labels.append(f"AlignIT · two concepts · {first.token} and {other.token}")
    return rows, labels


def example_works(c: Concept) -> bool:
    """An AlignIT example is offered where AlignIT draws the concept and the rest of the prompt in most
    seeds and more often than the customized model (`Concept.example_rates`, measured by the toy Table 1),
    or where that was not measured (a user's concepts, Stable Diffusion's)."""
    return c.example_rates is None or (c.example_rates[1] > 0.5 and c.example_rates[1] > c.example_rates[0])


@dataclass(frozen=True)
class PageRequest:
    """What a generation depends on: equal requests give equal generations (the examples' key)."""

    mode: str
    concepts: tuple[str, ...]  # AlignIT mode: the concepts' names
    prompt: str
    positions: tuple | None  # AlignIT mode: positions ticked other than the concepts' own; None: their own
    swaps: tuple[tuple[str | int, str], ...]  # token-swap mode
    settings: Settings  # resolved
    include_base: bool


def read_request(model, registry, uploaded, mode, concept_key, prompt, positions, swaps, settings: Settings,
                 include_base, second_concept="", typed=False) -> PageRequest:
    """The request the page's inputs make; positions equal to the concepts' own count as none (the default),
    and so do, when `typed` (Enter right after typing: the box may hold the last prompt's ticks), ticks without
    this prompt's concept positions. Raises AlignITError for input the engine would refuse."""
    text = check_prompt(prompt)
    if mode == ALIGNIT:
        chosen = chosen_concepts(registry, uploaded, concept_key, second_concept)
        own = token_view(model, mode, text, chosen, "", settings.long_prompt).selected
        picked = () if typed and not set(own) <= set(positions or ()) else tuple(positions or ())
        return PageRequest(mode, tuple(c.name for c in chosen), text, None if not picked or set(picked) == set(own)
                       else picked, (), resolve(model, settings), bool(include_base))
    return PageRequest(mode, (), text, None, tuple(parse_swaps(swaps)), resolve(model, settings), False)


def example_requests(model, registry: dict, rows: list[list], defaults: Settings) -> list[PageRequest]:
    """The examples' requests as the page sends them (every other control at its default)."""
    keys = []
    for mode, concept_key, prompt, swaps, seed, second in rows:
        try:
            keys.append(read_request(model, registry, {}, mode, concept_key, prompt, None, swaps,
                                     replace(defaults, seed=seed), False, second))
        except AlignITError:  # an example the model cannot run is kept out, not cached
            continue
    return keys


def gpu_seconds(mode: str, concepts: list, prompt: str, settings: Settings, positions, swaps, include_base: bool,
                progress=None) -> int:
    """How long a generation may hold a ZeroGPU GPU: the set-up, plus one UNet evaluation per image
    row, CFG half and step, in proportion to the image's pixels (settings already resolved)."""
    rows = 1 + (mode == ALIGNIT and bool(include_base)) + 1
    evaluations = 2 * rows * settings.steps * (settings.size / 512) ** 2
    return min(GPU_MAX_S, round(GPU_SETUP_S + GPU_UNET_S * evaluations))

