"""The app's helpers: the swaps box, the token view, the CLI line, error toasts; the callbacks on a tiny model."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
import torch
from PIL import Image

import app
from alignit_core import Concept, PromptError, Token
from alignit_core.cli import parser as cli_parser
from alignit_core.testing import TOKENIZER

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def clip():
    """Just the tokenizer: what the token view needs of a model."""
    from transformers import CLIPTokenizer

    return SimpleNamespace(tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER, model_max_length=77))


def _concept(kind="textual_inversion", phrase="{token}") -> Concept:
    return Concept("striped-ball-ti", "<striped-ball>", "circle", kind, phrase, vectors=(torch.zeros(1, 32),),
                   example_prompt="a <striped-ball> on a green background")


# ------------------------------------------------------------------------------ the swaps box

def test_swaps_box_reads_word_and_position_lines():
    assert app.parse_swaps("dog=zebra\n4=black, cat = tiger\n\n") == [("dog", "zebra"), (4, "black"), ("cat", "tiger")]
    assert app.parse_swaps("") == []


def test_a_half_typed_swap_is_refused_in_the_engines_words():
    with pytest.raises(PromptError, match="needs both a target and a source"):
        app.parse_swaps("4=")


def test_swap_positions_follow_words_positions_and_half_typed_lines(clip):
    assert app.swap_positions(clip.tokenizer, PROMPT, "red=yellow\n6=black") == [2, 6]
    assert app.swap_positions(clip.tokenizer, PROMPT, "3=") == [3]
    assert app.swap_positions(clip.tokenizer, PROMPT, "cat=zebra") == []


def test_ticking_a_position_adds_a_template_and_unticking_removes_its_line(clip):
    assert app.sync_swaps(clip.tokenizer, PROMPT, "red=yellow", [2, 6]) == "red=yellow\n6="
    assert app.sync_swaps(clip.tokenizer, PROMPT, "red=yellow\n6=black", [6]) == "6=black"
    # a line that names nothing in the prompt is the user's to fix, not ours to delete
    assert app.sync_swaps(clip.tokenizer, PROMPT, "cat=zebra", []) == "cat=zebra"


# ------------------------------------------------------------------------------ the token view

def test_swap_view_shows_p_and_the_dummy_prompt_with_the_swapped_position(clip):
    view = app.token_view(clip, app.SWAP, PROMPT, None, "red=yellow")
    assert view.selected == (2,) and not view.problem
    assert view.source.text == "* yellow * * * * *"
    table = app.token_table(view)
    assert list(table.columns) == app.TABLE_COLUMNS
    assert table.iloc[2].tolist() == [2, 1, 2, "red", "red", "yellow"]
    assert app.position_choices(view)[0] == ("1: a", 1) and app.position_choices(view)[-1] == ("7: background", 7)
    assert "2 · red" in app.chips_html(view, view.selected)


def test_alignit_view_preselects_the_class_word_under_the_concept(clip):
    view = app.token_view(clip, app.ALIGNIT, "a <striped-ball> on a green background", _concept(), "")
    assert view.p.text == "a circle on a green background"
    assert view.source.text == "* <striped-ball> * * * *"
    assert view.selected == (2,)
    md = app.prompts_markdown(view)
    assert "customized prompt" in md and "`a circle on a green background`" in md


def test_custom_diffusion_concepts_read_token_and_class_word_together(clip):
    view = app.token_view(clip, app.ALIGNIT, "a <striped-ball> on a green background",
                          _concept("custom_diffusion", "{token} {class_word}"), "")
    assert view.customized.text == "a <striped-ball> circle on a green background"
    assert view.source.text == "<striped-ball> circle * * * *"


@pytest.mark.parametrize("mode, prompt, swaps, problem", [
    (app.ALIGNIT, "a circle on a green background", "", "the concept token <striped-ball> is not in the prompt"),
    (app.SWAP, PROMPT, "cat=zebra", "the word 'cat' is not in the prompt"),
    (app.SWAP, "a dog " * 200, "", "segment mode reads at most"),
])
def test_the_token_view_states_a_problem_instead_of_raising(clip, mode, prompt, swaps, problem):
    view = app.token_view(clip, mode, prompt, _concept(), swaps)
    assert problem in view.problem
    assert app.plain(problem) in app.prompts_markdown(view)


def test_an_empty_prompt_gives_an_empty_table(clip):
    view = app.token_view(clip, app.SWAP, "  ", None, "")
    assert view.p is None and app.token_table(view).empty and app.position_choices(view) == []


# ------------------------------------------------------------------------------ engine -> UI

def test_engine_errors_become_toasts_with_the_engines_message():
    err = app.ui_error(PromptError("the word 'cat' is not in the prompt"))
    assert isinstance(err, gr.Error)
    assert err.message == "the word 'cat' is not in the prompt" and err.title == "Prompt error"


def _generation(tokenizer, mode="swap", rows=("baseline", "swapped")):
    """A Generation as the engine returns one (no images), without running a model."""
    from alignit_core import Settings, word_swap_plan
    from alignit_core.concept_prompts import concept_plan
    from alignit_core.record import Generation, Request

    settings = Settings(seed=7, steps=20, guidance=5.0, size=128, scheduler="ddim", swap_uncond=True, swap_end=0.5,
                        map_resolution=16)
    if mode == "swap":
        swaps = (("red", "yellow"), (6, "black"))
        plan = word_swap_plan(tokenizer, PROMPT, list(swaps))
        request = Request("swap", PROMPT, plan.target, ((plan, None),), swaps=swaps)
    else:
        concept = _concept()
        prompts = concept_plan(tokenizer, concept.example_prompt, concept.words)
        request = Request("alignit", concept.example_prompt, prompts.plan.target, ((prompts.plan, concept),),
                          customized=prompts.customized)
    swapped = {r: request.sources[0][0].positions if r in ("alignit", "swapped") else () for r in rows}
    return Generation({r: None for r in rows}, {}, {}, swapped, settings, request, [],
                      {"name": "embedded-shapes", "source": "embedded"})


def test_the_cli_line_reproduces_a_token_swap(clip):
    line = app.cli_command(_generation(clip.tokenizer), uploaded=set())
    args = cli_parser().parse_args(shlex.split(line)[3:])
    assert args.prompt == PROMPT and args.swap == ["red=yellow", "6=black"]
    assert (args.seed, args.steps, args.guidance, args.size, args.scheduler) == (7, 20, 5.0, 128, "ddim")
    assert args.swap_uncond and args.swap_steps == [0.0, 0.5] and args.map_resolution == 16


def test_the_cli_line_reproduces_an_alignit_comparison_with_the_base_model(clip):
    gen = _generation(clip.tokenizer, "alignit", ("customized", "alignit", "base"))
    args = cli_parser().parse_args(shlex.split(app.cli_command(gen, uploaded=set()))[3:])
    assert args.concept == ["striped-ball-ti"] and args.positions == ["2"] and args.base and args.swap == []


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


def test_examples_are_the_papers_on_stable_diffusion_and_shapes_on_the_embedded_model():
    sd = SimpleNamespace(name="stable-diffusion-v1-5/stable-diffusion-v1-5", is_embedded=False)
    rows, labels = app.examples_for(sd, {})
    assert [(r[2], r[3]) for r in rows] == [("a jumping dog", "dog=zebra"), ("banana in a white plate", "4=black")]
    shapes = SimpleNamespace(name="embedded-shapes", is_embedded=True)
    rows, labels = app.examples_for(shapes, {"striped-ball-ti": _concept()})
    assert ("a red circle on a blue background", "red=yellow") in [(r[2], r[3]) for r in rows]
    assert rows[-1][:3] == [app.ALIGNIT, "striped-ball-ti", "a <striped-ball> on a green background"]
    assert len(labels) == len(rows)


def test_concept_examples_are_offered_where_the_protocol_says_alignit_works():
    """A shipped concept's manifest says how often each method drew its example in the toy Table 1:
    the demo offers an AlignIT example where AlignIT did in most seeds and more often than the customized
    model, and says the rates in its label; a concept without rates (a visitor's) keeps its example."""
    from dataclasses import replace

    shapes = SimpleNamespace(name="embedded-shapes", is_embedded=True)
    works = replace(_concept(), name="holed-star-cd", token="<holed-star>", example_prompt="a <holed-star> on a red background",
                    example_rates=(0.0, 0.8))
    fails = replace(_concept(), example_rates=(0.4, 0.5))  # half the seeds: not most
    rows, labels = app.examples_for(shapes, {"holed-star-cd": works, "striped-ball-ti": fails})
    alignit = [r[1] for r in rows if r[0] == app.ALIGNIT and not r[5]]
    assert alignit == ["holed-star-cd"]
    label = next(l for r, l in zip(rows, labels) if r[0] == app.ALIGNIT and r[1] == "holed-star-cd" and not r[5])
    assert "all drawn in 0% → 80% of seeds" in label
    assert rows[-1][1] == "holed-star-cd" and rows[-1][5] == "striped-ball-ti"  # the two-concept example
    assert app._example_works(replace(fails, example_rates=None))


def test_the_header_names_the_model_and_links_the_paper():
    shapes = SimpleNamespace(name="embedded-shapes", is_embedded=True, chosen_because="embedded offline model")
    md = app.header_markdown(shapes)
    assert "embedded-shapes" in md and "shapes world" in md and app.PAPER in md
    sd = SimpleNamespace(name="stable-diffusion-v1-5/stable-diffusion-v1-5", is_embedded=False,
                         chosen_because="auto: found in the local cache")
    md = app.header_markdown(sd)
    assert md.count("found in the local cache") == 1 and "shapes" not in md


# ------------------------------------------------------------------------------ callbacks on a tiny model

def _run(model, **kw):
    values = dict(uploaded={}, mode=app.SWAP, concept_key=None, prompt=PROMPT, positions=[], swaps="red=yellow",
                  seed=3, steps=2, guidance=5.0, size=model.native_size, scheduler="ddim", swap_uncond=False,
                  swap_start=0.0, swap_end=1.0, map_resolution=None, include_base=False, map_mode="overlay")
    values.update(kw)
    return app.generate(model, {}, **values, progress=lambda *a, **k: None)


LONG = " ".join(f"Panel {i} shows a {c} square with thin stripes, a tiny dot and a wide frame around it."
                for i, c in enumerate(["red", "green", "blue", "yellow", "purple", "orange", "pink", "white"]))


def test_token_view_of_a_long_prompt_counts_positions_through_its_segments(clip):
    view = app.token_view(clip, app.SWAP, LONG, None, "pink=zebra")
    table = app.token_table(view)
    assert len(view.p.parts) >= 2 and len(table) == len(view.p.ids)
    assert table["position"].tolist() == list(range(len(table)))  # global positions = conditioning rows
    second = view.p.starts[1]
    assert table.iloc[second][["segment", "local", "token of p"]].tolist() == [2, 0, "<|startoftext|>"]
    pink = table.index[table["token of p"] == "pink"][0]
    assert table.iloc[pink]["token of p′"] == "zebra" and view.selected == (pink,)
    assert second not in [v for _, v in app.position_choices(view)]  # a segment's start is not offered
    assert "segments" in app.prompts_markdown(view)


def test_truncate_mode_shows_what_the_model_will_not_read(clip, tiny_sd):
    view = app.token_view(clip, app.SWAP, LONG, None, "red=blue", long="truncate")
    assert not view.p.parts and len(view.p.ids) <= 77 and view.p.dropped
    assert f"will not read `{view.p.dropped}`" in app.prompts_markdown(view)
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
    assert app.download_prefix(gen2) == "striped-ball-seed1-"


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


@pytest.mark.parametrize("kw, message", [
    ({"swaps": "cat=zebra"}, "the word 'cat' is not in the prompt"),
    ({"swaps": "12=zebra"}, "position 12 is outside the prompt"),
    ({"steps": 0}, "steps must be a whole number"),
    ({"mode": app.ALIGNIT}, "choose or upload a concept first"),
])
def test_bad_input_raises_the_engines_message_as_a_toast(tiny_sd, kw, message):
    with pytest.raises(gr.Error, match=message):
        _run(tiny_sd, **kw)


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


def test_the_demo_exposes_named_generate_and_tokens_endpoints(tiny_sd):
    demo = app.build_demo(tiny_sd, [])
    names = {fn.api_name for fn in demo.fns.values()}
    assert {"generate", "tokens"} <= names


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


def test_the_token_view_shows_each_concepts_p_prime_and_positions(clip):
    star = Concept("holed-star-ti", "<holed-star>", "star", "textual_inversion", vectors=(torch.zeros(1, 32),))
    view = app.token_view(clip, app.ALIGNIT, "a <striped-ball> and a <holed-star> on a green background",
                          [_concept(), star], "")
    assert view.p.text == "a circle and a star on a green background" and view.selected == (2, 5)
    table = app.token_table(view)
    assert list(table.columns)[-2:] == ["token of p′ (<striped-ball>)", "token of p′ (<holed-star>)"]
    assert table.iloc[2, -2] == "<striped-ball>" and table.iloc[5, -2] == "*"
    assert table.iloc[5, -1] == "<holed-star>" and table.iloc[2, -1] == "*"
    md = app.prompts_markdown(view)
    assert "**p′** of `<striped-ball>`" in md and "**p′** of `<holed-star>`" in md


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


def test_messages_with_a_token_are_shown_whole_not_read_as_html(clip):
    """Bug: `<striped-ball>` in a message was read as an HTML tag, hiding it and what followed."""
    err = app.ui_error(PromptError("the concept token <striped-ball> is not in the prompt"))
    assert err.message == "the concept token &lt;striped-ball&gt; is not in the prompt"
    view = app.token_view(clip, app.ALIGNIT, "a circle on a green background", _concept(), "")
    md = app.prompts_markdown(view)
    assert "&lt;striped-ball&gt; is not in the prompt" in md and "<striped-ball>" not in md
    assert app.plain("p′ = * <x> *") == r"p′ = \* &lt;x&gt; \*"  # no emphasis either


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


def test_switching_mode_keeps_the_visitors_own_prompt_and_swaps(clip):
    """Bug: switching mode threw the visitor's prompt and swaps away for the example's."""
    concepts = {"striped-ball-ti": _concept()}
    mine = "a <striped-ball> on a red background"
    prompt, swaps, drafts = app.mode_switched(concepts, {}, app.SWAP, "striped-ball-ti", mine, "", {},
                                              swap_example=("a jumping dog", "dog=zebra"))
    assert (prompt, swaps) == ("a jumping dog", "dog=zebra")  # the concept prompt does not fit token swaps
    prompt, swaps, drafts = app.mode_switched(concepts, {}, app.ALIGNIT, "striped-ball-ti", PROMPT, "red=blue",
                                              drafts, swap_example=("a jumping dog", "dog=zebra"))
    assert prompt == mine  # back in AlignIT mode: the visitor's own prompt
    prompt, swaps, _ = app.mode_switched(concepts, {}, app.SWAP, "striped-ball-ti", mine, "", drafts,
                                         swap_example=("a jumping dog", "dog=zebra"))
    assert (prompt, swaps) == (PROMPT, "red=blue")  # and the swaps typed before


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


def test_a_word_cut_by_truncation_is_called_cut_not_missing(clip):
    view = app.token_view(clip, app.SWAP, LONG, None, "white=black", long="truncate")
    assert "the word 'white' was cut off" in view.problem and "not in the prompt" not in view.problem


def test_sizes_far_from_the_models_own_are_warned_about(tiny_sd):
    """Bug: the embedded model at 256 px draws four objects and at 64 px noise, silently."""
    native = tiny_sd.native_size
    assert app.size_note(tiny_sd, native) == ""
    assert f"trained on {native}×{native} px images; at {2 * native} px expect repeated" in app.size_note(
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
    assert "try a" not in app.header_markdown(SimpleNamespace(name="embedded-shapes", is_embedded=True,
                                                              chosen_because="")).lower()


def _tiny_concept(model) -> Concept:
    return Concept("tiny-ti", "<tiny>", "dog", "textual_inversion", vectors=(torch.zeros(1, 32),),
                   example_prompt="a <tiny> on the grass")


# ------------------------------------------------------------------------------ heat maps people can read


def test_word_maps_merge_sub_words_and_number_repeated_words(clip, tiny_sd):
    *_, gen, _, _ = _run(tiny_sd, prompt="a red hydrangea and a red box", swaps="box=cat")
    tokens = gen.tokens["baseline"]
    assert [t.text for t in tokens if t.word == "hydrangea"] == ["hydrange", "a"]
    words = app.MapView().entries(gen, "baseline")
    assert [e.label for e in words] == ["a #1", "red #1", "hydrangea", "and", "a #2", "red #2", "box"]
    both = next(e for e in words if e.label == "hydrangea")
    by_position = app.MapView(by="positions", special=True).entries(gen, "baseline")
    assert [e.label for e in by_position][3:5] == ["hydrange", "a"] and len(by_position) == 10  # + start, end
    assert len(app.heatmap_rows(gen, app.MapView(by="words"))) == 2
    large = app.big_map(gen, app.MapView(), "baseline", "hydrangea")
    assert large.width > 400 and both.positions == (3, 4)


def test_clicking_a_tile_picks_its_word_for_the_large_map(tiny_sd):
    *_, gen, _, _ = _run(tiny_sd)
    view = app.MapView()
    from visualize.heatmaps import GAP, MARGIN
    second_tile = (MARGIN + 96 + GAP + 10, MARGIN + 10)
    assert app.clicked_map(gen, view, 1, *second_tile) == "red"
    assert app.clicked_map(gen, view, 1, 1, 1) is None  # the margin
    row, word, picture = app.large_map_view(gen, "overlay", "words", False, "baseline", "red")
    assert row["value"] == "baseline" and word["value"] == "red" and picture is not None
    row, word, _ = app.large_map_view(gen, "overlay", "words", False)
    assert row["value"] == "swapped" and word["value"] == "red"  # by default the swapped word of the swapped image


# ------------------------------------------------------------------------------ Spaces: ZeroGPU, examples, MCP


def test_the_gpu_time_asked_of_zerogpu_grows_with_steps_rows_and_pixels():
    def seconds(mode=app.SWAP, base=False, **kw):
        return app.gpu_seconds(mode, [], PROMPT, app.Settings(**kw), None, [], base)

    sd15 = seconds(steps=30, size=512)
    assert app.GPU_SETUP_S < sd15 <= 60  # SD 1.5's comparison fits ZeroGPU's default minute
    assert seconds(steps=60, size=512) > sd15 and seconds(steps=30, size=768) > sd15
    assert seconds(app.ALIGNIT, True, steps=30, size=512) > seconds(app.ALIGNIT, False, steps=30, size=512) == sd15
    assert seconds(steps=150, size=1024) == app.GPU_MAX_S  # capped
    gen = SimpleNamespace(settings=app.Settings(size=512), rows=["customized", "alignit"], tokens={"alignit": [None] * 9})
    more = SimpleNamespace(settings=app.Settings(size=512), rows=["customized", "alignit"],
                           tokens={"alignit": [None] * 20})
    assert app.GPU_SETUP_S < app.score_seconds(gen) < app.score_seconds(more) <= app.GPU_MAX_S


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


def test_an_examples_request_matches_what_the_page_sends(tiny_sd):
    concepts = {"tiny-ti": _tiny_concept(tiny_sd)}
    defaults = app.resolve(tiny_sd, app.Settings())
    rows, _ = app.examples_for(tiny_sd, concepts)
    keys = app._example_keys(tiny_sd, concepts, rows, defaults)
    page = app.read_request(tiny_sd, concepts, {}, app.ALIGNIT, "tiny-ti", "a <tiny> on the grass", [2], "",
                           app.Settings(seed=0, steps=defaults.steps, guidance=float(defaults.guidance),
                                        size=defaults.size, scheduler=defaults.scheduler, map_resolution=8,
                                        map_blocks=("down", "mid", "up"), swap_strength=1, lora_rest=0), False)
    assert page in keys


def test_the_api_and_mcp_tools_are_tokens_generate_and_score_documented(tiny_sd):
    from gradio.utils import get_function_description

    demo = app.build_demo(tiny_sd, [])
    public = {fn.api_name: fn for fn in demo.fns.values() if fn.api_visibility == "public"}
    assert set(public) == {"tokens", "generate", "score"}
    for name, fn in public.items():
        description, parameters, returns = get_function_description(fn.fn)
        assert fn.fn.__name__ == name and description and returns
        assert all(parameters.get(p) for p in ("prompt", "mode", "swaps", "seed") if p in parameters)
