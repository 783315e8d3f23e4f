"""SD3 and Flux like any other model: load_model on a saved folder, generate_swap, the CLI, and the
clear refusals (concepts other than textual inversion, UNet-only settings). The MI score: test_rfmi.py. Tiny random-weight pipelines saved to
temporary folders; seconds each."""
from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
import torch

from alignit_core import Settings, generate_concept, generate_swap, load_model
from alignit_core.cli import main
from alignit_core.errors import ConceptError, PromptError, SettingsError
from alignit_core.families import MMDiTFamily, UNetFamily
from alignit_core.families.mmdit import MMDiTSettings, MMDiTSwap, generate_mmdit
from alignit_core.families.mmdit_score import on_grid
from alignit_core.models import from_components
from alignit_core.prompts import SwapPlan
from alignit_core.record import command
from alignit_core.testing import tiny_flux, tiny_sd3

P = "a photo of a dog"  # CLIP: dog at 5; T5: dog at 4 (no start token)
FAST = dict(seed=1, steps=3, size=32)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmdit")
    tiny_sd3().save_pretrained(root / "sd3")  # without T5: text_encoder_3 / tokenizer_3 listed as null
    tiny_flux().save_pretrained(root / "flux")
    return root


@pytest.fixture(scope="module")
def sd3(folders):
    return load_model(str(folders / "sd3"), device="cpu")


@pytest.fixture(scope="module")
def flux(folders):
    return load_model(str(folders / "flux"), device="cpu")


def _pixels(image):
    return np.asarray(image)


def test_a_saved_sd3_without_t5_and_a_flux_folder_load_as_mmdit_models(folders, sd3, flux):
    assert json.loads((folders / "sd3" / "model_index.json").read_text())["text_encoder_3"] == [None, None]
    for model, kind in ((sd3, "sd3"), (flux, "flux")):
        assert isinstance(model.family, MMDiTFamily) and model.family.kind == kind
        assert model.family.defaults().steps == 28
        assert model.scheduler_name == "FlowMatchEulerDiscreteScheduler" and model.size_step == 4
        assert model.cross_attention_layers and model.attention_resolutions(32) == [8]
    assert sd3.family.defaults().guidance == 7.0 and flux.family.defaults().guidance == 3.5
    assert type(sd3.tokenizer).__name__ == "CLIPTokenizer" and len(sd3.text_encoders) == 2  # CLIP-L, CLIP-G
    assert "T5" in type(flux.tokenizer).__name__  # Flux reads T5 rows: swaps name T5 positions
    assert sd3.native_size == 32


def test_the_unet_family_rejects_mmdit_pipelines():
    assert not UNetFamily.accepts(tiny_sd3()) and not UNetFamily.accepts(tiny_flux())
    assert MMDiTFamily.accepts(tiny_sd3()) and MMDiTFamily.accepts(tiny_flux())
    built = from_components(tiny_sd3(t5=True))  # a pipeline built in memory wraps as one loaded does
    assert built.family.kind == "sd3" and len(built.tokenizers) == 3 and "T5" in type(built.tokenizers[2]).__name__


def test_settings_resolve_to_the_family_defaults_and_refuse_what_does_not_apply(sd3, flux):
    gen = generate_swap(sd3, P, [("dog", "cat")], Settings(seed=1, steps=2))
    s = gen.settings
    assert (s.guidance, s.size, s.scheduler, s.map_resolution) == (7.0, 32, "euler", 8)
    for bad, match in ((dict(scheduler="ddim"), "flow matching's Euler"), (dict(swap_uncond=True), "conditional half"),
                       (dict(swap_strength=0.5), "swap strength"), (dict(lora_rest=0.5), "lora_rest"),
                       (dict(map_blocks=("up",)), "every transformer block"),
                       (dict(map_resolution=4), "image-token grid: 8x8 at 32 px"),
                       (dict(size=128), "from 8 to 64")):
        with pytest.raises(SettingsError, match=match):
            generate_swap(sd3, P, [("dog", "cat")], Settings(**{**FAST, **bad}))
    with pytest.raises(SettingsError, match="'dpm\\+\\+' scheduler"):
        generate_swap(flux, P, [("dog", "cat")], Settings(**FAST, scheduler="dpm++"))


def test_generate_swap_on_sd3_is_generate_mmdit_bit_for_bit(sd3):
    gen = generate_swap(sd3, "a jumping dog", [("dog", "zebra")], Settings(**FAST))
    assert gen.request.sources[0][0].source.text == "* * zebra" and gen.swapped["swapped"] == (3,)
    direct = generate_mmdit(sd3.family.mmdit, "a jumping dog", [MMDiTSwap((3,), "* * zebra")], MMDiTSettings(**FAST))
    assert list(gen.images) == ["baseline", "swapped"]
    for row in gen.images:
        assert torch.equal(gen.latents[row], direct.latents[row])
        assert np.array_equal(_pixels(gen.images[row]), _pixels(direct.images[row]))
        assert np.array_equal(gen.maps[row], direct.maps[row])
        assert gen.maps[row].shape == (len(gen.tokens[row]), 8, 8)
    assert not np.array_equal(_pixels(gen.images["swapped"]), _pixels(gen.images["baseline"]))
    record = gen.record()
    assert (record["p"], record["p_dummy"], record["positions"], record["scheduler"]) == \
        ("a jumping dog", "* * zebra", [3], "euler")


def test_the_baseline_row_is_the_diffusers_pipeline_bit_for_bit(folders, sd3):
    """The pipeline with two images per prompt from the seed's one latent (a batch's size changes
    how CPU kernels round, so like is compared with like)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folders / "sd3"), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    z = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(1))
    latents = pipe(P, num_inference_steps=3, height=32, width=32, latents=z.repeat(2, 1, 1, 1),
                   num_images_per_prompt=2, output_type="latent").images
    gen = generate_swap(sd3, P, [("dog", "cat")], Settings(**FAST))
    assert torch.equal(gen.latents["baseline"], latents[0])


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_identity_swap_through_the_api_is_bit_exact(request, name):
    model = request.getfixturevalue(name)
    p = model.family.prompt(P)
    content = [t.position for t in p.tokens if t.word_index >= 0]  # T5's start at 0 (it has no start token)
    gen = generate_swap(model, P, settings=Settings(**FAST), plan=SwapPlan(p, p, tuple(content)))
    assert torch.equal(gen.latents["swapped"], gen.latents["baseline"])


def test_flux_swaps_are_planned_on_t5_and_match_generate_mmdit(flux):
    gen = generate_swap(flux, P, [("dog", "cat")], Settings(**FAST))
    assert [t.text for t in gen.tokens["swapped"]][-2:] == ["dog", "</s>"] and gen.swapped["swapped"] == (4,)
    direct = generate_mmdit(flux.family.mmdit, P, [MMDiTSwap((4,), "* * * * cat")], MMDiTSettings(**FAST))
    for row in gen.images:  # the engine keeps latents on the grid (C, h, w), the pipeline packed
        assert torch.equal(gen.latents[row], on_grid("flux", direct.latents[row]))
    by_position = generate_swap(flux, P, [(4, "cat")], Settings(**FAST))
    assert torch.equal(by_position.latents["swapped"], gen.latents["swapped"])


def test_a_flux_word_of_other_t5_length_reads_p_prime_at_its_own_positions(flux):
    """`jumping` is spelled out by the tiny T5 (7 tokens), `*` is one: p''s `cat` lies elsewhere
    than p's `dog`, and only `dog`'s row is written."""
    plan = flux.family.swap_plan("a jumping dog", [("dog", "cat")])
    dog = [t.position for t in plan.target.tokens if t.word == "dog"]
    cat = [t.position for t in plan.source.tokens if t.word == "cat"]
    assert plan.source.text == "* * cat" and plan.positions == tuple(dog) and plan.source_positions == tuple(cat)
    assert dog != cat
    # p's rows pair with p''s word by word: every row of the concept is a position of its own
    assert plan.unstarred() == tuple(dog) and plan.narrowed({dog[0]}).unstarred() == (dog[0],)


def test_a_flux_word_swap_changes_the_image_and_only_that_rows_keys_and_values(flux):
    seen = []
    gen = generate_swap(flux, "a jumping dog", [("dog", "cat")], Settings(**FAST), on_kv=seen.append)
    assert not np.array_equal(_pixels(gen.images["swapped"]), _pixels(gen.images["baseline"]))
    assert {(r.block, r.step) for r in seen} == {(b, i) for b in range(flux.family.mmdit.blocks) for i in range(3)}
    written = gen.swapped["swapped"]
    for r in seen:  # rows: [baseline, swapped] (Flux-dev has no unconditional half)
        rows = [r.text.start + q for q in written]
        for before, after in ((r.key, r.swapped_key), (r.value, r.swapped_value)):
            changed = (before != after).any(-1).any(-1)  # (batch, tokens)
            assert changed[1, rows].all(), (r.block, r.step)
            changed[1, rows] = False
            assert not changed.any(), (r.block, r.step)


def test_swaps_that_cannot_be_planned_are_refused_clearly(sd3, flux):
    with pytest.raises(PromptError, match="outside the prompt"):
        generate_swap(sd3, P, [(9, "cat")], Settings(**FAST))
    with pytest.raises(PromptError, match="position 9 is not a token"):
        generate_swap(flux, P, [(9, "cat")], Settings(**FAST))
    with pytest.raises(PromptError, match="'zebra' is not in the prompt"):
        generate_swap(flux, P, [("zebra", "cat")], Settings(**FAST))
    with pytest.raises(PromptError, match="no swap given"):
        generate_swap(flux, P, [], Settings(**FAST))


def test_custom_diffusion_concepts_are_refused_on_mmdit(sd3):
    from alignit_core.concepts import Concept

    with pytest.raises(ConceptError, match="not supported yet; textual inversion, DreamBooth-LoRA and token swaps are"):
        generate_concept(sd3, "a sks on a table", Concept("x", "sks", "dog", "custom_diffusion"), Settings(**FAST))


def test_the_cli_writes_its_files_for_an_sd3_folder_and_its_line_reproduces_them(folders, tmp_path, capsys):
    args = ["generate", "--model", str(folders / "sd3"), "--prompt", "a jumping dog", "--swap", "dog=zebra",
            "--steps", "2", "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    names = {"baseline.png", "swapped.png", "heatmaps.png", "maps.safetensors", "settings.json"}
    assert {p.name for p in (tmp_path / "a").iterdir()} == names
    settings = json.loads((tmp_path / "a" / "settings.json").read_text())
    assert (settings["p_dummy"], settings["positions"], settings["scheduler"], settings["guidance"]) == \
        ("* * zebra", [3], "euler", 7.0)
    gen = generate_swap(load_model(str(folders / "sd3"), device="cpu"), "a jumping dog", [("dog", "zebra")],
                        Settings(seed=0, steps=2))
    again = shlex.split(command(gen))[3:-2] + ["--device", "cpu", "--out", str(tmp_path / "b")]
    assert main(again) == 0
    assert (tmp_path / "b" / "swapped.png").read_bytes() == (tmp_path / "a" / "swapped.png").read_bytes()
    capsys.readouterr()
    assert main(["tokens", "--model", str(folders / "flux"), "--prompt", P, "--device", "cpu"]) == 0
    assert "dog" in capsys.readouterr().out.splitlines()[-2]  # T5's table: dog, then </s>


@pytest.mark.parametrize("extra, message", [
    (["--swap", "9=zebra"], "position 9 is outside the prompt"),
    (["--concept", "striped-ball-ti"], "<striped-ball> has embeddings for 1 text encoder(s); sd3 has 2"),
    (["--concept", "striped-ball-cd"], "Custom Diffusion and text-encoder concepts on SD3/Flux are not supported"),
    (["--scheduler", "ddim", "--swap", "dog=zebra"], "flow matching's Euler"),
    (["--compile", "--swap", "dog=zebra"], "apply to UNet models"),
])
def test_the_cli_exits_2_with_a_clear_message_on_bad_input(folders, tmp_path, capsys, extra, message):
    code = main(["generate", "--model", str(folders / "sd3"), "--prompt", "a jumping dog", "--steps", "2",
                 "--device", "cpu", "--out", str(tmp_path / "out"), *extra])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_load_concept_refuses_custom_diffusion_on_mmdit_before_reading_its_file(sd3, tmp_path):
    from alignit_core import find_concepts, load_concept

    (tmp_path / "manifest.json").write_text(json.dumps({"kind": "custom_diffusion", "token": "<x>", "class_word": "dog",
                                                        "custom_diffusion": "nothing-here.bin"}))
    with pytest.raises(ConceptError, match="not supported yet; textual inversion, DreamBooth-LoRA and token swaps are"):
        load_concept(tmp_path, sd3)
    assert find_concepts("assets/concepts", sd3) == []  # the shipped concepts are the embedded model's


def test_the_demo_serves_token_swaps_on_sd3(sd3):
    """The page builds for an SD3 model (its size range, its one sampler, no UNet-only knobs) and its
    generate callback draws a swap whose images differ, with maps under each."""
    import app

    app.build_demo(sd3, [])
    *shown, grid, settings, line, gen, pair, maps = app.generate(
        sd3, {}, {}, app.SWAP, None, P, [], "dog=cat", 1, 3, 7.0, 32, "euler", False, 0.0, 1.0, None, False,
        "overlay", progress=lambda *a, **k: None)
    assert gen.rows == ["baseline", "swapped"] and shown[0] is not None and shown[1] is not None
    assert not np.array_equal(_pixels(gen.images["baseline"]), _pixels(gen.images["swapped"]))
    assert set(gen.maps) == {"baseline", "swapped"} and line.startswith("python -m alignit_core generate")


def test_flux_first_word_is_a_position_of_its_own_and_can_be_swapped(flux):
    """T5's table has no start token: its first word sits at position 0 and is swappable like any other."""
    from alignit_core.views import position_choices, token_view

    p = flux.family.prompt(P)
    assert p.content == [0, 1, 2, 3, 4] and p.tokens[0].text == "a"
    view = token_view(flux, "swap", "dog jumping", None, "dog=cat")
    assert [pos for _, pos in position_choices(view)][:1] == [0] and view.selected == (0,)
    gen = generate_swap(flux, "dog jumping", [(0, "cat")], Settings(**FAST))
    assert gen.swapped["swapped"] == (0,)
