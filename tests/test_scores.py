"""Alignment scores: the MI estimator's arithmetic on a tiny SD, its meaning on the embedded model,
per-token maps, and CLIP's arithmetic on a tiny random CLIPModel."""
from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image

from alignit_core import Concept, ModelError, Settings, generate_concept, generate_swap, read_prompt, tokenize
from alignit_core.conditioning import Row, empty_prompt, encode_prompt
from alignit_core.generate import run_rows
from alignit_core.noising import T_MIN
from alignit_core.settings import resolve
from alignit_core.scores import (MASK_FILL, Clip, difference, draw, image_alignment, intended_text,
                                 load_clip, masked, mi_scores, overall, score_generation, text_alignment)
from alignit_core.testing import TOKENIZER


def _latent(seed: int, shape=(4, 8, 8)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ the forward process


def _with_scheduler_config(model, config: dict):
    """`model` as if its scheduler had been configured with `config` (same weights)."""
    family = copy.copy(model.family)
    family.scheduler_config = config
    return dataclasses.replace(model, family=family)

def test_k_t_and_z_t_match_a_hand_computation(tiny_sd):
    noising = tiny_sd.family.noising()
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2  # scaled_linear
    alphas_cumprod = np.cumprod(1 - betas)
    t = torch.tensor([51, 500, 999])
    k_hand = 1000 * betas[t] / (2 * (1 - alphas_cumprod[t]))
    np.testing.assert_allclose(noising.weight(t).numpy(), k_hand, rtol=1e-5)
    z0, eps = torch.stack([_latent(0)] * 3), torch.stack([_latent(1)] * 3)
    a = torch.tensor(alphas_cumprod[t], dtype=torch.float32).view(3, 1, 1, 1)
    torch.testing.assert_close(noising.noised(z0, eps, t), a.sqrt() * z0 + (1 - a).sqrt() * eps)


def test_v_prediction_is_converted_to_the_noise_it_implies(tiny_sd):
    config = {**tiny_sd.scheduler_config, "prediction_type": "v_prediction"}
    model = _with_scheduler_config(tiny_sd, config)
    noising = model.family.noising()
    assert noising.prediction_type == "v_prediction"
    t = torch.tensor([60, 400, 990])
    z0, eps = torch.stack([_latent(i) for i in range(3)]), torch.stack([_latent(10 + i) for i in range(3)])
    a = noising.alphas_cumprod[t].float().view(3, 1, 1, 1)
    v = a.sqrt() * eps - (1 - a).sqrt() * z0  # what a v-prediction model is trained to output
    z_t = noising.noised(z0, eps, t)
    torch.testing.assert_close(noising.to_epsilon(v, z_t, t), eps, atol=1e-5, rtol=1e-5)


def test_timesteps_are_stratified_and_fixed_by_the_seed(tiny_sd):
    noising = tiny_sd.family.noising()
    t, eps = draw(noising, (4, 8, 8), 16, seed=3)
    assert t.min() >= T_MIN and t.max() <= 999 and eps.shape == (16, 4, 8, 8)
    edges = np.linspace(T_MIN, 1000, 17)
    assert all(lo <= x < hi for x, lo, hi in zip(t.tolist(), np.floor(edges[:-1]), edges[1:]))  # one per stratum
    again, eps_again = draw(noising, (4, 8, 8), 16, seed=3)
    assert torch.equal(t, again) and torch.equal(eps, eps_again)
    assert not torch.equal(eps, draw(noising, (4, 8, 8), 16, seed=4)[1])


# ------------------------------------------------------------------------------ the MI score

@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_mi_score_is_the_hand_computed_difference_of_denoising_errors(tiny_sd, prediction):
    model = _with_scheduler_config(tiny_sd, {**tiny_sd.scheduler_config, "prediction_type": prediction})
    prompt = tokenize(model.tokenizer, "a jumping dog")
    z0 = _latent(7)
    got = mi_scores(model, {"image": z0}, prompt, samples=3)["image"]

    noising = model.family.noising()
    t, eps = draw(noising, (4, 8, 8), 3)
    cond, _ = encode_prompt(model, prompt, None)
    empty, _ = empty_prompt(model)[:2]
    ac = noising.alphas_cumprod[t].float().view(3, 1, 1, 1)
    z_t = ac.sqrt() * z0 + (1 - ac).sqrt() * eps
    with torch.no_grad():
        out_c = model.unet(z_t, t, encoder_hidden_states=cond.expand(3, -1, -1)).sample
        out_u = model.unet(z_t, t, encoder_hidden_states=empty.expand(3, -1, -1)).sample
    if prediction == "v_prediction":  # ε = √ᾱ v + √(1−ᾱ) z_t
        out_c, out_u = ac.sqrt() * out_c + (1 - ac).sqrt() * z_t, ac.sqrt() * out_u + (1 - ac).sqrt() * z_t
    k = 1000 * noising.betas[t].float() / (2 * (1 - noising.alphas_cumprod[t].float()))
    terms = k * ((eps - out_u).pow(2).sum((1, 2, 3)) - (eps - out_c).pow(2).sum((1, 2, 3)))
    np.testing.assert_allclose(got.samples, terms.numpy(), rtol=1e-4, atol=1e-4)
    assert got.value == pytest.approx(terms.mean().item(), rel=1e-4, abs=1e-4)
    assert got.orthogonal == pytest.approx((k * (out_c - out_u).pow(2).sum((1, 2, 3))).mean().item(), rel=1e-4)
    assert got.map.shape == (8, 8) and got.map.sum() == pytest.approx(got.value, rel=1e-4, abs=1e-4)
    assert got.stderr == pytest.approx(terms.std().item() / math.sqrt(3), rel=1e-3)


def test_common_random_numbers_identical_latents_differ_by_exactly_zero(tiny_sd):
    prompt = tokenize(tiny_sd.tokenizer, "a jumping dog")
    z = _latent(1)
    first = mi_scores(tiny_sd, {"baseline": z, "alignit": z.clone()}, prompt, samples=4)
    assert np.array_equal(first["baseline"].samples, first["alignit"].samples)
    assert difference(first["alignit"], first["baseline"]) == (0.0, 0.0)
    again = mi_scores(tiny_sd, {"baseline": z, "alignit": z.clone()}, prompt, samples=4)
    assert np.array_equal(first["baseline"].samples, again["baseline"].samples)  # same (t, ε) in every call
    other = mi_scores(tiny_sd, {"baseline": z, "other": _latent(2)}, prompt, samples=4)
    assert other["baseline"].value != other["other"].value


def test_per_token_maps_are_on_the_latent_grid_and_sum_to_their_values(tiny_sd):
    prompt = tokenize(tiny_sd.tokenizer, "a jumping dog")
    got = mi_scores(tiny_sd, {"a": _latent(3), "b": _latent(4)}, prompt, samples=3, per_token=True)
    for s in got.values():
        assert s.tokens == ("a", "jumping", "dog")
        assert s.token_maps.shape == (3, 8, 8) and s.token_values.shape == (3,)
        np.testing.assert_allclose(s.token_maps.sum((1, 2)), s.token_values, rtol=1e-4, atol=1e-4)
        assert np.isfinite(s.token_maps).all()
    assert mi_scores(tiny_sd, {"a": _latent(3)}, prompt, samples=2)["a"].token_maps is None


def test_a_long_prompt_is_scored_in_its_segments_with_a_value_per_token(tiny_sd):
    text = " ".join(f"Panel {i} shows a {c} square with thin stripes and a frame around it."
                    for i, c in enumerate(["red", "green", "blue", "yellow", "purple", "orange", "pink"]))
    gen = generate_swap(tiny_sd, text, [("pink", "zebra")], Settings(seed=0, steps=2))
    assert len(gen.record()["segments"]) >= 2
    report = score_generation(tiny_sd, gen, samples=2)
    assert report.text == text.replace("pink", "zebra")
    p = read_prompt(tiny_sd.tokenizer, report.text)
    for s in report.mi.values():
        assert len(s.tokens) == len(p.content) and np.isfinite(s.token_values).all()
        assert s.tokens[-1] == "." and s.token_maps.shape[0] == len(p.content)
    assert report.positions == gen.swapped["swapped"] and report.token_positions == tuple(p.content)
    (pos,) = report.positions  # the swapped word's value and map, found through token_positions
    assert report.mi["swapped"].tokens[report.token_positions.index(pos)] == "zebra"
    from alignit_core import result_views  # the demo's table: the swapped token and those the images differ on most

    table = result_views.scores_markdown(report)
    rows = [line for line in table.splitlines() if line.startswith("| MI of")]
    assert len(rows) == result_views.MAX_TOKEN_ROWS and any(f"*zebra* ({pos})" in line for line in rows)
    assert f"{len(p.content) - result_views.MAX_TOKEN_ROWS} more tokens" in table


def test_the_mi_score_runs_on_sdxl(tiny_sdxl):
    got = mi_scores(tiny_sdxl, {"a": _latent(5)}, tokenize(tiny_sdxl.tokenizer, "a jumping dog"), samples=2,
                    per_token=True)["a"]
    assert math.isfinite(got.value) and got.token_maps.shape == (3, 8, 8)


def test_an_image_shares_more_information_with_its_own_prompt_than_with_an_unrelated_one(embedded):
    prompts = ["a red circle on a blue background", "a green star on a yellow background"]
    latents = {}  # (seed, prompt index) -> z0
    for seed in (0, 1):
        settings = resolve(embedded, Settings(seed=seed, steps=6, record_maps=False))
        rows = [Row(str(i), tokenize(embedded.tokenizer, p)) for i, p in enumerate(prompts)]
        latents.update({(seed, i): z for i, z in enumerate(run_rows(embedded, rows, settings)[3])})
    names = {f"{seed}-{i}": z for (seed, i), z in latents.items()}
    by_prompt = [mi_scores(embedded, names, tokenize(embedded.tokenizer, p), samples=8) for p in prompts]
    own = [by_prompt[int(name[-1])][name].value for name in names]
    unrelated = [by_prompt[1 - int(name[-1])][name].value for name in names]
    assert all(o > u for o, u in zip(own, unrelated)), (own, unrelated)
    assert np.mean(own) > 0 > np.mean(unrelated), (own, unrelated)


# ------------------------------------------------------------------------------ one generation

@pytest.fixture(scope="module")
def swap_gen(tiny_sd):
    return generate_swap(tiny_sd, "a jumping dog", [("dog", "zebra")], Settings(seed=0, steps=2))


def test_a_token_swap_is_scored_against_the_text_it_means(tiny_sd, swap_gen):
    assert intended_text(tiny_sd.family, "a jumping dog", [("dog", "zebra")]) == "a jumping zebra"
    assert intended_text(tiny_sd.family, "banana in a white plate", [(4, "black")]) == "banana in a black plate"
    report = score_generation(tiny_sd, swap_gen, samples=2)
    assert report.text == "a jumping zebra" and report.reference == "baseline"
    assert list(report.mi) == ["baseline", "swapped"] and list(report.differences) == ["swapped"]
    assert report.differences["swapped"][0] == pytest.approx(report.mi["swapped"].value - report.mi["baseline"].value)
    assert report.positions == (3,) and "CLIP is not available" in report.clip_note and not report.clip_text


def test_a_concept_comparison_is_scored_against_p_for_both_images(tiny_sd):
    concept = Concept("toy", "<toy>", "dog", "textual_inversion", vectors=(torch.randn(1, 32),))
    gen = generate_concept(tiny_sd, "a photo of a <toy>", concept, Settings(seed=0, steps=2))
    report = score_generation(tiny_sd, gen, samples=2)
    assert report.text == "a photo of a dog" and report.reference == "customized"
    assert report.mi["customized"].tokens == report.mi["alignit"].tokens == ("a", "photo", "of", "a", "dog")
    assert report.positions == (5,)


# ------------------------------------------------------------------------------ CLIP

def build_tiny_clip() -> Clip:
    """A random-weight CLIPModel from a config (32 px images), with the real CLIP tokenizer."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    torch.manual_seed(0)
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=2)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    return Clip(model, CLIPTokenizer.from_pretrained(TOKENIZER), "tiny-clip")


@pytest.fixture(scope="module")
def tiny_clip() -> Clip:
    return build_tiny_clip()


def _pictures():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)) for _ in range(3)]


def test_clip_preprocessing_is_openais(tiny_clip):
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    images = _pictures()
    torch.testing.assert_close(tiny_clip._pixels(images), processor(images=images, return_tensors="pt")["pixel_values"],
                               atol=1e-4, rtol=1e-4)


def test_text_alignment_is_the_clip_cosine(tiny_clip):
    images, texts = _pictures()[:2], ["a red circle", "a photo of a dog on a beach"]
    got = text_alignment(tiny_clip, images, texts)
    batch = tiny_clip.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = tiny_clip.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              pixel_values=tiny_clip._pixels(images))
        cosines = (out.logits_per_image / tiny_clip.model.logit_scale.exp()).diagonal()
    np.testing.assert_allclose(got, cosines.numpy(), rtol=1e-5, atol=1e-6)


def test_image_alignment_averages_the_cosines_to_the_references(tiny_clip):
    a, b, c = _pictures()
    assert image_alignment(tiny_clip, [a], [a])[0] == pytest.approx(1.0, abs=1e-5)
    e = tiny_clip.image_embeddings([a, b, c])
    want = ((e[0] @ e[1]) + (e[0] @ e[2])).item() / 2
    assert image_alignment(tiny_clip, [a], [b, c])[0] == pytest.approx(want, abs=1e-5)


def test_masking_keeps_the_concept_and_fills_the_rest(tiny_clip):
    a, b, _ = _pictures()
    mask = np.zeros((48, 40), dtype=bool)
    mask[10:30, 5:25] = True
    out = np.asarray(masked(a, mask))
    assert (out[~mask] == MASK_FILL).all() and np.array_equal(out[mask], np.asarray(a)[mask])
    as_image = Image.fromarray(mask.astype(np.uint8) * 255)
    assert np.array_equal(np.asarray(masked(a, as_image)), out)
    plain = image_alignment(tiny_clip, [b], [a])[0]
    assert image_alignment(tiny_clip, [b], [a], [np.ones((48, 40), bool)])[0] == pytest.approx(plain, abs=1e-6)
    assert image_alignment(tiny_clip, [b], [a], [mask])[0] != pytest.approx(plain, abs=1e-4)


def test_overall_is_the_geometric_mean():
    assert overall(0.25, 0.64) == pytest.approx(0.4)
    assert overall(-0.1, 0.5) == 0.0


def test_clip_that_cannot_be_loaded_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"CLIP is not available \(nobody/no-such-clip: not in the local cache, "
                                         r"and the hub is not reachable"):
        load_clip("nobody/no-such-clip")


def test_a_generation_gets_clip_scores_when_clip_is_there(tiny_sd, tiny_clip, swap_gen):
    gen = swap_gen
    refs = _pictures()[:2]
    report = score_generation(tiny_sd, gen, tiny_clip, refs, samples=2)
    images = [gen.images["baseline"], gen.images["swapped"]]
    np.testing.assert_allclose([report.clip_text[r] for r in ("baseline", "swapped")],
                               text_alignment(tiny_clip, images, ["a jumping zebra"] * 2), rtol=1e-6)
    np.testing.assert_allclose([report.clip_image[r] for r in ("baseline", "swapped")],
                               image_alignment(tiny_clip, images, refs), rtol=1e-6)
    assert report.clip_note == ""


# ------------------------------------------------------------------------------ the demo's button

def test_the_score_button_fills_the_table_and_one_mi_row_per_image(tiny_sd, swap_gen):
    import gradio as gr

    import app

    md, *pictures, report = app.score(tiny_sd, None, "CLIP is not available (offline)", {}, swap_gen, "overlay",
                                      progress=lambda *a, **k: None)
    assert "`a jumping zebra`" in md and "| MI score (nats) |" in md and "| vs baseline |" in md
    assert "| MI of *zebra* (3) |" in md and "CLIP is not available (offline); showing the MI score only" in md
    assert [p is not None for p in pictures] == [True, True, False]  # pictures, not updates: MCP sends them as images
    assert [box["visible"] for box in app.mi_boxes(swap_gen)] == [True, True, False]
    assert pictures[0].size == app.mi_rows(swap_gen, report, "overlay")[0].size
    assert app.redraw_mi(swap_gen, report, "raw")[0]["value"].tobytes() != pictures[0].tobytes()
    with pytest.raises(gr.Error, match="generate images first"):
        app.score(tiny_sd, None, "", {}, None, "overlay", progress=lambda *a, **k: None)
    assert "score" in {fn.api_name for fn in app.build_demo(tiny_sd, []).fns.values()}
