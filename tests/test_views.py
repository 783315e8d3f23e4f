"""What the demo shows, computed without gradio: the swaps box, the token view and its table, the
p / p′ texts, the examples, the reproduce line, heat-map views and ZeroGPU time estimates."""
from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from alignit_core import Concept, PromptError, Settings, generate_swap, views
from alignit_core import result_views as results
from alignit_core.cli import parser as cli_parser
from alignit_core.settings import resolve

PROMPT = "a red circle on a blue background"
LONG = " ".join(f"Panel {i} shows a {c} square with thin stripes, a tiny dot and a wide frame around it."
                for i, c in enumerate(["red", "green", "blue", "yellow", "purple", "orange", "pink", "white"]))


def _concept(kind="textual_inversion", phrase="{token}") -> Concept:
    return Concept("striped-ball-ti", "<striped-ball>", "circle", kind, phrase, vectors=(torch.zeros(1, 32),),
                   example_prompt="a <striped-ball> on a green background")


def test_the_views_import_without_gradio():
    """`alignit_core` never imports gradio: its views work where gradio is not installed."""
    code = ("import sys; sys.modules['gradio'] = None\n"  # as if not installed: `import gradio` raises ImportError
            "from alignit_core import result_views, views\n"
            "assert views.parse_swaps('dog=zebra') == [('dog', 'zebra')]\n"
            "assert 'gradio' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}\n")
    subprocess.run([sys.executable, "-c", code], cwd=Path(views.__file__).parents[1], check=True)


# ------------------------------------------------------------------------------ the swaps box

def test_swaps_box_reads_word_and_position_lines():
    assert views.parse_swaps("dog=zebra\n4=black, cat = tiger\n\n") == [("dog", "zebra"), (4, "black"), ("cat", "tiger")]
    assert views.parse_swaps("") == []


def test_a_half_typed_swap_is_refused_in_the_engines_words():
    with pytest.raises(PromptError, match="needs both a target and a source"):
        views.parse_swaps("4=")


def test_swap_positions_follow_words_positions_and_half_typed_lines(clip):
    assert views.swap_positions(clip, PROMPT, "red=yellow\n6=black") == [2, 6]
    assert views.swap_positions(clip, PROMPT, "3=") == [3]
    assert views.swap_positions(clip, PROMPT, "cat=zebra") == []


def test_ticking_a_position_adds_a_template_and_unticking_removes_its_line(clip):
    assert views.sync_swaps(clip, PROMPT, "red=yellow", [2, 6]) == "red=yellow\n6="
    assert views.sync_swaps(clip, PROMPT, "red=yellow\n6=black", [6]) == "6=black"
    # a line that names nothing in the prompt is the user's to fix, not ours to delete
    assert views.sync_swaps(clip, PROMPT, "cat=zebra", []) == "cat=zebra"


# ------------------------------------------------------------------------------ the token view

def test_swap_view_shows_p_and_the_dummy_prompt_with_the_swapped_position(clip):
    view = views.token_view(clip, views.SWAP, PROMPT, None, "red=yellow")
    assert view.selected == (2,) and not view.problem
    assert view.source.text == "* yellow * * * * *"
    table = views.token_table(view)
    assert list(table.columns) == views.TABLE_COLUMNS
    assert table.iloc[2].tolist() == [2, 1, 2, "red", "red", "yellow"]
    assert views.position_choices(view)[0] == ("1: a", 1) and views.position_choices(view)[-1] == ("7: background", 7)
    assert "2 · red" in views.chips_html(view, view.selected)


def test_alignit_view_preselects_the_class_word_under_the_concept(clip):
    view = views.token_view(clip, views.ALIGNIT, "a <striped-ball> on a green background", _concept(), "")
    assert view.p.text == "a circle on a green background"
    assert view.source.text == "* <striped-ball> * * * *"
    assert view.selected == (2,)
    md = views.prompts_markdown(view)
    assert "customized prompt" in md and "`a circle on a green background`" in md


def test_custom_diffusion_concepts_read_token_and_class_word_together(clip):
    view = views.token_view(clip, views.ALIGNIT, "a <striped-ball> on a green background",
                            _concept("custom_diffusion", "{token} {class_word}"), "")
    assert view.customized.text == "a <striped-ball> circle on a green background"
    assert view.source.text == "<striped-ball> circle * * * *"


@pytest.mark.parametrize("mode, prompt, swaps, problem", [
    (views.ALIGNIT, "a circle on a green background", "", "the concept token <striped-ball> is not in the prompt"),
    (views.SWAP, PROMPT, "cat=zebra", "the word 'cat' is not in the prompt"),
    (views.SWAP, "a dog " * 200, "", "segment mode reads at most"),
])
def test_the_token_view_states_a_problem_instead_of_raising(clip, mode, prompt, swaps, problem):
    view = views.token_view(clip, mode, prompt, _concept(), swaps)
    assert problem in view.problem
    assert views.plain(problem) in views.prompts_markdown(view)


def test_an_empty_prompt_gives_an_empty_table(clip):
    view = views.token_view(clip, views.SWAP, "  ", None, "")
    assert view.p is None and views.token_table(view).empty and views.position_choices(view) == []


def test_token_view_of_a_long_prompt_counts_positions_through_its_segments(clip):
    view = views.token_view(clip, views.SWAP, LONG, None, "pink=zebra")
    table = views.token_table(view)
    assert len(view.p.parts) >= 2 and len(table) == len(view.p.ids)
    assert table["position"].tolist() == list(range(len(table)))  # global positions = conditioning rows
    second = view.p.starts[1]
    assert table.iloc[second][["segment", "local", "token of p"]].tolist() == [2, 0, "<|startoftext|>"]
    pink = table.index[table["token of p"] == "pink"][0]
    assert table.iloc[pink]["token of p′"] == "zebra" and view.selected == (pink,)
    assert second not in [v for _, v in views.position_choices(view)]  # a segment's start is not offered
    assert "segments" in views.prompts_markdown(view)


def test_the_table_and_the_cli_read_the_same_token_rows(clip):
    view = views.token_view(clip, views.SWAP, LONG, None, "")
    table = views.token_table(view)
    assert [tuple(row) for row in table[views.TABLE_COLUMNS[:5]].itertuples(index=False)] == views.token_rows(view.p)


def test_the_token_view_shows_each_concepts_p_prime_and_positions(clip):
    star = Concept("holed-star-ti", "<holed-star>", "star", "textual_inversion", vectors=(torch.zeros(1, 32),))
    view = views.token_view(clip, views.ALIGNIT, "a <striped-ball> and a <holed-star> on a green background",
                            [_concept(), star], "")
    assert view.p.text == "a circle and a star on a green background" and view.selected == (2, 5)
    table = views.token_table(view)
    assert list(table.columns)[-2:] == ["token of p′ (<striped-ball>)", "token of p′ (<holed-star>)"]
    assert table.iloc[2, -2] == "<striped-ball>" and table.iloc[5, -2] == "*"
    assert table.iloc[5, -1] == "<holed-star>" and table.iloc[2, -1] == "*"
    md = views.prompts_markdown(view)
    assert "**p′** of `<striped-ball>`" in md and "**p′** of `<holed-star>`" in md


def test_markdown_with_a_token_shows_it_whole_not_read_as_html(clip):
    """Bug: `<striped-ball>` in a message was read as an HTML tag, hiding it and what followed."""
    view = views.token_view(clip, views.ALIGNIT, "a circle on a green background", _concept(), "")
    md = views.prompts_markdown(view)
    assert "&lt;striped-ball&gt; is not in the prompt" in md and "<striped-ball>" not in md
    assert views.plain("p′ = * <x> *") == r"p′ = \* &lt;x&gt; \*"  # no emphasis either


def test_a_word_cut_by_truncation_is_called_cut_not_missing(clip):
    view = views.token_view(clip, views.SWAP, LONG, None, "white=black", long="truncate")
    assert "the word 'white' was cut off" in view.problem and "not in the prompt" not in view.problem


# ------------------------------------------------------------------------------ modes, concepts, examples

def test_switching_mode_keeps_the_visitors_own_prompt_and_swaps(clip):
    """Bug: switching mode threw the visitor's prompt and swaps away for the example's."""
    concepts = {"striped-ball-ti": _concept()}
    mine = "a <striped-ball> on a red background"
    prompt, swaps, drafts = views.mode_switched(concepts, {}, views.SWAP, "striped-ball-ti", mine, "", {},
                                                swap_example=("a jumping dog", "dog=zebra"))
    assert (prompt, swaps) == ("a jumping dog", "dog=zebra")  # the concept prompt does not fit token swaps
    prompt, swaps, drafts = views.mode_switched(concepts, {}, views.ALIGNIT, "striped-ball-ti", PROMPT, "red=blue",
                                                drafts, swap_example=("a jumping dog", "dog=zebra"))
    assert prompt == mine  # back in AlignIT mode: the visitor's own prompt
    prompt, swaps, _ = views.mode_switched(concepts, {}, views.SWAP, "striped-ball-ti", mine, "", drafts,
                                           swap_example=("a jumping dog", "dog=zebra"))
    assert (prompt, swaps) == (PROMPT, "red=blue")  # and the swaps typed before


def test_a_concept_without_an_example_starts_from_the_default_prompt():
    assert views.starting_prompt(_concept()) == "a <striped-ball> on a green background"
    assert views.starting_prompt(replace(_concept(), example_prompt="")) == "a photo of a <striped-ball>"


def test_examples_are_the_papers_on_stable_diffusion_and_shapes_on_the_embedded_model():
    sd = SimpleNamespace(name="stable-diffusion-v1-5/stable-diffusion-v1-5", is_embedded=False)
    rows, labels = views.examples_for(sd, {})
    assert [(r[2], r[3]) for r in rows] == [("a jumping dog", "dog=zebra"), ("banana in a white plate", "4=black")]
    shapes = SimpleNamespace(name="embedded-shapes", is_embedded=True)
    rows, labels = views.examples_for(shapes, {"striped-ball-ti": _concept()})
    assert ("a red circle on a blue background", "red=yellow") in [(r[2], r[3]) for r in rows]
    assert rows[-1][:3] == [views.ALIGNIT, "striped-ball-ti", "a <striped-ball> on a green background"]
    assert len(labels) == len(rows)


def test_concept_examples_are_offered_where_the_protocol_says_alignit_works():
    """A shipped concept's manifest says how often each method drew its example in the toy Table 1:
    the demo offers an AlignIT example where AlignIT did in most seeds and more often than the customized
    model, and says the rates in its label; a concept without rates (a visitor's) keeps its example."""
    shapes = SimpleNamespace(name="embedded-shapes", is_embedded=True)
    works = replace(_concept(), name="holed-star-cd", token="<holed-star>", example_prompt="a <holed-star> on a red background",
                    example_rates=(0.0, 0.8), example_seed=3)
    fails = replace(_concept(), example_rates=(0.4, 0.5))  # half the seeds: not most
    rows, labels = views.examples_for(shapes, {"holed-star-cd": works, "striped-ball-ti": fails})
    alignit = [r[1] for r in rows if r[0] == views.ALIGNIT and not r[5]]
    assert alignit == ["holed-star-cd"]
    assert [r[4] for r in rows if r[0] == views.ALIGNIT and not r[5]] == [3]  # on its measured seed
    label = next(l for r, l in zip(rows, labels) if r[0] == views.ALIGNIT and r[1] == "holed-star-cd" and not r[5])
    assert label.endswith("0% → 80%")
    assert rows[-1][1] == "holed-star-cd" and rows[-1][5] == "striped-ball-ti"  # the two-concept example
    assert views.example_works(replace(fails, example_rates=None))
    # its second concept: of two that AlignIT drew alike, the one whose customized model drew it more often
    cd = replace(works, kind="custom_diffusion")
    fragile = replace(fails, name="striped-ball-te", kind="text_encoder", example_rates=(0.0, 0.5))
    for order in ({"holed-star-cd": cd, "striped-ball-te": fragile, "striped-ball-ti": fails},
                  {"holed-star-cd": cd, "striped-ball-ti": fails, "striped-ball-te": fragile}):
        assert views.examples_for(shapes, order)[0][-1][5] == "striped-ball-ti"
    sturdier = replace(fragile, example_rates=(0.5, 0.5))  # its customized model drew it more often than 0.4
    assert views.examples_for(shapes, {"holed-star-cd": cd, "striped-ball-ti": fails,
                                       "striped-ball-te": sturdier})[0][-1][5] == "striped-ball-te"


def test_the_concept_example_alignit_draws_most_often_comes_first():
    """The page opens on the first AlignIT example: the one AlignIT drew in most seeds, then the one it
    gained most on (the picture a first visitor sees is then the likeliest to show AlignIT working)."""
    shapes = SimpleNamespace(name="embedded-shapes", is_embedded=True)
    star = replace(_concept(), token="<holed-star>", example_prompt="a <holed-star> on a red background")
    concepts = {"holed-star-cd": replace(star, name="holed-star-cd", example_rates=(0.0, 0.8)),
                "holed-star-te": replace(star, name="holed-star-te", example_rates=(0.0, 1.0)),
                "holed-star-ti": replace(star, name="holed-star-ti", example_rates=(0.1, 1.0)),
                "holed-star-x": replace(star, name="holed-star-x", example_rates=(0.6, 0.5))}  # not offered
    rows, _ = views.examples_for(shapes, concepts)
    assert [r[1] for r in rows if r[0] == views.ALIGNIT] == ["holed-star-te", "holed-star-ti", "holed-star-cd"]


def test_an_examples_request_matches_what_the_page_sends(tiny_sd):
    concepts = {"tiny-ti": Concept("tiny-ti", "<tiny>", "dog", "textual_inversion", vectors=(torch.zeros(1, 32),),
                                   example_prompt="a <tiny> on the grass")}
    defaults = resolve(tiny_sd, Settings())
    rows, _ = views.examples_for(tiny_sd, concepts)
    keys = views.example_requests(tiny_sd, concepts, rows, defaults)
    page = views.read_request(tiny_sd, concepts, {}, views.ALIGNIT, "tiny-ti", "a <tiny> on the grass", [2], "",
                              Settings(seed=0, steps=defaults.steps, guidance=float(defaults.guidance),
                                       size=defaults.size, scheduler=defaults.scheduler, map_resolution=8,
                                       map_blocks=("down", "mid", "up"), swap_strength=1, lora_rest=0), False)
    assert page in keys


def test_the_header_names_the_model_and_links_the_paper():
    unet, mmdit = SimpleNamespace(own_loop=False), SimpleNamespace(own_loop=True)
    shapes = SimpleNamespace(name="embedded-shapes", is_embedded=True, chosen_because="embedded offline model",
                             family=unet)
    md = views.header_markdown(shapes)
    assert "embedded-shapes" in md and "shapes world" in md and views.PAPER in md and "toy Table 1" in md
    md = views.header_markdown(SimpleNamespace(name="embedded-mmdit", is_embedded=True, family=mmdit,
                                               chosen_because="embedded offline model (SD3 architecture)"))
    assert "SD3-architecture" in md and "side stream" in md and "toy Table 1" not in md
    sd = SimpleNamespace(name="stable-diffusion-v1-5/stable-diffusion-v1-5", is_embedded=False,
                         chosen_because="auto: found in the local cache")
    md = views.header_markdown(sd)
    assert md.count("found in the local cache") == 1 and "shapes" not in md


def test_the_gpu_time_asked_of_zerogpu_grows_with_steps_rows_and_pixels():
    def seconds(mode=views.SWAP, base=False, **kw):
        return views.gpu_seconds(mode, [], PROMPT, Settings(**kw), None, [], base)

    sd15 = seconds(steps=30, size=512)
    assert views.GPU_SETUP_S < sd15 <= 60  # SD 1.5's comparison fits ZeroGPU's default minute
    assert seconds(steps=60, size=512) > sd15 and seconds(steps=30, size=768) > sd15
    assert seconds(views.ALIGNIT, True, steps=30, size=512) > seconds(views.ALIGNIT, False, steps=30, size=512) == sd15
    assert seconds(steps=150, size=1024) == views.GPU_MAX_S  # capped
    gen = SimpleNamespace(settings=Settings(size=512), rows=["customized", "alignit"], tokens={"alignit": [None] * 9})
    more = SimpleNamespace(settings=Settings(size=512), rows=["customized", "alignit"],
                           tokens={"alignit": [None] * 20})
    assert views.GPU_SETUP_S < results.score_seconds(gen) < results.score_seconds(more) <= views.GPU_MAX_S


# ------------------------------------------------------------------------------ what a generation shows

def _generation(tokenizer, mode="swap", rows=("baseline", "swapped")):
    """A Generation as the engine returns one (no images), without running a model."""
    from alignit_core import word_swap_plan
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
    line = results.cli_command(_generation(clip.tokenizer), uploaded=set())
    args = cli_parser().parse_args(shlex.split(line)[3:])
    assert args.prompt == PROMPT and args.swap == ["red=yellow", "6=black"]
    assert (args.seed, args.steps, args.guidance, args.size, args.scheduler) == (7, 20, 5.0, 128, "ddim")
    assert args.swap_uncond and args.swap_steps == [0.0, 0.5] and args.map_resolution == 16


def test_the_cli_line_reproduces_an_alignit_comparison_with_the_base_model(clip):
    gen = _generation(clip.tokenizer, "alignit", ("customized", "alignit", "base"))
    args = cli_parser().parse_args(shlex.split(results.cli_command(gen, uploaded=set()))[3:])
    assert args.concept == ["striped-ball-ti"] and args.positions == ["2"] and args.base and args.swap == []


def test_downloads_are_named_for_the_concepts_and_the_seed(clip):
    assert results.download_prefix(_generation(clip.tokenizer)) == "swap-seed7-"
    assert results.download_prefix(_generation(clip.tokenizer, "alignit", ("customized", "alignit"))) == \
        "striped-ball-seed7-"


def _swap(model, prompt: str, swaps: list):
    """A token swap as the demo's Generate button makes it (seed 3, two steps, the model's own size)."""
    return generate_swap(model, prompt, swaps, resolve(model, Settings(seed=3, steps=2, guidance=5.0,
                                                                      scheduler="ddim")))


def test_word_maps_merge_sub_words_and_number_repeated_words(tiny_sd):
    gen = _swap(tiny_sd, "a red hydrangea and a red box", [("box", "cat")])
    tokens = gen.tokens["baseline"]
    assert [t.text for t in tokens if t.word == "hydrangea"] == ["hydrange", "a"]
    words = results.MapView().entries(gen, "baseline")
    assert [e.label for e in words] == ["a #1", "red #1", "hydrangea", "and", "a #2", "red #2", "box"]
    both = next(e for e in words if e.label == "hydrangea")
    by_position = results.MapView(by="positions", special=True).entries(gen, "baseline")
    assert [e.label for e in by_position][3:5] == ["hydrange", "a"] and len(by_position) == 10  # + start, end
    assert len(results.heatmap_rows(gen, results.MapView(by="words"))) == 2
    large = results.big_map(gen, results.MapView(), "baseline", "hydrangea")
    assert large.width > 400 and both.positions == (3, 4)


def test_clicking_a_tile_picks_its_word_and_the_large_map_defaults_to_the_swapped_word(tiny_sd):
    from visualize.heatmaps import GAP, MARGIN

    gen = _swap(tiny_sd, PROMPT, [("red", "yellow")])
    view = results.MapView()
    second_tile = (MARGIN + 96 + GAP + 10, MARGIN + 10)
    assert results.clicked_map(gen, view, 1, *second_tile) == "red"
    assert results.clicked_map(gen, view, 1, 1, 1) is None  # the margin
    assert results.large_map_pick(gen, view, "baseline", "red")[::2] == ("baseline", "red")
    row, labels, label = results.large_map_pick(gen, view)
    # by default the swapped word of the swapped image
    assert (row, label) == ("swapped", "red") and labels[:2] == ["a #1", "red"]


def test_the_before_after_pair_is_the_baseline_and_the_changed_image():
    gen = SimpleNamespace(rows=["customized", "alignit", "base"])
    assert results.before_after(gen, ["c.png", "a.png", "b.png"]) == ("c.png", "a.png")
    assert results.before_after(SimpleNamespace(rows=["base"]), ["b.png"]) is None

