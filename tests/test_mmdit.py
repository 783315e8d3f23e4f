"""Side-stream AlignIT on MMDiT (SD3, SD3 with T5, Flux), on tiny random-weight pipelines."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from alignit_core.errors import ConceptError, PromptError, SettingsError
from alignit_core.families.mmdit import MMDiTModel, MMDiTSettings, MMDiTSwap, TextBranch, generate_mmdit
from alignit_core.families.mmdit_attention import FluxProcessor, SD3Processor
from alignit_core.testing import perturbed_copy, t5_tokenizer, tiny_flux, tiny_sd3

P = "a photo of a dog"  # CLIP: dog at 5; T5: dog at 4
ROWS = {"sd3": 16, "sd3_t5": 16, "flux": 24}  # T5 rows read
DOG = {"sd3": 5, "sd3_t5": 5, "flux": 4}
SOURCE = "* * * * cat"
FAMILIES = ["sd3", "sd3_t5", "flux"]


@pytest.fixture(scope="module")
def pipes():
    built = {}

    def get(name):
        if name not in built:
            built[name] = {"sd3": tiny_sd3, "sd3_t5": lambda: tiny_sd3(t5=True), "flux": tiny_flux}[name]()
        return built[name]
    return get


def _settings(name, **kw):
    return MMDiTSettings(**{"seed": 1, "steps": 3, "size": 32, "text_tokens": ROWS[name], **kw})


def _pipe_call(pipe, name, **kw):
    args = dict(num_inference_steps=3, height=32, width=32, max_sequence_length=ROWS[name])
    return pipe(P, **{**args, **kw}).images


def _content(gen):
    return tuple(t.position for t in gen.tokens if t.word_index >= 0)


def _pixels(image):
    return np.asarray(image)


@pytest.mark.parametrize("name", FAMILIES)
def test_no_swap_is_the_pipeline_bit_for_bit(pipes, name):
    pipe = pipes(name)
    image = _pipe_call(pipe, name, generator=torch.Generator().manual_seed(1), output_type="pil")[0]
    latent = _pipe_call(pipe, name, generator=torch.Generator().manual_seed(1), output_type="latent")[0]
    gen = generate_mmdit(MMDiTModel.from_pipeline(pipe), P, [], _settings(name))
    assert list(gen.images) == ["baseline"]
    assert torch.equal(gen.latents["baseline"], latent)
    assert np.array_equal(_pixels(gen.images["baseline"]), _pixels(image))
    # the processors, once installed, leave the pipeline's own calls as they were
    again = _pipe_call(pipe, name, generator=torch.Generator().manual_seed(1), output_type="pil")[0]
    assert np.array_equal(_pixels(again), _pixels(image))


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_a_batch_of_rows_is_the_pipelines_batch_bit_for_bit(pipes, name):
    """Baseline and swapped rows whose swap acts in no block: the pipeline with two images per prompt
    from the same starting latent (a batch's size changes how CPU kernels round, so compare like with like)."""
    pipe = pipes(name)
    model = MMDiTModel.from_pipeline(pipe)
    gen = generate_mmdit(model, P, [MMDiTSwap((DOG[name],), SOURCE)], _settings(name, swap_blocks=()))
    z = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(1))
    if name == "flux":
        z = z.view(1, 4, 8, 2, 8, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 64, 16)
    latents = _pipe_call(pipe, name, latents=z.repeat(2, *[1] * (z.dim() - 1)), num_images_per_prompt=2,
                         output_type="latent")
    assert torch.equal(gen.latents["baseline"], latents[0])
    assert torch.equal(gen.latents["swapped"], latents[1])


@pytest.mark.parametrize("name", FAMILIES)
def test_identity_swap_is_bit_exact(pipes, name):
    """p' = p, the base weights, every content position: the side stream reproduces the main text
    stream in every block and step, so the swapped row is the baseline row bit for bit."""
    model = MMDiTModel.from_pipeline(pipes(name))
    first = generate_mmdit(model, P, [], _settings(name))
    gen = generate_mmdit(model, P, [MMDiTSwap(_content(first), P)], _settings(name))
    assert torch.equal(gen.latents["swapped"], gen.latents["baseline"])
    assert np.array_equal(_pixels(gen.images["swapped"]), _pixels(gen.images["baseline"]))
    assert np.array_equal(gen.text_maps["swapped"], gen.text_maps["baseline"])
    # the same with the base transformer and encoders named as a customized branch
    own = TextBranch(transformer=model.transformer, text_encoders=model.text_encoders)
    again = generate_mmdit(model, P, [MMDiTSwap(_content(first), P, own)], _settings(name))
    assert torch.equal(again.latents["swapped"], gen.latents["baseline"])


@pytest.mark.parametrize("name", ["sd3_t5", "flux"])
def test_identity_swap_is_bit_exact_in_bfloat16(name):
    """In bf16 a linear layer rounds differently on a contiguous input (bias fused) and on the
    text slice of a batch (bias added after): the side stream follows the main stream's path."""
    pipe = tiny_sd3(t5=True, dtype=torch.bfloat16) if name == "sd3_t5" else tiny_flux(dtype=torch.bfloat16)
    model = MMDiTModel.from_pipeline(pipe)
    latent = _pipe_call(pipe, name, generator=torch.Generator().manual_seed(1), output_type="latent")[0]
    alone = generate_mmdit(model, P, [], _settings(name))
    assert torch.equal(alone.latents["baseline"], latent.float())
    gen = generate_mmdit(model, P, [MMDiTSwap(_content(alone), P)], _settings(name))
    assert torch.equal(gen.latents["swapped"], gen.latents["baseline"])


def test_the_side_stream_reaches_flux_single_stream_blocks(pipes):
    model = MMDiTModel.from_pipeline(pipes("flux"))
    last = model.blocks - 1  # the last single-stream block: the side stream went through all blocks before it
    assert last >= len(model.transformer.transformer_blocks)
    ident = generate_mmdit(model, P, [MMDiTSwap((1, 2, 3, 4), P)], _settings("flux", swap_blocks=(last,)))
    assert torch.equal(ident.latents["swapped"], ident.latents["baseline"])
    cat = generate_mmdit(model, P, [MMDiTSwap((4,), SOURCE)], _settings("flux", swap_blocks=(last,)))
    assert not torch.equal(cat.latents["swapped"], cat.latents["baseline"])


def _recorded(model, name, **kw):
    seen = {}

    def on_kv(record):
        seen[(record.block, record.step)] = record

    gen = generate_mmdit(model, P, [MMDiTSwap((DOG[name],), SOURCE)], _settings(name, **kw), on_kv=on_kv)
    return gen, seen


@pytest.mark.parametrize("name", ["sd3_t5", "flux"])
def test_swapping_dog_for_cat_changes_only_those_rows_in_every_block_and_step(pipes, name):
    model = MMDiTModel.from_pipeline(pipes(name))
    gen, seen = _recorded(model, name)
    assert set(seen) == {(b, i) for b in range(model.blocks) for i in range(3)}
    swapped_row = 3 if name != "flux" else 1  # [uncond baseline, uncond swapped, cond baseline, cond swapped]
    written = gen.swapped["swapped"]
    targets = list(written.get("clip", ())) + [77 * (name != "flux") + q for q in written["t5"]]
    assert written["t5"] == (4,) and (name == "flux" or written["clip"] == (5,))
    for (block, step), r in seen.items():
        rows = [r.text.start + q for q in targets]
        for before, after in ((r.key, r.swapped_key), (r.value, r.swapped_value)):
            changed = (before != after).any(-1).any(-1)  # (batch, tokens)
            assert changed[swapped_row, rows].all(), (block, step)
            changed[swapped_row, rows] = False
            assert not changed.any(), (block, step)


@pytest.mark.parametrize("mode", ["k", "v"])
def test_keys_only_or_values_only(pipes, mode):
    model = MMDiTModel.from_pipeline(pipes("flux"))
    gen, seen = _recorded(model, "flux", swap_kv=mode)
    for r in seen.values():
        assert torch.equal(r.key, r.swapped_key) == (mode == "v")
        assert torch.equal(r.value, r.swapped_value) == (mode == "k")


def test_swap_steps_and_blocks_limit_where_rows_are_written(pipes):
    model = MMDiTModel.from_pipeline(pipes("sd3"))
    _, seen = _recorded(model, "sd3", swap_blocks=(1,), swap_start=0.34, swap_end=1.0)
    for (block, step), r in seen.items():
        assert torch.equal(r.key, r.swapped_key) == (block != 1 or step == 0), (block, step)


def test_the_swapped_row_alone(pipes):
    """Without the baseline: one row, the same picture as the pair's swapped row up to rounding (a
    batch's size changes how CPU kernels round the timestep embedding's linear layers)."""
    model = MMDiTModel.from_pipeline(pipes("flux"))
    swaps = [MMDiTSwap((4,), SOURCE)]
    pair = generate_mmdit(model, P, swaps, _settings("flux"))
    alone = generate_mmdit(model, P, swaps, _settings("flux"), include_baseline=False)
    assert list(alone.images) == ["swapped"] and list(alone.maps) == ["swapped"]
    assert torch.allclose(alone.latents["swapped"], pair.latents["swapped"], atol=1e-4)
    assert json.loads(json.dumps(pair.settings))["swaps"][0] == {"positions": [4], "source": SOURCE,
                                                                "customized": False, "written": {"t5": [4]}}


@pytest.mark.parametrize("name", FAMILIES)
def test_a_swap_changes_the_image(pipes, name):
    gen = generate_mmdit(MMDiTModel.from_pipeline(pipes(name)), P, [MMDiTSwap((DOG[name],), SOURCE)], _settings(name))
    assert not np.array_equal(_pixels(gen.images["swapped"]), _pixels(gen.images["baseline"]))


def test_a_customized_text_branch_changes_the_rows_it_supplies(pipes):
    pipe = pipes("sd3_t5")
    model = MMDiTModel.from_pipeline(pipe)
    custom = TextBranch(transformer=perturbed_copy(pipe.transformer))
    gen = generate_mmdit(model, P, [MMDiTSwap((5,), P, custom)], _settings("sd3_t5"))
    assert not torch.equal(gen.latents["swapped"], gen.latents["baseline"])
    encoders = TextBranch(text_encoders=(None, None, perturbed_copy(pipe.text_encoder_3)))
    gen = generate_mmdit(model, P, [MMDiTSwap((5,), P, encoders)], _settings("sd3_t5"))
    assert not torch.equal(gen.latents["swapped"], gen.latents["baseline"])
    assert gen.swapped["swapped"] == {"clip": (5,), "t5": (4,)}
    # without the T5 rows only the CLIP row is written (the customized T5 still reaches it: the side
    # text attends to its own T5 tokens in every block)
    off = generate_mmdit(model, P, [MMDiTSwap((5,), P, encoders)], _settings("sd3_t5", swap_t5=False))
    assert off.swapped["swapped"] == {"clip": (5,)}
    assert not torch.equal(off.latents["swapped"], gen.latents["swapped"])


@pytest.mark.parametrize("name", FAMILIES)
def test_maps_have_the_right_shape_and_are_normalised_over_the_text(pipes, name):
    model = MMDiTModel.from_pipeline(pipes(name))
    gen = generate_mmdit(model, P, [MMDiTSwap((DOG[name],), SOURCE)], _settings(name))
    for row in ("baseline", "swapped"):
        m = gen.maps[row]
        assert m.shape == (len(gen.tokens), 8, 8) and m.dtype == np.float32
        assert (m >= 0).all() and (m.sum(0) <= 1 + 1e-5).all()
        every = gen.text_maps[row]
        assert every.shape[0] == (77 + ROWS[name] if name != "flux" else ROWS[name])
        assert np.allclose(every.sum(0), 1, atol=1e-5)
        if name == "sd3_t5":
            assert gen.t5_maps[row].shape == (len(gen.t5_tokens), 8, 8)
    assert not np.array_equal(gen.maps["swapped"], gen.maps["baseline"])
    assert (gen.t5_maps != {}) == (name == "sd3_t5")


@pytest.mark.parametrize("name", ["sd3_t5", "flux"])
def test_recording_maps_changes_no_pixel(pipes, name):
    model = MMDiTModel.from_pipeline(pipes(name))
    swaps = [MMDiTSwap((DOG[name],), SOURCE)]
    on = generate_mmdit(model, P, swaps, _settings(name))
    off = generate_mmdit(model, P, swaps, _settings(name, record_maps=False))
    assert off.maps == {}
    for row in on.images:
        assert torch.equal(on.latents[row], off.latents[row])
        assert np.array_equal(_pixels(on.images[row]), _pixels(off.images[row]))


def test_sd3_t5_rows_follow_the_swapped_words(pipes):
    model = MMDiTModel.from_pipeline(pipes("sd3_t5"))
    gen = generate_mmdit(model, "a dog on the zebra", [MMDiTSwap((5,), "* * * * cat")], _settings("sd3_t5"))
    zebra = [t.position for t in gen.t5_tokens if t.word == "zebra"]
    assert gen.swapped["swapped"]["t5"] == tuple(zebra[-1:])  # right-aligned: p' has one token for "cat"


def test_processors_hold_no_request_state_and_requests_do_not_mix(pipes):
    model = MMDiTModel.from_pipeline(pipes("flux"))
    for proc in model.transformer.attn_processors.values():
        assert isinstance(proc, (FluxProcessor, SD3Processor))
        assert set(vars(proc)) <= {"index", "single", "joint_blocks"}
    swaps = {"cat": [MMDiTSwap((4,), SOURCE)], "none": []}
    alone = {k: generate_mmdit(model, P, v, _settings("flux")) for k, v in swaps.items()}
    together = {}

    def run(key):
        for _ in range(2):
            together[key] = generate_mmdit(model, P, swaps[key], _settings("flux"))
    threads = [threading.Thread(target=run, args=(k,)) for k in swaps]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for key in swaps:
        for row in alone[key].latents:
            assert torch.equal(alone[key].latents[row], together[key].latents[row])


def test_bad_input_is_refused_with_clear_errors(pipes):
    model = MMDiTModel.from_pipeline(pipes("sd3"))
    s = _settings("sd3")
    with pytest.raises(PromptError, match="position 9 is not a token of p "):
        generate_mmdit(model, P, [MMDiTSwap((9,), SOURCE)], s)
    with pytest.raises(PromptError, match="start token"):
        generate_mmdit(model, P, [MMDiTSwap((0,), SOURCE)], s)
    with pytest.raises(PromptError, match="position 5 is not a token of p' "):
        generate_mmdit(model, P, [MMDiTSwap((5,), "* cat")], s)
    with pytest.raises(PromptError, match="the prompt is empty"):
        generate_mmdit(model, "   ", [], s)
    with pytest.raises(PromptError, match="source prompt p' is empty"):
        generate_mmdit(model, P, [MMDiTSwap((5,), "")], s)
    with pytest.raises(PromptError, match="whole numbers"):
        generate_mmdit(model, P, [MMDiTSwap(("dog",), SOURCE)], s)
    for bad, match in ((dict(steps=0), "steps"), (dict(swap_kv="q"), "swap 'q'"), (dict(swap_blocks=(7,)), "0 to 2"),
                       (dict(size=33), "multiple of 4"), (dict(guidance=-1.0), "guidance"),
                       (dict(swap_start=0.8, swap_end=0.2), "swap step range"), (dict(text_tokens=0), "text tokens")):
        with pytest.raises(SettingsError, match=match):
            generate_mmdit(model, P, [], _settings("sd3", **bad))
    with pytest.raises(SettingsError, match="to 64"):  # 16 image tokens a side: the position embeddings' limit
        generate_mmdit(model, P, [], _settings("sd3", size=128))
    flux = MMDiTModel.from_pipeline(pipes("flux"))
    with pytest.raises(ConceptError, match="another architecture"):
        generate_mmdit(model, P, [MMDiTSwap((5,), SOURCE, TextBranch(transformer=flux.transformer))], s)
    with pytest.raises(ConceptError, match="3 entries"):
        generate_mmdit(model, P, [MMDiTSwap((5,), SOURCE, TextBranch(text_encoders=(None,)))], s)


def test_flux_rope_is_the_identity_on_text_rows(pipes):
    """Flux's text positions are all zero: cos 1, sin 0, so RoPE leaves text keys bit for bit."""
    from diffusers.models.embeddings import apply_rotary_emb

    transformer = pipes("flux").transformer
    cos, sin = transformer.pos_embed(torch.zeros(24, 3))
    x = torch.randn(2, 24, 2, 16)
    assert torch.equal(apply_rotary_emb(x, (cos, sin), sequence_dim=1), x)


def test_the_tiny_t5_tokenizer_reads_words():
    tok = t5_tokenizer()
    pieces = tok.convert_ids_to_tokens(tok("a photo of a dog").input_ids)
    assert pieces == ["▁a", "▁photo", "▁of", "▁a", "▁dog", "</s>"]
    assert tok.convert_ids_to_tokens(tok(SOURCE).input_ids)[-2] == "▁cat"


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_full_size_architectures_run_the_side_stream_on_the_meta_device(name):
    """SD3.5-medium (24 blocks, dual attention in 13) and Flux-dev (19 joint + 38 single blocks) at
    1024 px, shapes only: every block swaps and records, the side stream goes through all of them."""
    from alignit_core.families.mmdit_attention import MapSums, MMDiTState, SideStream

    meta, bf16 = torch.device("meta"), torch.bfloat16
    pipe = (tiny_sd3 if name == "sd3" else tiny_flux)(full=True, dtype=bf16, device=meta)
    model = MMDiTModel.from_pipeline(pipe)
    tr = model.transformer
    text, batch = (77 + 256, 4) if name == "sd3" else (512, 2)
    side = SideStream(row=batch - 1, start=tr.context_embedder(torch.zeros(1, text, 4096, device=meta, dtype=bf16)),
                      targets=torch.tensor([5], device=meta), sources=torch.tensor([5], device=meta),
                      joint=list(tr.transformer_blocks), single=list(getattr(tr, "single_transformer_blocks", [])))
    every = frozenset(range(model.blocks))
    state = MMDiTState(sides=[side], swap_blocks=every, text_tokens=text,
                       maps=MapSums((batch - 1,), torch.zeros(1, 4096, text, device=meta), every, (0, 1)))
    state.begin_step(0)
    zeros = dict(device=meta, dtype=bf16)
    with torch.no_grad():
        if name == "sd3":
            out = tr(hidden_states=torch.zeros(batch, 16, 128, 128, **zeros), timestep=torch.ones(batch, device=meta),
                     encoder_hidden_states=torch.zeros(batch, text, 4096, **zeros),
                     pooled_projections=torch.zeros(batch, 2048, **zeros), joint_attention_kwargs={"alignit": state})
        else:
            out = tr(hidden_states=torch.zeros(batch, 4096, 64, **zeros), timestep=torch.ones(batch, device=meta),
                     guidance=torch.ones(batch, device=meta),
                     encoder_hidden_states=torch.zeros(batch, text, 4096, **zeros),
                     pooled_projections=torch.zeros(batch, 768, **zeros), txt_ids=torch.zeros(text, 3, device=meta),
                     img_ids=torch.zeros(4096, 3, device=meta), joint_attention_kwargs={"alignit": state})
    assert out.sample.shape[0] == batch and state.maps.added == model.blocks == (24 if name == "sd3" else 57)
    assert side.hidden.shape == (1, text, tr.inner_dim)
