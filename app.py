"""AlignIT Studio: the browser demo. Layout and event wiring only.

    python app.py [--model auto|embedded|embedded-mmdit|FOLDER|HUB_ID] [--port 7860] [--host 127.0.0.1] [--share]

All tensor work goes through `alignit_core`, all drawing through `visualize`. What the page shows is
computed without gradio in `alignit_core.views` (token view, swaps box, concepts, examples) and
`alignit_core.result_views` (heat maps, scores); here it becomes components and updates. The only
state shared between visitors is the model and the concept registry, loaded once in `main`; concepts
a visitor uploads and the last generation live in that visitor's `gr.State`, for STATE_TTL_S.
"""
from __future__ import annotations

import argparse
import inspect
import os
import random
import threading
import typing
import uuid
import weakref
from functools import partial, wraps
from pathlib import Path

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported
# Two generations share the CPU cores: idle OpenMP threads must sleep, not spin (spinning made CPU
# requests 10-100x slower under contention). Read when torch loads, so before it is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import gradio as gr  # noqa: E402

try:  # ZeroGPU's decorator: on a ZeroGPU Space it lends a GPU per call; the package exists only on Spaces
    import spaces  # noqa: E402
except ImportError:
    spaces = None

from alignit_core import (AlignITError, Concept, ConceptError, Generation, Settings, find_concepts,  # noqa: E402
                          PromptError, generate_concept, generate_swap, load_concept, load_model)
from alignit_core.concepts import MAX_EMBEDDING_BYTES  # noqa: E402
from alignit_core.generate import check_prompt  # noqa: E402
from alignit_core.maps import MAPS_FILE  # noqa: E402
from alignit_core.memory import limit_arenas, release_memory  # noqa: E402
from alignit_core.models import ASSETS, EMBEDDED, EMBEDDED_MMDIT, SD15, accelerate  # noqa: E402
from alignit_core.record import CAPTIONS, write_outputs  # noqa: E402
from alignit_core.result_views import (MapView, before_after, big_map, caption, clicked_map, cli_command,  # noqa: E402
                                       download_prefix, heatmap_rows, large_map_pick, mi_rows, score_seconds,
                                       scores_markdown)
from alignit_core.scores import AlignmentReport, load_clip, open_images, score_generation  # noqa: E402
from alignit_core.settings import MAP_BLOCKS, MAX_GUIDANCE, MAX_SEED, resolve  # noqa: E402
from alignit_core.views import (ALIGNIT, SWAP, TABLE_COLUMNS, WHAT, PageRequest, as_html, chips_html,  # noqa: E402
                                chosen_concepts, concept_card, concept_choices, concepts_asked, diagram_html,
                                example_requests, examples_for, find_concept, gpu_seconds, header_markdown,
                                map_resolutions, mode_switched, position_choices, prompts_markdown, read_request,
                                second_choices, size_note, starting_prompt, sync_swaps, token_table,
                                token_view)
from visualize import SCALE_NOTE  # noqa: E402

CONCEPTS_DIR = ASSETS / "concepts"
# The largest upload, refused while it streams in: a DreamBooth-LoRA (SD 1.5's of rank 128 with its text
# encoder is 151 MB, SDXL's of rank 32 with both 228-255 MB). A textual-inversion file is a few KB, and
# the engine refuses one over 1 MiB (MAX_EMBEDDING_BYTES); either is judged by its header before any of
# it is read.
MAX_UPLOAD_BYTES = 256 * 2**20
# Uploaded LoRAs stay in their visitors' sessions (STATE_TTL_S); all of them together may come from at
# most this many bytes of files (each in memory once or twice its file, by the model's number type).
# Past it a LoRA upload is refused until others expire.
LORA_UPLOADS_HELD_BYTES = 2**30
QUEUE = dict(max_size=16, default_concurrency_limit=2)  # sixteen waiting; two at once of each other event
# Generations and scores run in one concurrency group: two of them at once in all, so that they
# share the cores two ways, not four.
HEAVY = dict(concurrency_id="generation", concurrency_limit=2)
# The token table follows every keystroke; a few at once keep it quick without letting a flood of
# them crowd out the generations.
TOKEN_VIEWS = dict(concurrency_id="tokens", concurrency_limit=2)
# Generate brings the results into view when they are below it (two screens down on a laptop, one on a
# phone), so that the progress shows where the images come; a visitor who scrolled to them stays there.
# (An example, just above the results, needs none; there a `js` step let the run read the page's old values.)
SHOW_RESULTS = """() => { const r = document.getElementById("results");
    if (r && r.getBoundingClientRect().top > window.innerHeight) r.scrollIntoView({behavior: "smooth"}); }"""
# How long a visitor's uploaded concepts, last generation and scores are kept after they were last
# set, and for how many visitors at most (the least recently active go first). Gradio would keep ten
# thousand sessions, each its generation and a 130 KB copy of the page's settings.
STATE_TTL_S = 1800
SESSIONS = 500
# Memory arenas malloc keeps for the server's threads (glibc: eight per core otherwise): freed memory
# spread over fewer arenas is more of it given back by release_memory.
ARENAS = 2
MAX_COLUMNS = 3  # customized baseline | AlignIT | base
ROWS = {ALIGNIT: ("customized", "alignit", "base"), SWAP: ("baseline", "swapped")}
MAP_VIEWS = [("words", "words"), ("positions (tokens)", "positions")]
LONG_CHOICES = [("segments (LongAlign): every word kept", "segments"), ("truncate at 75 tokens", "truncate")]
# Small generations (128 px on the embedded model) are shown enlarged; the files keep their size.
CSS = (".generated img { width: 100%; height: 100%; object-fit: contain; }\n"
       # an image's name (what it drew, on the embedded model) wraps before its two buttons on a phone
       ".generated [data-testid='block-label'] { max-width: calc(100% - 64px); white-space: normal; }\n"
       "#what-box .diagram td { padding: 1px 6px; text-align: center; font-family: monospace; }\n"
       # gradio 6.31's theme paints a hovered radio white, its white dot included: the chosen option vanished
       "input[type=radio]:checked:hover { background-color: var(--checkbox-background-color-selected); "
       "border-color: var(--checkbox-border-color-selected); }")
# what the rates that end an AlignIT example's label say
RATES_NOTE = (". AlignIT's a% → b%: how often the customized model → AlignIT drew the concept and the rest of the "
              "prompt (toy Table 1)")
# System fonts: the page asks no font server, so it looks the same offline.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "Consolas", "monospace"])


# ------------------------------------------------------------------------------ engine -> UI values

def ui_error(e: AlignITError, caller: gr.Request | None = None) -> gr.Error:
    """The engine's message, shown as an error toast (as written: HTML escaped); to a program calling the API
    or an MCP agent as plain text (gradio_client sends `x-gradio-user: api`, gradio's MCP server `mcp`)."""
    plain = caller is not None and caller.headers.get("x-gradio-user") in ("api", "mcp")
    return gr.Error(str(e) if plain else as_html(e), title=type(e).__name__.removesuffix("Error") + " error",
                    print_exception=False)


def _whole(x):
    """A float from a number box as int when it is whole; anything else as is, for the engine to refuse."""
    return int(x) if isinstance(x, float) and x.is_integer() else x


class VisitorLeft(Exception):
    """The visitor who asked for this run closed the page or cancelled it."""


def visitor_watch():
    """For the queued run on this thread: a check that turns True once its visitor has gone (page
    closed, client disconnected) or cancelled it, so the run can stop instead of computing for no one
    beside the runs the queue has let in. Gradio 6.31 frees a cancelled run's queue slot at once but
    leaves its thread running, so the check reads the queue's record of the run: it is dropped on
    cancel and marked on disconnect (tests/test_reliability.py checks both). Outside a queued run
    (a test, a script) the check is always False."""
    from gradio.context import LocalContext

    blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
    events = getattr(getattr(blocks, "_queue", None), "event_ids_to_events", None)
    if events is None or event_id not in events:
        return lambda: False

    def left() -> bool:
        event = events.get(event_id)
        return event is None or not event.alive or event.closed

    return left


# ------------------------------------------------------------------------------ callbacks

def describe(model, concepts, uploaded, mode, concept_key, prompt, swaps, long="segments", second=""):
    """The page's token views of a prompt (the arguments as `tokens_tool`'s, with the visitor's `uploaded`
    concepts): the token table, the position boxes, the tokens as HTML chips, the p / p′ Markdown and p over
    p′ as an HTML table."""
    view = token_view(model, mode, prompt, chosen_concepts(concepts, uploaded, concept_key, second), swaps, long)
    label = ("Swapped positions of p (the concepts' are pre-selected)" if mode == ALIGNIT
             else "Positions to swap (checking one adds a `pos=` line to the swaps)")
    return (token_table(view), gr.update(choices=position_choices(view), value=list(view.selected), label=label),
            chips_html(view, view.selected), prompts_markdown(view), diagram_html(view, view.selected))


def tokens_tool(model, concepts, mode, concept_key, prompt, swaps="", long="segments", second="", caller=None):
    """Tokenize a prompt as the demo would and say how AlignIT or a token swap will read it.

    Args:
        mode: "AlignIT (customized concept)" or "Token swap".
        concept_key: AlignIT mode: the concept's name, e.g. "striped-ball-ti" (ignored in token-swap mode).
        prompt: AlignIT mode: with the concept's token ("a <striped-ball> on a green background"); else plain text.
        swaps: token-swap mode: one "word=source" or "position=source" per line, e.g. "red=yellow".
        long: prompts over 75 tokens: "segments" (every word kept) or "truncate".
        second: AlignIT mode: an optional second concept's name for the same prompt.

    Returns:
        the token table as {"headers", "data"} (position, segment, local position, token of p, word, token of p′)
        the positions swapped unless others are given
        Markdown with p, p′, the swapped rows and any problem
    """  # (a line each: MCP joins the lines of Returns with commas)
    try:  # a name that is no concept is an error; none at all is the table's own problem line
        chosen = concepts_asked(concepts, {}, concept_key, second, STATE_TTL_S) if mode == ALIGNIT else []
    except ConceptError as e:
        raise ui_error(e, caller) from None
    except PromptError:
        chosen = []
    view = token_view(model, mode, prompt, chosen, swaps, long)
    table = token_table(view)
    return ({"headers": list(table.columns), "data": table.astype(object).values.tolist()}, list(view.selected),
            prompts_markdown(view))


def show_chips(model, concepts, uploaded, mode, concept_key, prompt, swaps, selected, long="segments", second=""):
    """The chips and the p / p′ texts for positions ticked by hand (the swapped rows follow them).
    In token-swap mode a tick rewrites the swaps box (`positions_picked`), whose own view redraws them
    all; a second writer here, reading the swaps box as it was when the box was ticked, could land
    after that view and show a half-typed swap's problem under a finished one."""
    if mode == SWAP:
        return gr.update(), gr.update(), gr.update()
    view = token_view(model, mode, prompt, chosen_concepts(concepts, uploaded, concept_key, second), swaps, long)
    return chips_html(view, selected), prompts_markdown(view, selected), diagram_html(view, selected)


def positions_picked(model, mode, prompt, swaps, selected, long="segments"):
    """A position box ticked or unticked by hand: in swap mode, keep the swaps box in step."""
    if mode != SWAP:
        return gr.update()
    try:
        return sync_swaps(model, check_prompt(prompt), swaps, selected or [], long)
    except AlignITError:  # the token view already says what is wrong
        return gr.update()


def show_concept(concepts, uploaded, concept_key):
    """The concept card: its line and its reference images."""
    return concept_card(find_concept(concepts, uploaded, concept_key))


def concept_prompt(concepts, uploaded, concept_key):
    c = find_concept(concepts, uploaded, concept_key)
    return gr.update() if c is None else starting_prompt(c)


def second_concept_prompt(concepts, uploaded, prompt, second):
    """A second concept picked: its token joins the prompt unless it is there already."""
    c = find_concept(concepts, uploaded, second)
    if c is None or c.token in (prompt or ""):
        return gr.update()
    return f"{(prompt or '').strip()} and a {c.token}".strip()


def mode_controls(mode, gen: Generation | None):
    """Concept picker and base-model box for AlignIT, the swaps box for token swaps; until the first
    generation, the empty image boxes are named for the mode's rows."""
    alignit = mode == ALIGNIT
    labels = [gr.update() if gen is not None else gr.update(label=CAPTIONS[r]) for r in ROWS[mode]]
    labels += [gr.update()] * (MAX_COLUMNS - len(labels))
    return (gr.update(visible=alignit), gr.update(visible=not alignit), gr.update(visible=alignit), *labels)


class LoRAUploads:
    """The uploaded LoRAs that visitors' sessions still hold, with the size of each one's file: held
    weakly, so that a session that expires gives its share back."""

    def __init__(self, limit: int):
        self.limit = limit
        self._sizes: weakref.WeakKeyDictionary[Concept, int] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def admit(self, concept: Concept, size: int) -> None:
        """Count `concept`, from a file of `size` bytes, in; gr.Error when that would pass the limit."""
        with self._lock:
            held = sum(self._sizes.values())
            if held + size > self.limit:
                raise gr.Error(f"the server already keeps {held / 2**20:.0f} MB of uploaded LoRAs for its visitors; "
                               f"this one ({size / 2**20:.0f} MB) would pass the limit of {self.limit / 2**20:.0f} MB. "
                               f"Try again once older uploads expire (after {STATE_TTL_S // 60} minutes), or "
                               f"upload a smaller LoRA", title="Concept error")
            self._sizes[concept] = size


LORA_UPLOADS = LoRAUploads(LORA_UPLOADS_HELD_BYTES)


def add_concept(model, concepts, uploaded, path, token, class_word, lora_scale=1.0):
    """Load an uploaded .safetensors concept (an embedding or a LoRA) for this session only."""
    if not path:
        raise ui_error(ConceptError("choose a .safetensors file first"))
    try:
        c = load_concept(path, model, allow_pickle=False, max_bytes=MAX_UPLOAD_BYTES,
                         token=(token or "").strip() or None, class_word=(class_word or "").strip() or None,
                         lora_scale=lora_scale)
    except AlignITError as e:
        raise ui_error(e) from None
    finally:
        release_memory()  # what reading the upload took, whether it was accepted or not
    if c.token in {k.token for k in concepts.values()}:
        raise ui_error(ConceptError(f"the token {c.token} is taken by a shipped concept; choose another token"))
    if c.kind == "lora":
        LORA_UPLOADS.admit(c, Path(path).stat().st_size)
    key = f"uploaded:{c.token}"
    uploaded = {**(uploaded or {}), key: c}
    return (uploaded, gr.update(choices=concept_choices(concepts, uploaded), value=key),
            gr.update(choices=second_choices(concepts, uploaded)), starting_prompt(c))


def on_gpu(fn, duration):
    """`fn` run on the GPU that a ZeroGPU Space lends for at most `duration(*args)` seconds a call.
    Elsewhere `fn` itself: without the `spaces` package (it exists on Spaces only), and with it
    off ZeroGPU, where `spaces.GPU` returns the function unchanged. Arguments and results cross a
    process boundary on ZeroGPU, so they are plain data (the model is bound into `fn`)."""
    return fn if spaces is None else spaces.GPU(fn, duration=duration)


def run_generation(model, mode: str, concepts: list, prompt: str, settings: Settings, positions, swaps,
                   include_base: bool, progress=None) -> Generation:
    """The denoising itself, all the GPU work of a generation. Raises AlignITError, VisitorLeft."""
    left = visitor_watch()

    def tick(i, n):
        if left():
            raise VisitorLeft
        if progress is not None:
            progress((i, n), desc="denoising", unit="steps")

    if mode == ALIGNIT:
        return generate_concept(model, prompt, concepts, settings, positions=positions, include_base=include_base,
                                progress=tick)
    return generate_swap(model, prompt, swaps, settings, progress=tick)


class ExampleResults:
    """The examples' generations, made when first asked for (a visitor's first view or click) and
    then shared by every visitor: a generation is the same for the same inputs and seed, and it is
    never changed once made. Only the examples' inputs are kept, so memory stays bounded."""

    def __init__(self, keys):
        self._locks = {key: threading.Lock() for key in keys}
        self._made: dict = {}

    def get(self, key: PageRequest, make) -> Generation:
        """The generation for `key`: kept if `key` is an example's, made by `make()` otherwise."""
        lock = self._locks.get(key)
        if lock is None:
            return make()
        with lock:  # a second visitor asking while the first one's is being made waits for it
            if key not in self._made:
                self._made[key] = make()
            return self._made[key]


def generate(model, concepts, uploaded, mode, concept_key, prompt, positions, swaps, seed, steps, guidance, size,
             scheduler, swap_uncond, swap_start, swap_end, map_resolution, include_base, map_mode,
             long_prompt="segments", swap_kv="kv", swap_strength=1.0, second_concept="", lora_rest=0.0,
             map_blocks=MAP_BLOCKS, map_start=0.0, map_end=1.0, map_by="words", map_special=False,
             progress=gr.Progress(), caller: gr.Request = None, run=None, examples=None, first_view=False,
             example=False, typed=False):
    """Generate a comparison from one seed: AlignIT (customized baseline | AlignIT | optionally the base model
    on p) or a token swap (baseline | swapped), each image with its per-word cross-attention heat maps.

    Args:
        uploaded: the caller's uploaded concepts (kept by the page; leave empty).
        mode: "AlignIT (customized concept)" or "Token swap".
        concept_key: AlignIT mode: the concept's name, e.g. "striped-ball-ti" (see the tokens tool).
        prompt: AlignIT mode: with the concept's token ("a <striped-ball> on a green background"); else plain text.
        positions: AlignIT mode: positions of p to swap; leave empty for the concept's own.
        swaps: token-swap mode: one "word=source" or "position=source" per line, e.g. "red=yellow".
        seed: the seed of the shared starting noise (whole number).
        steps: denoising steps.
        guidance: classifier-free guidance scale.
        size: image side in pixels.
        scheduler: "ddim", "pndm", "euler" or "dpm++".
        swap_uncond: also swap in the unconditional half of classifier-free guidance.
        swap_start: fraction of the steps from which the swap acts (0..1).
        swap_end: fraction of the steps until which the swap acts (0..1).
        map_resolution: side of the attention maps to record (e.g. 16).
        include_base: AlignIT mode: add the base model on p as a third image.
        map_mode: heat maps "overlay" (on the image) or "raw".
        long_prompt: prompts over 75 tokens: "segments" or "truncate".
        swap_kv: swap keys and values "kv", keys only "k" or values only "v".
        swap_strength: 0 (no swap) to 1 (the full swap).
        second_concept: AlignIT mode: an optional second concept's name in the same prompt.
        lora_rest: AlignIT on a LoRA concept: how much of the rest of the LoRA (0..1).
        map_blocks: the UNet's parts whose layers record maps: some of "down", "mid", "up".
        map_start: fraction of the steps from which maps are recorded (0..1).
        map_end: fraction of the steps until which maps are recorded (0..1).
        map_by: heat maps per "words" (sub-word tokens merged) or per "positions".
        map_special: also show the start and end tokens' maps.

    Returns:
        up to three images (PNG, settings in their metadata) and their heat-map rows
        the comparison grid, settings.json and the command line that reproduces it
        a before/after pair of images, and maps.safetensors (the raw maps)
    """  # (a line each: MCP joins the lines of Returns with commas)
    settings = Settings(seed=_whole(seed), steps=_whole(steps), guidance=guidance, size=_whole(size),
                        scheduler=scheduler, swap_uncond=bool(swap_uncond), swap_start=swap_start,
                        swap_end=swap_end, map_resolution=_whole(map_resolution), long_prompt=long_prompt,
                        swap_kv=swap_kv, swap_strength=swap_strength, lora_rest=lora_rest,
                        map_blocks=tuple(map_blocks or ()), map_start=map_start, map_end=map_end)
    run = run or partial(run_generation, model)
    if example:  # an example asks for its concept's own positions: the box may still hold the last prompt's
        positions = None  # (a token view of the previous prompt can land after the example's own)
    try:
        chosen = concepts_asked(concepts, uploaded, concept_key, second_concept, STATE_TTL_S) if mode == ALIGNIT else []
        request = read_request(model, concepts, uploaded, mode, concept_key, prompt, positions, swaps, settings,
                               include_base, second_concept, typed or first_view)

        def make() -> Generation:
            return run(mode, chosen, request.prompt, request.settings, list(request.positions or ()) or None,
                       list(request.swaps), request.include_base, progress)

        gen = examples.get(request, make) if examples is not None else make()
    except AlignITError as e:
        if first_view:  # the run the page makes on opening reads the inputs as they are when it starts;
            # a visitor who changed them first (swaps chosen, the box still empty) asked for nothing:
            # the token view already says what is missing, and the page stays as it is
            raise gr.Error(as_html(e), visible=False, print_exception=False) from None
        raise ui_error(e, caller) from None
    except VisitorLeft:
        raise gr.Error("the request was cancelled", print_exception=False) from None
    except Exception as e:  # a bug or a broken concept: this visitor is told, the server log gets the trace
        raise gr.Error(f"the generation failed ({type(e).__name__}); the model is unchanged, try again",
                       title="Generation error") from e
    out = Path(gr.utils.get_upload_folder()) / "alignit" / uuid.uuid4().hex
    files = {p.name.removeprefix(prefix): p for prefix in [download_prefix(gen)]
             for p in write_outputs(gen, out, prefix)}
    line = cli_command(gen, set((uploaded or {}).values()))
    for warning in gen.warnings:
        gr.Warning(as_html(warning))
    shown = [str(files[f"{r}.png"]) for r in gen.rows]
    rows = heatmap_rows(gen, MapView(map_mode, map_by, bool(map_special)))
    release_memory()  # the run's activations and drawing buffers are free by now
    return (*_pad(shown), *_pad(rows), str(files["heatmaps.png"]), str(files["settings.json"]), line, gen,
            before_after(gen, shown), str(files[MAPS_FILE]))


def _pad(values: list) -> list:
    return values + [None] * (MAX_COLUMNS - len(values))


def label_columns(gen: Generation | None):
    """Name the image boxes for the rows of `gen` and show only as many columns as it has rows."""
    if gen is None:
        return [gr.update()] * (2 * MAX_COLUMNS)
    names = _pad([caption(gen, r) for r in gen.rows])
    return [gr.update(label=n) if n else gr.update() for n in names] + [gr.update(visible=bool(n)) for n in names]


def redraw_maps(gen: Generation | None, map_mode: str, map_by: str = "words", map_special: bool = False):
    """The heat-map rows drawn again from the kept generation (overlay or raw, by words or positions,
    with or without start/end tokens), without generating again."""
    if gen is None:
        return [gr.update()] * MAX_COLUMNS
    return _pad(heatmap_rows(gen, MapView(map_mode, map_by, bool(map_special))))


def large_map_view(gen: Generation | None, map_mode: str, map_by: str, map_special: bool, row=None, label=None):
    """The large map's image choice, word choice and picture (`large_map_pick` says which)."""
    if gen is None:
        return gr.update(), gr.update(), gr.update()
    view = MapView(map_mode, map_by, bool(map_special))
    row, labels, label = large_map_pick(gen, view, row, label)
    return (gr.update(choices=[(CAPTIONS[r], r) for r in gen.rows], value=row), gr.update(choices=labels, value=label),
            big_map(gen, view, row, label) if label is not None else None)


def tile_clicked(column: int):
    """The callback of column `column`'s heat-map row: the clicked tile's word (or token) as the large map."""
    def clicked(gen: Generation | None, map_mode: str, map_by: str, map_special: bool, evt: gr.SelectData):
        label = clicked_map(gen, MapView(map_mode, map_by, bool(map_special)), column, *evt.index)
        if label is None:
            return gr.update(), gr.update(), gr.update()
        return large_map_view(gen, map_mode, map_by, map_special, gen.rows[column], label)

    return clicked


def run_score(model, clip, gen: Generation, references, clip_note: str, progress=None) -> AlignmentReport:
    """The scoring itself, all the GPU work of a score. Raises AlignITError."""
    def tick(i, n):
        if progress is not None:
            progress((i, n), desc="scoring", unit="samples")

    return score_generation(model, gen, clip, references, clip_note=clip_note, progress=tick)


def score(model, clip, clip_note, concepts, gen: Generation | None, map_mode, progress=gr.Progress(),
          caller: gr.Request = None, run=None):
    """Score how well the caller's last generation follows its text: the MI score of every image (and CLIP
    where available), the difference to the first image, and each word's share (per-token MI).

    Args:
        gen: the caller's last generation (kept by the page and by a gradio_client session).
        map_mode: the per-token MI maps "overlay" (on the image) or "raw".

    Returns:
        A Markdown table of the scores, and one per-token MI heat-map row per image (up to three).
    """
    if gen is None:
        raise gr.Error("generate images first, then score them", title="Score error", print_exception=False)
    concept = gen.request.concepts[0] if gen.request.concepts else None
    refs = open_images(concept.references) if concept is not None and clip is not None else []
    run = run or partial(run_score, model, clip)
    try:
        report = run(gen, refs, clip_note, progress)
    except AlignITError as e:
        raise ui_error(e, caller) from None
    pictures = _pad(mi_rows(gen, report, map_mode))  # plain pictures, so that an MCP agent gets them as images
    release_memory()
    return (scores_markdown(report), *pictures, report)


def mi_boxes(gen: Generation | None) -> list:
    """After a score: show one per-token MI box per image of the generation, hide the others."""
    return [gr.update(visible=gen is not None and i < len(gen.rows)) for i in range(MAX_COLUMNS)]


def _shown(pictures: list) -> list:
    """Image updates that show each picture and hide the boxes without one."""
    return [gr.update(value=p, visible=p is not None) for p in pictures]


def redraw_mi(gen: Generation | None, report: AlignmentReport | None, map_mode: str):
    if gen is None or report is None or list(report.mi) != gen.rows:
        return [gr.update()] * MAX_COLUMNS
    return _shown(_pad(mi_rows(gen, report, map_mode)))


def random_seed() -> int:
    return random.randint(0, MAX_SEED)


# ------------------------------------------------------------------------------ layout and wiring

def build_demo(model, concepts: list[Concept], clip=None, clip_note: str = "", pages=()) -> gr.Blocks:
    """The whole app for `model` and the shipped `concepts` (validated against it); `clip` scores
    with CLIP too (else `clip_note` says why not). `pages`: (title, path, model, concepts) served on
    pages of their own, reached from the navigation bar (the other embedded model); their events stay
    off the API, whose endpoints (tokens, generate, score) are the first page's."""
    with gr.Blocks(title="AlignIT Studio", analytics_enabled=False, delete_cache=(1800, 3600)) as demo:
        _page(demo, model, concepts, clip, clip_note, public=True)
    demo.pages[0] = ("", page_title(model), True)  # the nav bar's name of the first page (gradio: "Home")
    for title, path, other, other_concepts in pages:
        with demo.route(title, path):
            _page(demo, other, other_concepts, clip, clip_note, public=False)
    return demo


def _page(demo: gr.Blocks, model, concepts: list[Concept], clip, clip_note: str, public: bool) -> None:
    """One model's page: every control, the results and their wiring, in the current page of `demo`.
    `public`: its tokens / generate / score events are the app's API (and MCP tools)."""

    def api(name: str) -> dict:
        return dict(api_name=name) if public else dict(api_visibility="private")

    registry = {c.name: c for c in concepts}
    defaults = resolve(model, Settings())
    size_step = model.size_step
    low, high = model.family.size_range()
    unet = not model.family.own_loop  # SD3 / Flux: token swaps with keys/values chosen per block, no UNet knobs
    example_rows, example_labels = examples_for(model, registry)
    swap_example = (example_rows[0][2], example_rows[0][3])
    # the page opens on the first AlignIT example (the one AlignIT draws most often), else on the first concept
    opening = next((row for row in example_rows if row[0] == ALIGNIT and not row[5]), None)
    first = registry[opening[1]] if opening else next(iter(registry.values()), None)
    start = ALIGNIT if first else SWAP  # no concept for this model: start where there is something to do
    examples = ExampleResults(example_requests(model, registry, example_rows, defaults))
    run = on_gpu(partial(run_generation, model), gpu_seconds)
    scorer = on_gpu(partial(run_score, model, clip), score_seconds)

    uploaded = gr.State({}, time_to_live=STATE_TTL_S)
    last = gr.State(None, time_to_live=STATE_TTL_S)
    drafts = gr.State({}, time_to_live=STATE_TTL_S)  # the prompt and swaps typed in the other mode
    gr.Markdown(header_markdown(model), elem_id="header")
    gr.DuplicateButton("Duplicate this Space (your own GPU, no queue)", size="sm",
                       visible=gr.utils.get_space() is not None)
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=300):
            mode = gr.Radio([ALIGNIT, SWAP], value=start, label="Mode", elem_id="mode")
            with gr.Column(variant="panel", visible=start == ALIGNIT) as concept_box:
                concept = gr.Dropdown(concept_choices(registry, {}), value=first and first.name,
                                      label="Customized concept", elem_id="concept")
                card = gr.Markdown(elem_id="concept-card")
                second = gr.Dropdown(second_choices(registry, {}), value="", elem_id="second-concept",
                                     label="Second concept in the same prompt (optional; each concept's rows "
                                           "come from its own customized model)")
                gr.Markdown("Reference images the concept was learned from:")
                references = gr.Gallery(show_label=False, columns=6, rows=1, height=120, object_fit="contain",
                                        allow_preview=True, elem_id="references")
                with gr.Accordion(f"Upload a concept (.safetensors: an embedding of at most "
                                  f"{MAX_EMBEDDING_BYTES // 2**20} MB, a LoRA of at most "
                                  f"{MAX_UPLOAD_BYTES // 2**20} MB)", open=False):
                    with gr.Row():
                        upload = gr.File(label="textual-inversion embedding or DreamBooth-LoRA",
                                         file_types=[".safetensors"],
                                         height=100, scale=2, elem_id="upload")
                        with gr.Column(scale=2):
                            up_token = gr.Textbox(label="token", placeholder="<my-cat> or a LoRA's trigger word, "
                                                                             "e.g. sks (default: the file's)",
                                                  elem_id="upload-token")
                            up_class = gr.Textbox(label="class word", placeholder="cat", elem_id="upload-class")
                            up_scale = gr.Slider(0, 2, value=1, step=0.05, label="LoRA scale (a LoRA only)")
                    add = gr.Button("Add concept for this session", size="sm", elem_id="add-concept")
            prompt = gr.Textbox(label="Prompt", value=first.example_prompt if first else swap_example[0],
                                lines=1, elem_id="prompt")
            swaps = gr.Textbox(label="Swaps: one `word=source` or `position=source` per line",
                               value="" if first else swap_example[1], placeholder="red=yellow\n4=black",
                               lines=2, visible=start == SWAP, elem_id="swaps")
            positions = gr.CheckboxGroup(label="Swapped positions", elem_id="positions")
            chips = gr.HTML(elem_id="chips")
            texts = gr.Markdown(elem_id="prompt-texts", padding=True)
        with gr.Column(scale=2, min_width=300):
            with gr.Row(equal_height=False):
                seed = gr.Number(value=opening[4] if opening else 0, label="Seed", precision=0, minimum=0,
                                 maximum=MAX_SEED, scale=3, elem_id="seed")
                dice = gr.Button("Random seed", size="sm", scale=1, elem_id="dice")
            steps = gr.Slider(1, 100, value=defaults.steps, step=1, label="Denoising steps")
            guidance = gr.Slider(0, MAX_GUIDANCE, value=defaults.guidance, step=0.5, label="Guidance scale")
            with gr.Row():
                size = gr.Slider(low, high, value=defaults.size, step=size_step, elem_id="size",
                                 label=f"Image size (px; the model was trained at {model.native_size})")
                scheduler = gr.Dropdown(list(model.family.schedulers), value=defaults.scheduler, label="Scheduler")
            size_text = gr.Markdown(elem_id="size-note")
            with gr.Accordion("Advanced", open=False):
                swap_uncond = gr.Checkbox(False, label="Swap in both CFG halves (not only the conditional one)",
                                          visible=unet)
                with gr.Row():
                    swap_kv = gr.Radio([("keys and values", "kv"), ("keys only", "k"), ("values only", "v")],
                                       value="kv", label="Swap", elem_id="swap-kv")
                    swap_strength = gr.Slider(0, 1, value=1, step=0.05, elem_id="swap-strength", visible=unet,
                                              label="Swap strength (0: no swap, 1: the full swap)")
                lora_rest = gr.Slider(0, 1, value=0, step=0.05, elem_id="lora-rest", visible=unet,
                                      label="AlignIT on a LoRA: the rest of the LoRA (0: only the concept's keys "
                                            "and values, as the paper; 1: all but the other tokens' keys and values)")
                with gr.Row():
                    swap_start = gr.Slider(0, 1, value=0, step=0.05, label="Swap from (fraction of steps)")
                    swap_end = gr.Slider(0, 1, value=1, step=0.05, label="Swap until")
                with gr.Row():
                    map_res = gr.Dropdown(**map_resolutions(model, defaults.size), elem_id="map-res",
                                          label="Heat maps from the cross-attention layers at")
                    map_blocks = gr.CheckboxGroup([("down", "down"), ("mid", "mid"), ("up", "up")],
                                                  value=list(MAP_BLOCKS), elem_id="map-blocks", visible=unet,
                                                  label="in the UNet's blocks")
                with gr.Row():
                    map_start = gr.Slider(0, 1, value=0, step=0.05, label="Heat maps from (fraction of steps)",
                                          elem_id="map-start")
                    map_end = gr.Slider(0, 1, value=1, step=0.05, label="Heat maps until", elem_id="map-end")
                long_mode = gr.Radio(LONG_CHOICES, value="segments", elem_id="long-mode",
                                     label="Prompts over 75 tokens (CLIP's limit)")
            include_base = gr.Checkbox(False, label="Also show the base model on p", visible=start == ALIGNIT,
                                       elem_id="include-base")
            run_button = gr.Button("Generate", variant="primary", elem_id="generate")
    # under the settings, not in the prompt's column: a phone, which stacks the columns, reaches Generate
    # before the explanations; the whole width gives the position diagram and the table room
    with gr.Accordion("What am I looking at?", open=True, elem_id="what-box"):
        diagram = gr.HTML(elem_id="diagram")
        gr.Markdown(WHAT)
    with gr.Accordion("Token table", open=True, elem_id="table-box"):
        table = gr.Dataframe(headers=TABLE_COLUMNS, interactive=False, elem_id="tokens", max_height=320)
    examples_box = gr.Examples(example_rows, [mode, concept, prompt, swaps, seed, second],
                               label="Examples (click to run; results are kept, so a second visit is instant)"
                                     + (RATES_NOTE if any(registry[r[1]].example_rates for r in example_rows
                                                          if r[0] == ALIGNIT) else ""),
                               example_labels=example_labels, cache_examples=False, examples_per_page=12,
                               api_visibility="private")
    gr.Markdown("### Results\nEvery image starts from the same seed's noise. Under each: where each word's "
                f"cross-attention lands ({SCALE_NOTE}; swapped words framed in orange). Click a tile for a "
                "large map." + (" Each image's name says what the shapes world's classifier (toy Table 1's judge) "
                                "sees in it: the concept's token where it drew the concept." if model.is_embedded else ""),
                elem_id="results")
    with gr.Row(equal_height=False):
        # wide enough each that a phone puts them one under another instead of squeezing the last
        map_mode = gr.Radio(["overlay", "raw"], value="overlay", label="Heat maps", scale=1, min_width=220,
                            elem_id="map-mode")
        map_by = gr.Radio(MAP_VIEWS, value="words", label="one map per", scale=1, min_width=220, elem_id="map-by")
        map_special = gr.Checkbox(False, label="show start / end tokens", scale=1, min_width=220,
                                  elem_id="map-special")
    with gr.Row(equal_height=False):
        images, maps, columns, mi_maps = [], [], [], []
        for i in range(MAX_COLUMNS):
            with gr.Column(visible=i < 2, min_width=240) as col:
                images.append(gr.Image(label=_pad([CAPTIONS[r] for r in ROWS[start]])[i], type="pil",
                                       format="png", height=256, interactive=False, elem_classes="generated",
                                       elem_id=f"image-{i}", buttons=["download", "fullscreen"]))
                maps.append(gr.Image(label="cross-attention per word", show_label=False, type="pil",
                                     format="png", interactive=False, elem_id=f"heatmap-{i}",
                                     buttons=["fullscreen"]))
                mi_maps.append(gr.Image(label="MI per token", type="pil", format="png", interactive=False,
                                        visible=False, elem_id=f"mi-{i}", buttons=["fullscreen"]))
            columns.append(col)
    with gr.Row(equal_height=False):
        with gr.Column(min_width=300):
            slider = gr.ImageSlider(label="before / after (drag)", type="filepath", elem_id="slider",
                                    interactive=False, height=420)
        with gr.Column(min_width=300):
            with gr.Row():
                big_row = gr.Radio(label="large map of image", elem_id="large-row")
                big_word = gr.Dropdown(label="word", elem_id="large-word")
            big = gr.Image(label="large map", type="pil", format="png", interactive=False, elem_id="large-map",
                           height=420, buttons=["download", "fullscreen"])
    with gr.Row(equal_height=False):
        score_button = gr.Button("Score alignment", size="sm", scale=1, elem_id="score")
        score_text = gr.Markdown("*Score alignment* measures how much each image follows the text (MI from "
                                 "the model's own denoiser" + (", CLIP" if clip is not None else "") + "). "
                                 "In AlignIT mode it scores *p*, the class word: the concept's own look counts "
                                 "against an image.", elem_id="scores")
    with gr.Row(equal_height=False):
        grid_file = gr.File(label="comparison grid (PNG, settings in its metadata)", elem_id="grid-file",
                            min_width=300)
        maps_file = gr.File(label="the raw maps (maps.safetensors)", elem_id="maps-file", min_width=300)
        settings_file = gr.File(label="settings.json", elem_id="settings-file", min_width=300)
    command = gr.Textbox(label="Reproduce from the command line", interactive=False, lines=2,
                         buttons=["copy"], elem_id="command")

    # ---- wiring
    ctx = (model, registry)
    private = dict(api_visibility="private")
    quick = dict(queue=False, show_progress="hidden", api_visibility="private")
    view_inputs = [uploaded, mode, concept, prompt, swaps]
    view_outputs = [table, positions, chips, texts, diagram]
    show_view = dict(fn=named(describe, "token_view", *ctx), inputs=view_inputs + [long_mode, second],
                     outputs=view_outputs, show_progress="hidden", **TOKEN_VIEWS)
    # one listener for every input of the view, so that its runs never overtake one another; an example
    # asks for a view through it too (`reviews`), even when its values are those already on the page
    reviews = gr.State(0, time_to_live=STATE_TTL_S)
    gr.on([prompt.change, swaps.change, mode.change, concept.change, second.change, long_mode.change,
           reviews.change], **show_view, trigger_mode="always_last", **private)
    if public:  # the page's view is HTML for the page; callers and agents get the table and the texts as data
        def tokens(mode: str, concept_key: str | None, prompt: str, swaps: str = "", long: str = "segments",
                   second: str = "", caller: gr.Request = None) -> tuple[dict, list[int], str]:
            return tokens_tool(model, registry, mode, concept_key, prompt, swaps, long, second, caller)

        tokens.__doc__ = tokens_tool.__doc__
        tokens.__annotations__ = typing.get_type_hints(tokens)  # types, not this module's strings: three outputs
        gr.api(tokens, api_name="tokens", **TOKEN_VIEWS)
    second.input(partial(second_concept_prompt, registry), [uploaded, prompt, second], prompt, **private)
    concept.change(partial(show_concept, registry), [uploaded, concept], [card, references],
                   show_progress="hidden", **private)
    concept.input(partial(concept_prompt, registry), [uploaded, concept], prompt, **private)
    mode.input(partial(mode_switched, registry, swap_example=swap_example),
               [uploaded, mode, concept, prompt, swaps, drafts], [prompt, swaps, drafts], **private)
    mode.change(mode_controls, [mode, last], [concept_box, swaps, include_base, *images],
                show_progress="hidden", **private)
    positions.input(partial(positions_picked, model), [mode, prompt, swaps, positions, long_mode], swaps,
                    show_progress="hidden", **private)
    positions.change(partial(show_chips, *ctx), view_inputs + [positions, long_mode, second],
                     [chips, texts, diagram], show_progress="hidden", **TOKEN_VIEWS, **private)
    add.click(partial(add_concept, model, registry), [uploaded, upload, up_token, up_class, up_scale],
              [uploaded, concept, second, prompt], **private)
    dice.click(random_seed, None, seed, show_progress="hidden", **private)
    size.change(lambda px: (gr.update(**map_resolutions(model, px)), size_note(model, px)), size,
                [map_res, size_text], show_progress="hidden", **private)
    map_view = [map_mode, map_by, map_special]
    large = [big_row, big_word, big]
    show_large = dict(fn=large_map_view, inputs=[last, *map_view, big_row, big_word], outputs=large,
                      show_progress="hidden", **private)
    for control in map_view:
        control.change(redraw_maps, [last] + map_view, maps, **private)
        control.change(**show_large)
    big_row.input(**show_large)
    big_word.input(**show_large)
    for column, heat in enumerate(maps):
        heat.select(tile_clicked(column), [last] + map_view, large, show_progress="hidden", **private)
    scored = gr.State(None, time_to_live=STATE_TTL_S)
    scoring = score_button.click(named(score, "score", model, clip, clip_note, registry, run=scorer), [last, map_mode],
                                 [score_text, *mi_maps, scored], show_progress_on=score_text, **api("score"), **HEAVY)
    scoring.success(mi_boxes, last, mi_maps, **quick)
    map_mode.change(redraw_mi, [last, scored, map_mode], mi_maps, **private)
    last.change(lambda: ("", *_shown([None] * MAX_COLUMNS), None), None, [score_text, *mi_maps, scored],
                show_progress="hidden", **private)  # a new generation: old scores go

    gen_inputs = [uploaded, mode, concept, prompt, positions, swaps, seed, steps, guidance, size, scheduler,
                  swap_uncond, swap_start, swap_end, map_res, include_base, map_mode, long_mode, swap_kv,
                  swap_strength, second, lora_rest, map_blocks, map_start, map_end, map_by, map_special]
    gen_outputs = images + maps + [grid_file, settings_file, command, last, slider, maps_file]
    generator = named(generate, "generate", *ctx, run=run, examples=examples)

    def generate_after(event, fn=generator, **endpoint):
        """Generate after `event` with the button greyed out and the old heat maps cleared (they
        belong to the old images); the button comes back, and after an error the kept generation's
        maps too (gradio 6.31's front end skips `.then` after a failed event, so `.failure` says it)."""
        done = event.then(fn, gen_inputs, gen_outputs, show_progress_on=images, **HEAVY, **endpoint)
        done.success(label_columns, last, images + columns, **quick)
        done.success(large_map_view, [last, *map_view, big_row, big_word], large, **quick)
        done.failure(redraw_maps, [last] + map_view, maps, **quick)
        for after in (done.then, done.failure):
            after(lambda: gr.update(interactive=True), None, run_button, **quick)

    def start_run():
        return gr.update(interactive=False), *[None] * MAX_COLUMNS

    generate_after(run_button.click(start_run, None, [run_button, *maps], js=SHOW_RESULTS, **quick),
                   **api("generate"))
    # Enter in the prompt box generates too; the positions box may still hold the last prompt's ticks (its new
    # view comes from the listener), and ticks without this prompt's concept position count as none (`typed`)
    generate_after(prompt.submit(start_run, None, [run_button, *maps], js=SHOW_RESULTS, **quick),
                   fn=named(generate, "generate", *ctx, run=run, examples=examples, typed=True), **private)
    # an example runs once its values are in place, on its concept's own positions; its view comes from the
    # listener (`reviews` is bumped through the queue: a call outside it reports no state change to the page)
    bump = dict(fn=lambda n: n + 1, inputs=reviews, outputs=reviews, show_progress="hidden", **private)
    generate_after(examples_box.load_input_event.then(**bump).then(start_run, None, [run_button, *maps], **quick),
                   fn=named(generate, "generate", *ctx, run=run, examples=examples, example=True), **private)
    # the first view shows the first example's result (made once, on the first view of all)
    first_view = named(generate, "generate", *ctx, run=run, examples=examples, first_view=True)
    generate_after(demo.load(**show_view, **private).then(start_run, None, [run_button, *maps], **quick),
                   fn=first_view, **private)
    demo.load(partial(show_concept, registry), [uploaded, concept], [card, references], **private)


def page_title(model) -> str:
    """A model's name in the navigation bar."""
    if model.is_embedded:
        return "Embedded SD3 (MMDiT)" if model.family.own_loop else "Embedded UNet (SD 1.x)"
    return model.name


def other_embedded(model) -> list:
    """The demo's second page: beside one embedded model, the other one (UNet | MMDiT) with its
    concepts, as `build_demo`'s `pages`; none beside any other model or when it cannot load."""
    if not model.is_embedded:
        return []
    path = EMBEDDED_MMDIT if model.name == EMBEDDED.name else EMBEDDED
    try:
        other = load_model(path.name, device=str(model.device), dtype=model.dtype)
        return [(page_title(other), "mmdit" if other.family.own_loop else "unet", other,
                 find_concepts(CONCEPTS_DIR, other))]
    except AlignITError as e:
        print(f"the other embedded model is not served: {e}", flush=True)
        return []


def named(fn, name: str, *bound, **keywords):
    """`fn` with its first arguments bound to this app's model and concepts, under `name` and with its
    docstring, so that the API and MCP list it as a tool an agent can read (a bare partial has neither)."""
    bound_fn = partial(fn, *bound, **keywords)

    @wraps(fn)  # a function, not a partial, so that gradio reads its type hints (`gr.Request`)
    def tool(*args, **kw):
        return bound_fn(*args, **kw)

    tool.__name__, tool.__signature__ = name, inspect.signature(bound_fn)
    return tool


def _args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="AlignIT Studio: the browser demo")
    ap.add_argument("--model", default=os.environ.get("ALIGNIT_MODEL", "auto"),
                    help=f"auto (= {SD15} if available, else the embedded model) | embedded | embedded-mmdit | a "
                         "folder | a hub id (beside an embedded model the other one is served on a page of its own)")
    ap.add_argument("--port", type=int,
                    default=int(os.environ.get("ALIGNIT_PORT") or os.environ.get("GRADIO_SERVER_PORT") or 7860))
    ap.add_argument("--host", default=os.environ.get("ALIGNIT_HOST") or os.environ.get("GRADIO_SERVER_NAME")
                    or "127.0.0.1", help="0.0.0.0 to serve on every interface (a Space sets GRADIO_SERVER_NAME)")
    ap.add_argument("--share", action="store_true", help="open a public gradio.live link")
    ap.add_argument("--compile", action="store_true", default=os.environ.get("ALIGNIT_COMPILE") == "1",
                    help="torch.compile the UNet (the first generation compiles; worth it on a GPU Space)")
    ap.add_argument("--channels-last", action="store_true", default=os.environ.get("ALIGNIT_CHANNELS_LAST") == "1",
                    help="channels-last memory layout for the UNet")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = _args(argv)
    limit_arenas(ARENAS)  # before the server's threads start
    try:
        model = accelerate(load_model(args.model), compile=args.compile, channels_last=args.channels_last)
        concepts = find_concepts(CONCEPTS_DIR, model)
    except AlignITError as e:
        print(f"error: {e}")
        return 2
    print(f"model: {model.name} ({model.chosen_because}); {len(concepts)} concept(s)", flush=True)
    try:
        clip, clip_note = load_clip(device=model.device), ""
    except AlignITError as e:
        clip, clip_note = None, str(e)
        print(f"{clip_note}; Score alignment shows the MI score only", flush=True)
    pages = other_embedded(model)
    for title, path, *_ in pages:
        print(f"also served: {title} at /{path}", flush=True)
    launch(build_demo(model, concepts, clip, clip_note, pages), server_name=args.host, server_port=args.port,
           share=args.share)
    return 0


def launch(demo: gr.Blocks, **where) -> None:
    """Queue and serve `demo` with the demo's limits; `where`: server_name, server_port, share, ..."""
    demo.queue(**QUEUE)
    # mcp_server: the named endpoints (tokens, generate, score) are also MCP tools, at /gradio_api/mcp/
    demo.launch(max_file_size=MAX_UPLOAD_BYTES, state_session_capacity=SESSIONS, allowed_paths=[str(CONCEPTS_DIR)],
                css=CSS, theme=THEME, mcp_server=True, **where)


if __name__ == "__main__":
    raise SystemExit(main())
