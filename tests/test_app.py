"""The app's wiring: error toasts, the callbacks on a tiny model, the layout, the API and MCP tools.
What the callbacks show, computed without gradio, is tested in test_views."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

import app
from alignit_core import Concept, PromptError, Token, views
from alignit_core.cli import parser as cli_parser
from alignit_core.result_views import download_prefix

PROMPT = "a red circle on a blue background"


def _concept(kind="textual_inversion", phrase="{token}") -> Concept:
    return Concept("striped-ball-ti", "<striped-ball>", "circle", kind, phrase, vectors=(torch.zeros(1, 32),),
                   example_prompt="a <striped-ball> on a green background")


# ------------------------------------------------------------------------------ engine -> UI

def test_engine_errors_become_toasts_with_the_engines_message():
    err = app.ui_error(PromptError("the word 'cat' is not in the prompt"))
    assert isinstance(err, gr.Error)
    assert err.message == "the word 'cat' is not in the prompt" and err.title == "Prompt error"


def test_heat_maps_redraw_raw_without_generating_again():
    image = Image.new("RGB", (32, 32), (200, 40, 40))
    maps = torch.rand(3, 4, 4).numpy()
    tokens = tuple(Token(i, t, w, k) for i, (t, w, k) in enumerate([("<|startoftext|>", "", -1), ("red", "red", 0),
                                                                     ("<|endoftext|>", "", -1)]))
    gen = SimpleNamespace(rows=["baseline", "swapped"], images={"baseline": image, "swapped": image},
                          maps={"baseline": maps, "swapped": maps}, tokens={"baseline": tokens, "swapped": tokens},
                          swapped={"baseline": (), "swapped": (1,)})
    overlay, raw = app.redraw_maps(gen, "overlay"), app.redraw_maps(gen, "raw")
    assert len(overlay) == app.MAX_COLUMNS and overlay[2] is None
    assert overlay[0].tobytes() != raw[0].tobytes()


# ------------------------------------------------------------------------------ callbacks on a tiny model

def _run(model, **kw):
    values = dict(uploaded={}, mode=app.SWAP, concept_key=None, prompt=PROMPT, positions=[], swaps="red=yellow",
                  seed=3, steps=2, guidance=5.0, size=model.native_size, scheduler="ddim", swap_uncond=False,
                  swap_start=0.0, swap_end=1.0, map_resolution=None, include_base=False, map_mode="overlay")
    values.update(kw)
    return app.generate(model, {}, **values, progress=lambda *a, **k: None)


LONG = " ".join(f"Panel {i} shows a {c} square with thin stripes, a tiny dot and a wide frame around it."
                for i, c in enumerate(["red", "green", "blue", "yellow", "purple", "orange", "pink", "white"]))


def test_truncate_mode_shows_what_the_model_will_not_read(clip, tiny_sd):
    view = views.token_view(clip, app.SWAP, LONG, None, "red=blue", long="truncate")
    assert not view.p.parts and len(view.p.ids) <= 77 and view.p.dropped
    assert f"will not read `{view.p.dropped}`" in views.prompts_markdown(view)
    *_, command, gen, _, _ = _run(tiny_sd, prompt=LONG, swaps="red=blue", long_prompt="truncate")
    assert gen.warnings and gen.record()["dropped"] == view.p.dropped
    assert "--long-prompt truncate" in command
    args = cli_parser().parse_args(shlex.split(command)[3:])
    assert args.long_prompt == "truncate"


def test_generate_returns_two_columns_and_reproducible_downloads(tiny_sd):
    *shown, grid, settings, command, gen, pair, maps_file = _run(tiny_sd)
    images, maps = shown[:app.MAX_COLUMNS], shown[app.MAX_COLUMNS:]
    assert Image.open(images[0]).size == Image.open(images[1]).size and images[2] is None and maps[2] is None
    assert json.loads(Path(settings).read_text())["swaps"] == [["red", "yellow"]]
    assert Image.open(grid).text["alignit"] == json.dumps(gen.record(), ensure_ascii=False)
    assert "--swap red=yellow" in command and "--model tiny-sd" in command
    assert pair == (images[0], images[1]) and Path(maps_file).name.endswith("maps.safetensors")


def test_every_download_is_named_for_its_run_and_carries_the_settings(tiny_sd):
    """Bug: each image downloaded as `image.png` without settings, and the grid's columns were the
    engine's row keys, not the page's captions."""
    *shown, grid, settings, command, gen, pair, maps_file = _run(tiny_sd, seed=5)
    names = [Path(f).name for f in shown[:2] + [grid, settings, maps_file]]
    assert names == ["swap-seed5-baseline.png", "swap-seed5-swapped.png", "swap-seed5-heatmaps.png",
                     "swap-seed5-settings.json", "swap-seed5-maps.safetensors"]
    for image in shown[:2]:
        assert json.loads(Image.open(image).text["alignit"])["seed"] == 5
    *_, gen2, _, _ = app.generate(tiny_sd, {"striped-ball-ti": _concept()}, {}, app.ALIGNIT, "striped-ball-ti",
                                  "a <striped-ball> on a green background", [2], "", 1, 2, 5.0, tiny_sd.native_size,
                                  "ddim", False, 0.0, 1.0, None, False, "overlay", progress=lambda *a, **k: None)
    assert download_prefix(gen2) == "striped-ball-seed1-"


def test_alignit_with_the_base_model_fills_three_labelled_columns(tiny_sd):
    concept = {"striped-ball-ti": _concept()}
    *shown, grid, settings, command, gen, pair, _ = app.generate(
        tiny_sd, concept, {}, app.ALIGNIT, "striped-ball-ti", "a <striped-ball> on a green background", [2], "",
        1, 2, 5.0, tiny_sd.native_size, "ddim", False, 0.0, 1.0, None, True, "raw", progress=lambda *a, **k: None)
    assert pair == (shown[0], shown[1])  # before / after: the customized baseline and AlignIT
    assert gen.rows == ["customized", "alignit", "base"] and all(v is not None for v in shown)
    assert "--concept striped-ball-ti --positions 2 --base" in command
    labels = app.label_columns(gen)
    assert [u["label"] for u in labels[:3]] == ["customized baseline", "AlignIT", "base model on p"]
    assert [u["visible"] for u in labels[3:]] == [True, True, True]


def test_on_the_embedded_model_each_image_box_says_what_its_picture_shows(embedded):
    """On a model of the shapes world the image boxes' names add what Table 1's classifier sees in each picture:
    the concept's token where it drew the instance, else the world's words for what it drew, then the background.
    At the example's seed (README) the customized model draws the holed star on another background and AlignIT on
    the asked one; the base model on p draws a star that is not it. Other models keep the bare names (above)."""
    from alignit_core.toy.shapes import classify
    concepts = {c.name: c for c in app.find_concepts(app.ASSETS / "concepts", embedded)}
    star = concepts["holed-star-ti"]
    *shown, _, _, _, gen, _, _ = app.generate(
        embedded, concepts, {}, app.ALIGNIT, star.name, star.example_prompt, None, "", star.example_seed, 20, 10.0,
        embedded.native_size, "ddim", False, 0.0, 1.0, None, True, "raw", progress=lambda *a, **k: None)
    asked = star.example_prompt.split(" on a ")[1].split()[0]
    seen = {r: classify(np.asarray(gen.images[r].convert("RGB"))) for r in gen.rows}
    labels = [u["label"] for u in app.label_columns(gen)[:3]]
    assert seen["customized"].background != asked and seen["alignit"].background == asked
    assert labels[:2] == [f"customized baseline: <holed-star> on {seen['customized'].background}",
                          f"AlignIT: <holed-star> on {asked}"]
    assert labels[2] == f"base model on p: {seen['base'].words}" and "star" in labels[2]
    *_, gen, _, _ = app.generate(embedded, concepts, {}, app.SWAP, star.name, "a red circle on a blue background", None,
                                 "red=yellow", 0, 20, 10.0, embedded.native_size, "ddim", False, 0.0, 1.0, None, False,
                                 "raw", progress=lambda *a, **k: None)
    assert [u["label"] for u in app.label_columns(gen)[:2]] == ["baseline: red circle on blue",
                                                                "swapped: yellow circle on blue"]


def test_an_example_runs_on_its_concepts_own_positions_whatever_the_box_still_holds(tiny_sd):
    """A token view of the previous prompt can land after the example's own and leave its positions
    in the box: the example's run asks for the concept's positions, a click on Generate for the box's."""
    concept = {"striped-ball-ti": _concept()}
    args = (tiny_sd, concept, {}, app.ALIGNIT, "striped-ball-ti", "a <striped-ball> on a green background", [5], "",
            1, 2, 5.0, tiny_sd.native_size, "ddim", False, 0.0, 1.0, None, False, "raw")
    *_, command, gen, _, _ = app.generate(*args, progress=lambda *a, **k: None, example=True)
    assert "--positions 2" in command and gen.swapped["alignit"] == (2,)
    *_, command, gen, _, _ = app.generate(*args, progress=lambda *a, **k: None)
    assert "--positions 5" in command and gen.swapped["alignit"] == (5,)


def test_enter_right_after_typing_drops_ticks_that_miss_the_new_prompts_concept_position(tiny_sd):
    """Enter in the prompt box can come before the new prompt's view: the box may still hold the last
    prompt's ticks. Ticks without this prompt's concept position are those and count as none; ticks that hold
    it are the visitor's own and are kept. A click on Generate takes the box as it is."""
    concept = {"striped-ball-ti": _concept()}
    args = (tiny_sd, concept, {}, app.ALIGNIT, "striped-ball-ti", "a <striped-ball> on a green background")
    rest = ("", 1, 2, 5.0, tiny_sd.native_size, "ddim", False, 0.0, 1.0, None, False, "raw")
    quiet = dict(progress=lambda *a, **k: None)
    *_, command, gen, _, _ = app.generate(*args, [5], *rest, **quiet, typed=True)
    assert "--positions 2 " in command and gen.swapped["alignit"] == (2,)
    *_, command, gen, _, _ = app.generate(*args, [2, 5], *rest, **quiet, typed=True)
    assert gen.swapped["alignit"] == (2, 5)
    *_, command, gen, _, _ = app.generate(*args, [5], *rest, **quiet)
    assert gen.swapped["alignit"] == (5,)
    # the page's opening run reads the inputs as they are when it starts: a prompt typed before it, beside the
    # first example's ticks, is read as Enter reads it
    *_, command, gen, _, _ = app.generate(*args, [5], *rest, **quiet, first_view=True)
    assert gen.swapped["alignit"] == (2,)
    enter = [fn for fn in app.build_demo(tiny_sd, []).fns.values()
             if [event for _, event in fn.targets] == ["submit"]]
    assert len(enter) == 1 and enter[0].js  # Enter generates (and brings the results into view)


def test_every_token_view_after_the_pages_first_comes_from_one_always_last_listener(tiny_sd):
    """A visitor's token views overtake one another only if two events compute them: an example's own
    view, started beside a view of the previous prompt, could land first and leave that prompt's ticks in
    the positions box. One `always_last` listener runs them one at a time, the last with the page's values;
    an example asks it for a view even when its values are those already on the page."""
    demo = app.build_demo(tiny_sd, [])
    views = [fn for fn in demo.fns.values() if getattr(fn.fn, "__name__", "") == "token_view"]
    later = [fn for fn in views if [event for _, event in fn.targets] != ["load"]]
    assert len(later) == 1 and later[0].trigger_mode == "always_last"
    triggers = {demo.blocks[block]: event for block, event in later[0].targets}
    bumped = [fn for fn in demo.fns.values() if fn.outputs and fn.outputs[0] in triggers and fn.inputs == fn.outputs
              and [event for _, event in fn.targets] == ["then"]]
    assert len(bumped) == 1  # the examples' chain
    assert bumped[0].fn(0) == 1  # a new value, so the listener runs


@pytest.mark.parametrize("kw, message", [
    ({"swaps": "cat=zebra"}, "the word 'cat' is not in the prompt"),
    ({"swaps": "12=zebra"}, "position 12 is outside the prompt"),
    ({"steps": 0}, "steps must be a whole number"),
    ({"mode": app.ALIGNIT}, "choose or upload a concept first"),
])
def test_bad_input_raises_the_engines_message_as_a_toast(tiny_sd, kw, message):
    with pytest.raises(gr.Error, match=message):
        _run(tiny_sd, **kw)


def test_the_run_on_opening_the_page_is_silent_about_inputs_the_visitor_changed_first(tiny_sd):
    """The page's first run reads the inputs when it starts; a visitor who switched to swaps before it
    did (the box still empty) asked for nothing and sees no error toast. A click on Generate with the
    same inputs does get the toast."""
    with pytest.raises(gr.Error, match="no swap given") as clicked:
        _run(tiny_sd, swaps="")
    with pytest.raises(gr.Error, match="no swap given") as opened:
        _run(tiny_sd, swaps="", first_view=True)
    assert clicked.value.visible and not opened.value.visible
    *_, gen, _, _ = _run(tiny_sd, first_view=True)  # inputs that can run: the run happens as ever
    assert gen.rows == ["baseline", "swapped"]


def test_an_uploaded_pickle_is_refused(tiny_sd, tmp_path):
    path = tmp_path / "learned_embeds.bin"
    torch.save({"<x>": torch.zeros(32)}, path)
    with pytest.raises(gr.Error, match="only .safetensors can be uploaded"):
        app.add_concept(tiny_sd, {}, {}, str(path), "<x>", "cat")


def test_an_uploaded_embedding_joins_this_session_only(tiny_sd, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "learned_embeds.safetensors"
    save_file({"<x>": torch.randn(32)}, str(path))
    uploaded, choices, _, prompt = app.add_concept(tiny_sd, {}, {}, str(path), "", "cat")
    assert list(uploaded) == ["uploaded:<x>"] and prompt == "a photo of a <x>"
    assert choices["value"] == "uploaded:<x>"


def test_the_tokens_tool_names_an_unknown_concept_and_lists_the_known_ones(tiny_sd):
    """An agent's misspelt concept is an error that says which exist; no concept at all is the table's problem line
    (as on the page, where the concept is picked after the prompt)."""
    with pytest.raises(gr.Error, match=r"unknown concept 'nope'; available: toy"):
        app.tokens_tool(tiny_sd, {"toy": object()}, app.ALIGNIT, "nope", "a photo of a <x>")
    table, positions, texts = app.tokens_tool(tiny_sd, {}, app.ALIGNIT, None, "a jumping dog")
    assert [row[3] for row in table["data"]][1:4] == ["a", "jumping", "dog"] and positions == []
    assert "choose or upload a concept" in texts


def test_the_demo_exposes_named_generate_and_tokens_endpoints(tiny_sd):
    demo = app.build_demo(tiny_sd, [])
    names = {fn.api_name for fn in demo.fns.values()}
    assert {"generate", "tokens"} <= names


def test_a_second_model_gets_a_page_of_its_own_and_the_api_stays_the_first_pages(tiny_sd):
    """`python app.py` beside an embedded model serves the other one on a page of its own (nav bar);
    its events stay off the API and MCP, whose tools stay the first page's three."""
    from alignit_core.models import from_components
    from alignit_core.testing import tiny_sd3

    sd3 = from_components(tiny_sd3(), "tiny-sd3")
    demo = app.build_demo(tiny_sd, [], pages=[("Tiny SD3", "sd3", sd3, [])])
    assert demo.pages == [("", "tiny-sd", True), ("sd3", "Tiny SD3", True)]
    public = [fn for fn in demo.fns.values() if fn.api_visibility == "public"]
    assert sorted(fn.api_name for fn in public) == ["generate", "score", "tokens"]
    assert {fn.page for fn in public} == {""}
    assert any(fn.page == "sd3" for fn in demo.fns.values())  # the page is wired
    assert app.other_embedded(tiny_sd) == []  # beside a model that is not an embedded one: no second page


def test_the_api_keeps_every_input_in_its_place_and_takes_new_ones_at_the_end(tiny_sd):
    endpoints = app.build_demo(tiny_sd, []).get_api_info()["named_endpoints"]
    names = {api: [p["parameter_name"] for p in endpoints[api]["parameters"]] for api in ("/generate", "/tokens")}
    assert names["/generate"] == ["mode", "concept_key", "prompt", "positions", "swaps", "seed", "steps", "guidance",
                                  "size", "scheduler", "swap_uncond", "swap_start", "swap_end", "map_resolution",
                                  "include_base", "map_mode", "long_prompt", "swap_kv", "swap_strength",
                                  "second_concept", "lora_rest", "map_blocks", "map_start", "map_end", "map_by",
                                  "map_special"]
    assert names["/tokens"] == ["mode", "concept_key", "prompt", "swaps", "long", "second"]
    # README's client sends the first 16; the rest may be left out
    assert all(p["parameter_has_default"] for p in endpoints["/generate"]["parameters"][16:])


def test_without_concepts_the_demo_starts_with_the_papers_token_swap(tiny_sd):
    demo = app.build_demo(tiny_sd, [])
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    assert by_id["mode"].value == app.SWAP
    assert (by_id["prompt"].value, by_id["swaps"].value) == ("a jumping dog", "dog=zebra")
    assert by_id["swaps"].visible and not by_id["include-base"].visible


# ------------------------------------------------------------------------------ two concepts, the knobs


def test_a_second_concept_joins_the_prompt_and_the_generation(tiny_sd, tmp_path):
    from safetensors.torch import save_file

    from alignit_core import load_concept

    found = {}
    for token, seed in (("<a>", 0), ("<b>", 1)):
        path = tmp_path / f"{token[1]}.safetensors"
        save_file({token: torch.randn(1, 32, generator=torch.Generator().manual_seed(seed))}, str(path))
        found[token] = load_concept(path, tiny_sd, class_word="dog" if token == "<a>" else "cat")
    uploaded = {"uploaded:<a>": found["<a>"], "uploaded:<b>": found["<b>"]}
    assert app.second_concept_prompt({}, uploaded, "a photo of a <a>", "uploaded:<b>") == "a photo of a <a> and a <b>"
    *_, command, gen, _, _ = _run(tiny_sd, uploaded=uploaded, mode=app.ALIGNIT, concept_key="uploaded:<a>",
                            second_concept="uploaded:<b>", prompt="a photo of a <a> and a <b>", swap_kv="k",
                            swap_strength=0.5)
    assert [c["token"] for c in gen.record()["concepts"]] == ["<a>", "<b>"] and gen.swapped["alignit"] == (5, 8)
    args = cli_parser().parse_args(shlex.split(command)[3:])
    assert args.concept == ["a.safetensors", "b.safetensors"] and args.token is None
    assert (args.swap_kv, args.swap_strength) == ("k", 0.5)


# ------------------------------------------------------------------------------ what a first visitor hit


def test_toasts_with_a_token_show_it_whole_not_read_as_html():
    """Bug: `<striped-ball>` in a message was read as an HTML tag, hiding it and what followed."""
    err = app.ui_error(PromptError("the concept token <striped-ball> is not in the prompt"))
    assert err.message == "the concept token &lt;striped-ball&gt; is not in the prompt"


def test_an_upload_whose_token_is_taken_says_so_whole_and_quietly(tiny_sd, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "learned_embeds.safetensors"
    save_file({"<striped-ball>": torch.randn(32)}, str(path))
    with pytest.raises(gr.Error) as caught:
        app.add_concept(tiny_sd, {"striped-ball-ti": _concept()}, {}, str(path), "", "circle")
    assert caught.value.message.startswith("the token &lt;striped-ball&gt; is taken by a shipped concept")
    assert not caught.value.print_exception  # no traceback in the server log for a visitor's mistake


@pytest.mark.parametrize("swaps", ["99=yellow", "0=yellow", "12=", "7=", "red=yellow\n40=blue"])
def test_out_of_range_positions_never_reach_the_position_boxes(clip, swaps):
    """Bug: `99=yellow` (or a half-typed `12=`) put 99 into the checkboxes, whose choices stop at 7:
    the page showed 'Error (2) · Value: 99' and the log filled with tracebacks."""
    _, boxes, _, md, _ = app.describe(clip, {}, {}, app.SWAP, None, PROMPT, swaps)
    assert set(boxes["value"]) <= {value for _, value in boxes["choices"]}
    if "=" in swaps and not swaps.endswith("="):
        assert "**Problem:**" in md


def test_an_extra_position_ticked_in_alignit_mode_is_shown_and_called_out(clip):
    """Bug: ticking `white` in AlignIT mode silently swapped in `*`'s row (the background went white)
    while the p′ line stayed the same."""
    concepts = {"striped-ball-ti": _concept()}
    prompt = "a <striped-ball> on a green background"
    _, md, diagram = app.show_chips(clip, concepts, {}, app.ALIGNIT, "striped-ball-ti", prompt, "", [2, 5])
    assert "`2 circle ← <striped-ball>`" in md and "`5 green ← *`" in md
    assert "`green` (5) will take the keys and values of `*`" in md
    assert diagram.count("↑ K/V") == 2
    _, md, _ = app.show_chips(clip, concepts, {}, app.ALIGNIT, "striped-ball-ti", prompt, "", [2])
    assert "will take the keys and values of `*`" not in md


def test_a_tick_in_swap_mode_leaves_the_texts_to_the_swaps_box_view(clip):
    """Bug (a browser run): ticking `red` wrote `2=` into the swaps box; the visitor typed `red=yellow`, and
    the tick's own redraw, made from the half-typed `2=`, landed after the finished swap's view and left
    "needs both a target and a source" under a valid swap. In swap mode the swaps box's view draws them."""
    assert app.positions_picked(clip, app.SWAP, PROMPT, "", [2]) == "2="
    chips, md, diagram = app.show_chips(clip, {}, {}, app.SWAP, None, PROMPT, "2=", [2])
    assert all(isinstance(u, dict) and set(u) <= {"__type__"} for u in (chips, md, diagram))
    _, _, _, md, _ = app.describe(clip, {}, {}, app.SWAP, None, PROMPT, "red=yellow")
    assert "* yellow" in md and "Problem" not in md


def test_sizes_far_from_the_models_own_are_warned_about(tiny_sd):
    """Bug: the embedded model at 256 px draws four objects and at 64 px noise, silently."""
    native = tiny_sd.native_size
    assert views.size_note(tiny_sd, native) == ""
    assert f"trained on {native}×{native} px images; at {2 * native} px expect repeated" in views.size_note(
        tiny_sd, 2 * native)
    *_, gen, _, _ = _run(tiny_sd, size=2 * native)
    assert any("expect repeated or tiled objects" in w for w in gen.warnings)


def test_the_page_reads_the_same_without_an_emoji_font_and_the_header_fits_the_start_mode(tiny_sd):
    """Bug: the dice button was an empty box without an emoji font; the header said 'try a swap
    below' while the page opened in AlignIT mode."""
    demo = app.build_demo(tiny_sd, [_tiny_concept(tiny_sd)])
    text = " ".join(str(getattr(b, "value", "") or "") + " " + str(getattr(b, "label", "") or "")
                    for b in demo.blocks.values())
    assert not re.search("[\U0001F300-\U0001FAFF\u2600-\u27BF\uFE0F]", text)
    shapes = SimpleNamespace(name="embedded-shapes", is_embedded=True, chosen_because="",
                             family=SimpleNamespace(own_loop=False))
    assert "try a" not in views.header_markdown(shapes).lower()


def _tiny_concept(model) -> Concept:
    return Concept("tiny-ti", "<tiny>", "dog", "textual_inversion", vectors=(torch.zeros(1, 32),),
                   example_prompt="a <tiny> on the grass")


# ------------------------------------------------------------------------------ heat maps people can read


def test_the_large_map_shows_the_picked_word_or_else_the_swapped_one(tiny_sd):
    *_, gen, _, _ = _run(tiny_sd)
    row, word, picture = app.large_map_view(gen, "overlay", "words", False, "baseline", "red")
    assert row["value"] == "baseline" and word["value"] == "red" and picture is not None
    row, word, _ = app.large_map_view(gen, "overlay", "words", False)
    assert row["value"] == "swapped" and word["value"] == "red"  # by default the swapped word of the swapped image


# ------------------------------------------------------------------------------ Spaces: ZeroGPU, examples, MCP


def test_without_the_spaces_package_gpu_work_runs_as_it_is(tmp_path):
    """`spaces` exists on Spaces only: the app imports without it and runs the GPU work unchanged."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['spaces'] = None\n"  # as if not installed: `import spaces` raises ImportError
            "import app\n"
            "def work(x): return x + 1\n"
            "assert app.spaces is None and app.on_gpu(work, lambda x: 10) is work\n")
    subprocess.run([sys.executable, "-c", code], cwd=Path(app.__file__).parent, check=True)


def test_examples_are_made_once_and_shared(tiny_sd):
    made = []
    cache = app.ExampleResults(["kept"])

    def make():
        made.append(1)
        return object()

    first = cache.get("kept", make)
    assert cache.get("kept", make) is first and len(made) == 1
    assert cache.get("other", make) is not cache.get("other", make) and len(made) == 3  # only examples are kept


def test_the_api_and_mcp_tools_are_tokens_generate_and_score_documented(tiny_sd):
    from gradio.utils import get_function_description

    demo = app.build_demo(tiny_sd, [])
    public = {fn.api_name: fn for fn in demo.fns.values() if fn.api_visibility == "public"}
    assert set(public) == {"tokens", "generate", "score"}
    for name, fn in public.items():
        description, parameters, returns = get_function_description(fn.fn)
        assert fn.fn.__name__ == name and description and returns
        # MCP joins the lines of Returns with ", ": each line must be a whole item, not half a sentence
        assert not any(line.endswith((",", " of", " and")) for line in returns), returns
        assert all(parameters.get(p) for p in ("prompt", "mode", "swaps", "seed") if p in parameters)
