"""The engine on real diffusers pipelines: swaps touch exactly the rows they should."""
from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from conftest import run_at_once

from alignit_core import Settings, generate_swap, positions_plan, tokenize

FAST = Settings(seed=0, steps=4)


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sdxl", "embedded"])
def test_identity_swap_is_bit_exact(fixture, request):
    model = request.getfixturevalue(fixture)
    p = tokenize(model.tokenizer, "a red circle on a blue background")
    gen = generate_swap(model, p.text, plan=positions_plan(p, p, [2, 3]), settings=FAST)
    assert np.array_equal(_pixels(gen.images["baseline"]), _pixels(gen.images["swapped"]))
    assert np.array_equal(gen.maps["baseline"], gen.maps["swapped"])


def _capture(model, text, swaps, settings):
    seen = {}

    def on_kv(layer, step, key, value):
        seen[(layer, step)] = (key.clone(), value.clone())

    gen = generate_swap(model, text, swaps, settings, on_kv=on_kv)
    return gen, seen


@pytest.mark.parametrize("swap_uncond", [False, True])
def test_swapping_dog_for_zebra_changes_only_that_token(tiny_sd, swap_uncond):
    settings = Settings(seed=0, steps=3, swap_uncond=swap_uncond)
    gen, seen = _capture(tiny_sd, "a jumping dog", [("dog", "zebra")], settings)
    assert gen.swapped["swapped"] == (3,)
    layers = set(tiny_sd.cross_attention_layers)
    assert {layer for layer, _ in seen} == layers
    # batch layout: [uncond baseline, uncond swapped, cond baseline, cond swapped]
    for (layer, step), (key, value) in seen.items():
        for t in (key, value):
            cond_diff = (t[3] != t[2]).any(dim=-1)  # (tokens,)
            assert cond_diff.nonzero().flatten().tolist() == [3], (layer, step)
            uncond_diff = (t[1] != t[0]).any(dim=-1)
            assert uncond_diff.nonzero().flatten().tolist() == ([3] if swap_uncond else [])
    assert not np.array_equal(_pixels(gen.images["baseline"]), _pixels(gen.images["swapped"]))


def test_swap_step_range_limits_the_swap_to_those_steps(tiny_sd):
    _, seen = _capture(tiny_sd, "a jumping dog", [("dog", "zebra")], Settings(seed=0, steps=4, swap_start=0.5))
    for (layer, step), (key, _) in seen.items():
        assert torch.equal(key[3, 3], key[2, 3]) == (step < 2)


def test_swap_rows_are_the_dummy_prompts_rows(tiny_sd):
    from alignit_core.conditioning import encode_prompt

    _, seen = _capture(tiny_sd, "a jumping dog", [("dog", "zebra")], Settings(seed=0, steps=1))
    src, _ = encode_prompt(tiny_sd, tokenize(tiny_sd.tokenizer, "* * zebra"), None)
    for name, attn in tiny_sd.cross_attention_layers.items():
        key, value = seen[(name, 0)]
        assert torch.allclose(key[3, 3], attn.to_k(src)[3], atol=1e-6)
        assert torch.allclose(value[3, 3], attn.to_v(src)[3], atol=1e-6)


def test_sdxl_runs_a_swap_end_to_end(tiny_sdxl):
    gen, seen = _capture(tiny_sdxl, "a jumping dog", [("dog", "zebra")], FAST)
    assert seen, "no cross-attention layer ran"
    for key, _ in seen.values():
        assert (key[3] != key[2]).any(dim=-1).nonzero().flatten().tolist() == [3]
    assert not np.array_equal(_pixels(gen.images["baseline"]), _pixels(gen.images["swapped"]))
    assert gen.images["swapped"].size == (64, 64)


def test_baseline_row_matches_plain_diffusers(tiny_sd):
    from alignit_core.testing import build_tiny_sd

    gen = generate_swap(tiny_sd, "a jumping dog", [("dog", "zebra")], Settings(seed=5, steps=4, guidance=6.0))
    pipe = build_tiny_sd()  # same seed -> same weights, diffusers' own processors
    latent = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(5))
    ref = pipe("a jumping dog", num_inference_steps=4, guidance_scale=6.0, height=64, width=64, latents=latent,
               output_type="np").images[0]
    ours = _pixels(gen.images["baseline"]) / 255.0
    assert np.abs(ours - ref).max() < 2 / 255


def test_two_threads_get_what_they_get_alone(tiny_sd):
    jobs = [("a jumping dog", [("dog", "zebra")], Settings(seed=1, steps=3)),
            ("banana in a white plate", [(4, "black")], Settings(seed=2, steps=3))]
    alone = [generate_swap(tiny_sd, t, s, st) for t, s, st in jobs]
    together = run_at_once([partial(generate_swap, tiny_sd, *job) for job in jobs])
    for a, b in zip(alone, together):
        for row in a.images:
            assert np.array_equal(_pixels(a.images[row]), _pixels(b.images[row]))
            assert np.array_equal(a.maps[row], b.maps[row])


def test_maps_are_per_token_unscaled_attention_probabilities(tiny_sd):
    gen = generate_swap(tiny_sd, "a jumping dog", [("dog", "zebra")], FAST)
    for row, maps in gen.maps.items():
        assert maps.shape == (len(gen.tokens[row]), 8, 8) and maps.dtype == np.float32
        assert np.isfinite(maps).all() and (maps >= 0).all()
        # a pixel's attention over the prompt's tokens is part of one softmax (the rest is padding)
        total = maps.sum(0)
        assert (total <= 1 + 1e-5).all() and (total > 0).all()
        assert not np.allclose(maps.reshape(len(maps), -1).max(1), 1.0)  # not scaled per map


def test_maps_come_from_the_chosen_blocks_and_steps_only(tiny_sd):
    from alignit_core.errors import SettingsError

    text, swaps = "a red circle on a blue background", [("red", "yellow")]
    def run(**kw):
        return generate_swap(tiny_sd, text, swaps, Settings(seed=0, steps=4, map_resolution=8, **kw))

    everything, down, early = run(), run(map_blocks=("down",)), run(map_start=0.0, map_end=0.5)
    up = run(map_blocks=("up",))
    assert not np.allclose(down.maps["swapped"], everything.maps["swapped"])
    assert not np.allclose(down.maps["swapped"], up.maps["swapped"])
    assert not np.allclose(early.maps["swapped"], everything.maps["swapped"])
    # the whole run is the mean of its halves (each half records the same layers for two steps)
    late = run(map_start=0.5, map_end=1.0)
    np.testing.assert_allclose((early.maps["swapped"] + late.maps["swapped"]) / 2, everything.maps["swapped"],
                               rtol=1e-4, atol=1e-6)
    assert np.array_equal(_pixels(early.images["swapped"]), _pixels(everything.images["swapped"]))
    assert everything.record()["map_blocks"] == ["down", "mid", "up"] and early.record()["map_steps"] == [0.0, 0.5]
    with pytest.raises(SettingsError, match="no cross-attention layer of the mid block"):
        run(map_blocks=("mid",))
    with pytest.raises(SettingsError, match="holds none of the 4 steps"):
        run(map_start=0.5, map_end=0.55)


def test_a_size_far_from_the_models_own_is_warned_about(tiny_sd):
    gen = generate_swap(tiny_sd, "a red circle", [("red", "blue")], Settings(seed=0, steps=2, size=128))
    assert any("trained on 64×64 px images; at 128 px" in w for w in gen.warnings)
    gen = generate_swap(tiny_sd, "a red circle", [("red", "blue")], Settings(seed=0, steps=2, size=64))
    assert not gen.warnings


def test_map_memory_does_not_grow_with_steps(tiny_sd):
    few = generate_swap(tiny_sd, "a jumping dog", [("dog", "zebra")], Settings(seed=0, steps=5))
    many = generate_swap(tiny_sd, "a jumping dog", [("dog", "zebra")], Settings(seed=0, steps=50))
    assert few.map_store_bytes == many.map_store_bytes > 0


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sdxl", "embedded"])
def test_recording_maps_changes_no_pixel(fixture, request):
    model = request.getfixturevalue(fixture)
    text, swaps = "a red circle on a blue background", [("red", "yellow")]
    with_maps = generate_swap(model, text, swaps, FAST)
    without = generate_swap(model, text, swaps, Settings(seed=0, steps=4, record_maps=False))
    assert without.maps == {} and without.map_store_bytes == 0 and with_maps.map_store_bytes > 0
    for row in with_maps.images:
        assert np.array_equal(_pixels(with_maps.images[row]), _pixels(without.images[row]))


@pytest.mark.parametrize("swap_start, projections", [(0.0, 1), (0.5, 2)])
def test_keys_and_values_are_projected_once_per_request(tiny_sd, swap_start, projections):
    """Text conditioning is the same at every step: each cross-attention layer projects it once
    (twice when the swap covers only part of the steps), not once per step."""
    calls = {name: 0 for name in tiny_sd.cross_attention_layers}

    def count(name):
        def hook(module, args, output):
            calls[name] += 1
        return hook

    hooks = [attn.to_k.register_forward_hook(count(name)) for name, attn in tiny_sd.cross_attention_layers.items()]
    try:
        gen, seen = _capture(tiny_sd, "a jumping dog", [("dog", "zebra")], Settings(seed=0, steps=6, swap_start=swap_start))
    finally:
        for h in hooks:
            h.remove()
    from alignit_core.conditioning import encode_prompt

    src, _ = encode_prompt(tiny_sd, tokenize(tiny_sd.tokenizer, "* * zebra"), None)
    assert set(calls.values()) == {projections}  # K' rows are part of the layer's own projection
    for (name, step), (key, _) in seen.items():
        swapped = torch.allclose(key[3, 3], tiny_sd.cross_attention_layers[name].to_k(src)[3], atol=1e-6)
        assert swapped == (step >= 6 * swap_start)


def test_settings_are_recorded_for_reproduction(tiny_sd):
    gen = generate_swap(tiny_sd, "a jumping dog", [("dog", "zebra")], Settings(seed=7, steps=2, guidance=3.0))
    s = gen.record()
    assert (s["seed"], s["steps"], s["guidance"], s["size"], s["scheduler"]) == (7, 2, 3.0, 64, "ddim")
    assert s["p"] == "a jumping dog" and s["p_dummy"] == "* * zebra" and s["positions"] == [3]
    assert [t["text"] for t in s["token_tables"]["swapped"]][1:4] == ["a", "jumping", "dog"]
    assert set(s["versions"]) >= {"torch", "diffusers", "transformers"}


def test_a_failing_run_leaves_the_model_usable(tiny_sd):
    def boom(layer, step, key, value):
        raise RuntimeError("forced failure inside the denoising loop")

    with pytest.raises(RuntimeError, match="forced failure"):
        generate_swap(tiny_sd, "a jumping dog", [("dog", "zebra")], FAST, on_kv=boom)
    again = generate_swap(tiny_sd, "a jumping dog", [("dog", "zebra")], FAST)
    first = generate_swap(tiny_sd, "a jumping dog", [("dog", "zebra")], FAST)
    assert np.array_equal(_pixels(again.images["swapped"]), _pixels(first.images["swapped"]))


def test_a_swap_request_encodes_its_prompts_in_one_pass(tiny_sd):
    """p and p' go through the text encoder as one batch; the empty prompt's encoding is kept on
    the model after the first request."""
    from alignit_core.encoding import token_embeddings

    batches = []
    hook = token_embeddings(tiny_sd.text_encoders[0]).register_forward_hook(
        lambda module, args, out: batches.append(args[0].shape[0]))
    try:
        generate_swap(tiny_sd, "a jumping dog", [("dog", "zebra")], FAST)
        batches.clear()
        again = generate_swap(tiny_sd, "a red circle", [("red", "blue")], FAST)
    finally:
        hook.remove()
    assert batches == [2]
    alone = generate_swap(tiny_sd, "a red circle", [("red", "blue")], FAST)
    assert np.array_equal(_pixels(again.images["swapped"]), _pixels(alone.images["swapped"]))


def test_map_keys_prepared_once_match_keys_prepared_every_step(tiny_sd, monkeypatch):
    """The recording layers' keys are prepared once per K/V version (before and after the swap
    starts); maps equal those from keys prepared afresh at every step."""
    from alignit_core.attention import CallState

    settings = Settings(seed=0, steps=4, swap_start=0.5)
    kept = generate_swap(tiny_sd, "a jumping dog", [("dog", "zebra")], settings)
    monkeypatch.setattr(CallState, "map_keys", lambda self, version, k, scale: self.maps.keys(k, scale))
    fresh = generate_swap(tiny_sd, "a jumping dog", [("dog", "zebra")], settings)
    for row in fresh.maps:
        assert np.array_equal(kept.maps[row], fresh.maps[row])
    assert not np.array_equal(kept.maps["baseline"], kept.maps["swapped"])


def test_a_steps_recording_layers_are_added_up_at_once_as_one_by_one(tiny_sdxl, monkeypatch):
    """A step's recording layers are summed in one batched softmax (operator dispatch bounds a GPU run):
    the maps are those of adding the layers one at a time (MAP_SCORE_BYTES of one byte: chunks of one)."""
    from alignit_core import attention

    calls = []
    real = attention.MapStore._add

    def counted(self, queries, keys, mask=None):
        calls.append(len(queries))
        return real(self, queries, keys, mask)

    monkeypatch.setattr(attention.MapStore, "_add", counted)
    settings = Settings(seed=0, steps=3, swap_start=0.5)
    together = generate_swap(tiny_sdxl, "a red circle on a blue background", [("red", "yellow")], settings)
    batched, calls[:] = list(calls), []
    monkeypatch.setattr(attention, "MAP_SCORE_BYTES", 1)
    alone = generate_swap(tiny_sdxl, "a red circle on a blue background", [("red", "yellow")], settings)
    assert set(calls) == {1} and len(batched) == 3 and sum(batched) == len(calls) > 3  # a sum per step
    for row in alone.maps:
        np.testing.assert_allclose(together.maps[row], alone.maps[row], rtol=1e-5, atol=1e-8)
        assert np.array_equal(_pixels(together.images[row]), _pixels(alone.images[row]))


# ------------------------------------------------------------------------------ the paper's knobs


@pytest.mark.parametrize("swap_kv", ["k", "v"])
def test_swapping_keys_only_leaves_the_values_untouched_and_vice_versa(tiny_sd, swap_kv):
    gen, seen = _capture(tiny_sd, "a jumping dog", [("dog", "zebra")], Settings(seed=0, steps=4, swap_kv=swap_kv,
                                                                                swap_start=0.5))
    for (layer, step), (key, value) in seen.items():
        swapped, kept = (key, value) if swap_kv == "k" else (value, key)
        assert torch.equal(kept[3], kept[2]), (layer, step)  # the other one is the baseline row's, bit for bit
        changed = (swapped[3] != swapped[2]).any(dim=-1).nonzero().flatten().tolist()
        assert changed == ([3] if step >= 2 else []), (layer, step)  # within the swap's step range only
    assert gen.record()["swap_kv"] == swap_kv
    assert not np.array_equal(_pixels(gen.images["baseline"]), _pixels(gen.images["swapped"]))


def test_swap_strength_zero_draws_the_baseline_bit_for_bit(tiny_sd):
    gen = generate_swap(tiny_sd, "a jumping dog", [("dog", "zebra")], Settings(seed=0, steps=4, swap_strength=0.0))
    assert np.array_equal(_pixels(gen.images["baseline"]), _pixels(gen.images["swapped"]))
    assert np.array_equal(gen.maps["baseline"], gen.maps["swapped"])


def test_swap_strength_one_is_the_full_swap_bit_for_bit(tiny_sd):
    full = generate_swap(tiny_sd, "a jumping dog", [("dog", "zebra")], Settings(seed=0, steps=4))
    one = generate_swap(tiny_sd, "a jumping dog", [("dog", "zebra")], Settings(seed=0, steps=4, swap_strength=1.0))
    half = generate_swap(tiny_sd, "a jumping dog", [("dog", "zebra")], Settings(seed=0, steps=4, swap_strength=0.5))
    assert np.array_equal(_pixels(full.images["swapped"]), _pixels(one.images["swapped"]))
    assert not np.array_equal(_pixels(full.images["swapped"]), _pixels(half.images["swapped"]))


def test_swap_strength_moves_only_the_swapped_rows_part_of_the_way(tiny_sd):
    _, full = _capture(tiny_sd, "a jumping dog", [("dog", "zebra")], Settings(seed=0, steps=1))
    _, part = _capture(tiny_sd, "a jumping dog", [("dog", "zebra")], Settings(seed=0, steps=1, swap_strength=0.25))
    for name in tiny_sd.cross_attention_layers:
        for whole, got in zip(full[(name, 0)], part[(name, 0)]):  # keys, then values; batch row 2 baseline, 3 swapped
            assert torch.equal(got[3, [0, 1, 2, 4]], whole[2, [0, 1, 2, 4]])  # every other row is the row's own
            torch.testing.assert_close(got[3, 3], whole[2, 3] + 0.25 * (whole[3, 3] - whole[2, 3]), rtol=0, atol=1e-6)


def test_the_knobs_are_checked(tiny_sd):
    from alignit_core import SettingsError

    with pytest.raises(SettingsError, match="keys only, values only"):
        generate_swap(tiny_sd, "a jumping dog", [("dog", "zebra")], Settings(swap_kv="q"))
    with pytest.raises(SettingsError, match="strength must be a number from 0"):
        generate_swap(tiny_sd, "a jumping dog", [("dog", "zebra")], Settings(swap_strength=1.5))
